"""Calling the other service of the mini mesh with this service's certificate."""

from __future__ import annotations

import os
from typing import Any

import httpx

from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import ServicePaths
from meshware.identity.spiffe import SpiffeId
from meshware.outbound.mtls import client_ssl_context, require_server


def call_peer(me: str) -> dict[str, Any]:
    """Call ``$PEER_URL/hello`` as service ``me``; verify the server is ``$PEER_SERVICE``."""
    paths = ServicePaths.under(os.environ["MESHWARE_CERT_DIR"], me, "default")
    verifier = PeerVerifier(TrustBundles.from_file(paths.bundle))
    expected = SpiffeId.for_service("cluster.local", "default", os.environ["PEER_SERVICE"])
    with httpx.Client(verify=client_ssl_context(paths), timeout=5) as client:
        response = client.get(f"{os.environ['PEER_URL']}/hello")
        require_server(response, verifier, expected)
    return {"server": expected.uri, "server_saw_caller": response.json()["caller"]}
