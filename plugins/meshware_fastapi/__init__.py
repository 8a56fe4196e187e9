"""meshware for FastAPI and Starlette: one line turns the mesh on, both ways.

::

    from fastapi import Depends, FastAPI
    import meshware_fastapi
    from meshware_fastapi import authorize, mesh_client, rate_limit, require_peer

    app = FastAPI()
    meshware_fastapi.install(app, service="orders")

See ``docs/fastapi.md``.
"""

from __future__ import annotations

from meshware.policy.authz import authorize
from meshware.policy.ratelimit import rate_limit
from meshware_fastapi.dependencies import MISSING_IDENTITY, mesh_client, peer, require_peer
from meshware_fastapi.plugin import MeshwareMiddleware, MeshwareState, install, state_of

__all__ = [
    "MISSING_IDENTITY",
    "MeshwareMiddleware",
    "MeshwareState",
    "authorize",
    "install",
    "mesh_client",
    "peer",
    "rate_limit",
    "require_peer",
    "state_of",
]
