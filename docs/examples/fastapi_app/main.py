"""``orders``, a FastAPI service in the mesh: one line in, policies declared on the routes.

Serve it with mTLS (certificates from ``meshware ca init`` / ``meshware cert issue orders``)::

    MESHWARE_CERT_DIR=.meshware/certs MESHWARE_SERVICE_PAYMENTS=127.0.0.1:8444 \\
        meshware serve fastapi_app.main:app --service orders --port 8443 --app-dir docs/examples

or without a mesh around it, for a quick look: ``uvicorn fastapi_app.main:app`` from
``docs/examples``.
"""

from __future__ import annotations

from typing import Any

import meshware_fastapi
from fastapi import FastAPI, HTTPException, Request
from meshware_fastapi import MeshClient, Peer, RequiredPeer, authorize, rate_limit

FRONTEND = "cluster.local/ns/default/sa/frontend"
CALLEES = frozenset({"orders", "payments", "inventory"})

app = FastAPI(title="orders")
meshware_fastapi.install(
    app,
    service="orders",
    policies=[
        {
            "name": "no-admin",
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        }
    ],
)


@app.get("/api/whoami")
async def whoami(caller: Peer) -> dict[str, Any]:
    """Who called: any caller, verified or not."""
    return {"service": "orders", "caller": caller.principal if caller else None}


@app.get("/api/orders/{order_id}")
@authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads-orders")
async def get_order(order_id: int) -> dict[str, Any]:
    """Only the frontend may read orders."""
    return {"order": order_id, "status": "shipped"}


@app.post("/api/orders")
@rate_limit("2/minute", name="create-order")
async def create_order(caller: RequiredPeer) -> dict[str, Any]:
    """Two orders a minute per caller."""
    return {"created": True, "by": caller.principal}


@app.get("/api/echo")
@authorize(principals=["*"], name="verified-callers-echo")
async def echo(request: Request, caller: RequiredPeer) -> dict[str, Any]:
    """What a verified caller sent: its principal and trace context."""
    return {
        "service": "orders",
        "caller": caller.principal,
        "traceparent": request.headers.get("traceparent"),
        "x-request-id": request.headers.get("x-request-id"),
    }


@app.get("/api/call/{service}")
async def call(service: str, client: MeshClient) -> dict[str, Any]:
    """Call another service's echo through the mesh, with this service's certificate."""
    if service not in CALLEES:
        raise HTTPException(404, detail=f"unknown service {service!r}")
    response = await client.get(f"http://{service}/api/echo")
    return {"status": response.status_code, "callee": response.json()}
