"""``users``: shoppers and their addresses (FastAPI). Only orders and users read them."""

from __future__ import annotations

import os
from typing import Any

import meshware_fastapi
from fastapi import FastAPI, HTTPException
from meshware_fastapi import authorize

from meshware.policy.jwt import JwtRule
from sample_services.shop.mesh import ADMIN_ISSUER, mesh_settings, principal

USERS: dict[str, dict[str, Any]] = {
    "alice": {"id": "alice", "name": "Alice Martin", "country": "FR", "tier": "gold"},
    "bob": {"id": "bob", "name": "Bob Jones", "country": "GB", "tier": "standard"},
    "chen": {"id": "chen", "name": "Chen Wei", "country": "DE", "tier": "standard"},
    "dana": {"id": "dana", "name": "Dana Silva", "country": "PT", "tier": "gold"},
    "tester": {"id": "tester", "name": "QA Tester", "country": "FR", "tier": "staff"},
}

ADMIN_JWT = JwtRule(issuer=ADMIN_ISSUER, jwks_file=os.environ.get("SHOP_JWKS_FILE", "jwks.json"))

app = FastAPI(title="users")
meshware_fastapi.install(app, **mesh_settings("users", jwt_rules=[ADMIN_JWT]))


@app.get("/api/users/{user_id}")
@authorize(
    action="DENY",
    not_principals=[principal("orders"), principal("users")],
    name="user-details-only-for-orders-and-users",
)
async def get_user(user_id: str) -> dict[str, Any]:
    """One shopper: orders validates the buyer with it."""
    user = USERS.get(user_id)
    if user is None:
        raise HTTPException(404, detail=f"no user {user_id!r}")
    return user


@app.get("/admin/users")
@authorize(action="DENY", not_request_principals=[f"{ADMIN_ISSUER}/*"], name="admin-needs-jwt")
async def list_users() -> dict[str, Any]:
    """Every shopper: for administrators holding a token of the shop's issuer."""
    return {"users": sorted(USERS)}
