"""``catalog``: products and stock (Flask). v1 and v2 run side by side as a canary.

The version comes from ``MESHWARE_VERSION``; v2 adds recommendations. Every response says
which version served it (``x-served-by``), and calls mirrored here (their ``Host`` ends in
``-shadow``) are counted but change nothing.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue
from meshware_flask import Meshware, authorize

from sample_services.shop.mesh import mesh_settings

VERSION = os.environ.get("MESHWARE_VERSION", "v1")
PRODUCTS: dict[str, dict[str, Any]] = {
    "sku-1": {"sku": "sku-1", "name": "Espresso beans 1 kg", "price": 24.0, "stock": 10**6},
    "sku-2": {"sku": "sku-2", "name": "Hand grinder", "price": 79.0, "stock": 10**6},
    "sku-3": {"sku": "sku-3", "name": "Pour-over kettle", "price": 45.5, "stock": 10**6},
    "sku-4": {"sku": "sku-4", "name": "Ceramic dripper", "price": 19.9, "stock": 10**6},
}
_lock = threading.Lock()
_shadow = {"requests": 0}

app = Flask(__name__)
Meshware(app, **mesh_settings("catalog"))
EVERYONE = ["*"]  # any verified caller of the mesh


@app.after_request
def served_by(response: Any) -> Any:
    response.headers["x-served-by"] = f"catalog-{VERSION}"
    if request.host.split(":")[0].endswith("-shadow"):
        with _lock:
            _shadow["requests"] += 1
    return response


def _product(sku: str) -> dict[str, Any]:
    product = PRODUCTS.get(sku)
    if product is None:
        abort(404)
    if VERSION == "v2":
        others = [other for other in PRODUCTS if other != sku][:2]
        return {**product, "recommended": others, "version": VERSION}
    return {**product, "version": VERSION}


@app.get("/api/products")
@authorize(principals=EVERYONE, name="catalog-readable-by-all")
def list_products() -> ResponseReturnValue:
    """Every product (browsing)."""
    return jsonify(products=[_product(sku) for sku in PRODUCTS], version=VERSION)


@app.get("/api/products/<sku>")
@authorize(principals=EVERYONE, name="catalog-readable-by-all")
def get_product(sku: str) -> ResponseReturnValue:
    """One product (browsing)."""
    return jsonify(_product(sku))


@app.get("/api/stock/<sku>")
@authorize(principals=EVERYONE, name="catalog-readable-by-all")
def stock(sku: str) -> ResponseReturnValue:
    """Whether ``qty`` items of ``sku`` are available (orders asks before charging)."""
    product = _product(sku)
    qty = request.args.get("qty", default=1, type=int)
    return jsonify(sku=sku, available=product["stock"] >= qty, price=product["price"])


@app.get("/api/shadow")
@authorize(principals=EVERYONE, name="catalog-readable-by-all")
def shadow_stats() -> ResponseReturnValue:
    """How many mirrored (shadow) calls this instance received."""
    with _lock:
        return jsonify(version=VERSION, shadow_requests=_shadow["requests"])
