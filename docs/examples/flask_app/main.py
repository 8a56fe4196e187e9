"""``payments``, a Flask service in the mesh: one line in, policies declared on the views.

Serve it with mTLS (certificates from ``meshware ca init`` / ``meshware cert issue payments``)::

    MESHWARE_CERT_DIR=.meshware/certs MESHWARE_SERVICE_INVENTORY=127.0.0.1:8445 \\
        meshware serve flask_app.main:app --service payments --port 8444 \\
        --app-dir docs/examples

or without a mesh around it: ``flask --app flask_app.main run`` from ``docs/examples``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, g, jsonify, request
from meshware_flask import Meshware, authorize, client, current_identity, rate_limit

FRONTEND = "cluster.local/ns/default/sa/frontend"
CALLEES = frozenset({"orders", "payments", "inventory"})

app = Flask(__name__)
app.config["MESHWARE_POLICIES"] = [
    {
        "name": "no-admin",
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
    }
]
Meshware(app, service="payments")


@app.get("/api/whoami")
def whoami() -> Any:
    """Who called: any caller, verified or not."""
    caller = current_identity()
    return jsonify(service="payments", caller=caller.principal if caller else None)


@app.get("/api/orders/<int:order_id>")
@authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads-payments")
def get_payment(order_id: int) -> Any:
    """Only the frontend may read payments."""
    return jsonify(order=order_id, status="paid")


@app.post("/api/orders")
@rate_limit("2/minute", name="create-order")
def create_payment() -> Any:
    """Two payments a minute per caller."""
    caller = g.mesh_identity
    if caller is None:
        abort(401)
    return jsonify(created=True, by=caller.principal)


@app.get("/api/echo")
@authorize(principals=["*"], name="verified-callers-echo")
def echo() -> Any:
    """What a verified caller sent: its principal and trace context."""
    return jsonify(
        service="payments",
        caller=g.mesh_identity.principal,
        traceparent=request.headers.get("traceparent"),
        **{"x-request-id": request.headers.get("x-request-id")},
    )


@app.get("/api/call/<service>")
def call(service: str) -> Any:
    """Call another service's echo through the mesh, with this service's certificate."""
    if service not in CALLEES:
        abort(404)
    response = client().get(f"http://{service}/api/echo")
    return jsonify(status=response.status_code, callee=response.json())
