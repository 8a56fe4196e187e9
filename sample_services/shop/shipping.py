"""``shipping``: shipping quotes (Flask), for orders only.

``/api/debug/try-charge`` is the deliberate misuse of the demo: shipping tries to charge a
card on payments through its own mesh client, and payments' authorization refuses it.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from meshware_flask import Meshware, authorize, client

from sample_services.shop.mesh import mesh_settings, principal

RATES = {"FR": 4.9, "DE": 5.9, "GB": 9.9, "PT": 6.9}
"""Per-parcel rates by destination country; anywhere else costs 14.9."""

app = Flask(__name__)
Meshware(app, **mesh_settings("shipping"))


@app.post("/api/quote")
@authorize(principals=[principal("orders")], name="quotes-for-orders")
def quote() -> ResponseReturnValue:
    """The price of shipping ``qty`` items to ``country``."""
    body: dict[str, Any] = request.get_json(force=True)
    parcels = max(1, (int(body.get("qty", 1)) + 2) // 3)
    price = round(RATES.get(str(body.get("country")), 14.9) * parcels, 2)
    return jsonify(price=price, parcels=parcels, carrier="la-poste")


@app.post("/api/debug/try-charge")
@authorize(principals=[principal("frontend")], name="debug-from-frontend")
def try_charge() -> ResponseReturnValue:
    """Try to charge a card from shipping (payments must refuse): payments' answer."""
    response = client().post(
        "http://payments/api/charge",
        json={"user": "alice", "amount": 1.0},
        headers={"idempotency-key": "shipping-misuse"},
    )
    return jsonify(status=response.status_code, body=response.json())
