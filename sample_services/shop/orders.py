"""``orders``: places orders (FastAPI), calling users, catalog, payments and shipping.

Every call goes through the mesh client: routed (catalog's canary), retried (payments'
injected faults), balanced, with orders' own certificate and the edge's deadline.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import httpx
import meshware_fastapi
from fastapi import FastAPI, Header, HTTPException
from meshware_fastapi import MeshClient, authorize
from pydantic import BaseModel

from sample_services.shop.mesh import mesh_settings, principal

app = FastAPI(title="orders")
meshware_fastapi.install(app, **mesh_settings("orders"))

ORDERS: dict[str, dict[str, Any]] = {}
_numbers = itertools.count(1)


class OrderRequest(BaseModel):
    """An order: who buys what, how many."""

    user: str
    sku: str
    qty: int = 1


def _upstream(step: str, response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise HTTPException(
            502 if response.status_code >= 500 else 409,
            detail=f"{step} answered {response.status_code}: {response.text[:200]}",
        )
    body: dict[str, Any] = response.json()
    return body


@app.post("/api/orders", status_code=201)
@authorize(principals=[principal("frontend")], name="frontend-places-orders")
async def place_order(
    order: OrderRequest,
    client: MeshClient,
    idempotency_key: str | None = Header(default=None),
) -> dict[str, Any]:
    """Validate the user, check stock, charge, quote shipping; the order as placed."""
    key = idempotency_key or uuid.uuid4().hex
    if key in ORDERS:  # the edge retried: the same order, not a second one
        return ORDERS[key]
    user = _upstream("users", await client.get(f"http://users/api/users/{order.user}"))
    stock = _upstream(
        "catalog", await client.get(f"http://catalog/api/stock/{order.sku}?qty={order.qty}")
    )
    if not stock["available"]:
        raise HTTPException(409, detail=f"{order.sku} is out of stock")
    amount = round(stock["price"] * order.qty, 2)
    quote = _upstream(
        "shipping",
        await client.post(
            "http://shipping/api/quote", json={"country": user["country"], "qty": order.qty}
        ),
    )
    charge = _upstream(
        "payments",
        await client.post(
            "http://payments/api/charge",
            json={"user": order.user, "amount": round(amount + quote["price"], 2)},
            headers={"idempotency-key": f"order-{key}"},
        ),
    )
    placed = {
        "order": f"o-{next(_numbers)}",
        "user": order.user,
        "sku": order.sku,
        "qty": order.qty,
        "amount": amount,
        "shipping": quote["price"],
        "charge": charge["charge"],
    }
    ORDERS[key] = placed
    return placed
