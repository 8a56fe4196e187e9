"""Annotated parameter types for FastAPI endpoints (they import FastAPI)::

from meshware_fastapi import MeshClient, Peer, RequiredPeer

@app.get("/orders/{order_id}")
async def get_order(order_id: int, caller: RequiredPeer, client: MeshClient): ...
"""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import Depends

from meshware.identity.identity import Identity
from meshware_fastapi.dependencies import mesh_client, peer, require_peer

__all__ = ["MeshClient", "Peer", "RequiredPeer"]

Peer = Annotated[Identity | None, Depends(peer)]
"""The caller's verified identity, or ``None`` (``Depends(peer)``)."""

RequiredPeer = Annotated[Identity, Depends(require_peer)]
"""The caller's verified identity; 401/403 without one (``Depends(require_peer)``)."""

MeshClient = Annotated[httpx.AsyncClient, Depends(mesh_client)]
"""The application's mesh client (``Depends(mesh_client)``)."""
