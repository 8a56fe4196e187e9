"""meshware for FastAPI and Starlette: one line turns the mesh on, both ways.

::

    from fastapi import FastAPI
    import meshware_fastapi
    from meshware_fastapi import MeshClient, RequiredPeer, authorize, rate_limit

    app = FastAPI()
    meshware_fastapi.install(app, service="orders")

``Peer``, ``RequiredPeer`` and ``MeshClient`` (``Annotated`` dependencies) import FastAPI on
first use; everything else needs Starlette only. See ``docs/fastapi.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meshware.policy.authz import authorize
from meshware.policy.ratelimit import rate_limit
from meshware_fastapi.dependencies import MISSING_IDENTITY, mesh_client, peer, require_peer
from meshware_fastapi.plugin import MeshwareMiddleware, MeshwareState, install, state_of

if TYPE_CHECKING:
    from meshware_fastapi.params import MeshClient, Peer, RequiredPeer

__all__ = [
    "MISSING_IDENTITY",
    "MeshClient",
    "MeshwareMiddleware",
    "MeshwareState",
    "Peer",
    "RequiredPeer",
    "authorize",
    "install",
    "mesh_client",
    "peer",
    "rate_limit",
    "require_peer",
    "state_of",
]


def __getattr__(name: str) -> Any:
    if name not in ("MeshClient", "Peer", "RequiredPeer"):
        raise AttributeError(f"module 'meshware_fastapi' has no attribute {name!r}")
    value = getattr(importlib.import_module("meshware_fastapi.params"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
