"""FastAPI dependencies: the caller's identity and the mesh client.

::

    @app.get("/orders/{order_id}")
    async def get_order(
        order_id: int,
        caller: Identity = Depends(require_peer),
        client: httpx.AsyncClient = Depends(mesh_client),
    ): ...

Each is an ``async def`` taking the connection, so FastAPI runs it inline (no thread) and it
works for websockets too; Starlette handlers can ``await`` them with the request.
"""

from __future__ import annotations

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from meshware.identity.identity import Identity
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY
from meshware_fastapi.plugin import state_of

__all__ = ["MISSING_IDENTITY", "mesh_client", "peer", "require_peer"]

MISSING_IDENTITY = "a verified peer identity (mTLS) is required"
"""The ``detail`` of the 401 :func:`require_peer` raises for a caller without an identity."""


async def peer(connection: HTTPConnection) -> Identity | None:
    """The caller's verified :class:`~meshware.identity.identity.Identity`, or ``None`` when
    the caller is not authenticated (no client certificate, no trusted XFCC)."""
    identity: Identity | None = connection.scope.get(IDENTITY_KEY)
    return identity


async def require_peer(connection: HTTPConnection) -> Identity:
    """The caller's verified identity; refuses callers without one.

    Raises:
        HTTPException: ``401`` when the caller presented no identity; ``403`` when it
            presented one that was not accepted (an ``x-forwarded-client-cert`` from a peer
            that is not a trusted proxy), the detail naming the reason code.
    """
    identity: Identity | None = connection.scope.get(IDENTITY_KEY)
    if identity is not None:
        return identity
    record = connection.scope.get(RECORD_KEY)
    problem = getattr(record, "identity_error", None)
    if problem is not None:
        raise HTTPException(403, detail=f"peer identity not accepted: {problem}")
    raise HTTPException(401, detail=MISSING_IDENTITY)


async def mesh_client(connection: HTTPConnection) -> httpx.AsyncClient:
    """The application's mesh client (``app.state.meshware.client``): an
    ``httpx.AsyncClient`` that calls other services through the outbound stack, carrying the
    trace context, the ``x-request-id`` and the remaining deadline of this request.

    Raises:
        ConfigurationError: the mesh is not installed on the application.
    """
    return state_of(connection.app).client
