"""Views of ``payments``. Only ``orders`` may charge; a charge is made once per key.

The card processor behind payments is flaky on purpose: ``SHOP_PAYMENTS_FAILURE_RATE`` (0 to 1)
of the charges fail with ``503`` *before* anything is recorded, as a processor outage would,
so the caller may safely try again with the same ``Idempotency-Key``.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from meshware_django import authorize

from sample_services.shop.mesh import data_dir, principal

FAILURE_RATE = float(os.environ.get("SHOP_PAYMENTS_FAILURE_RATE", "0"))
_rng = random.Random()
_lock = threading.Lock()
_db = sqlite3.connect(data_dir() / "payments.sqlite3", check_same_thread=False)
_db.execute("PRAGMA journal_mode=WAL")
_db.execute("PRAGMA synchronous=NORMAL")  # a demo: durability across power loss is not the point
_db.execute(
    "CREATE TABLE IF NOT EXISTS charges ("
    " key TEXT PRIMARY KEY, charge TEXT NOT NULL, user TEXT NOT NULL, amount REAL NOT NULL)"
)
_db.commit()


def _row(key: str) -> dict[str, Any] | None:
    found = _db.execute("SELECT charge, user, amount FROM charges WHERE key = ?", (key,)).fetchone()
    if found is None:
        return None
    return {"charge": found[0], "user": found[1], "amount": found[2], "key": key}


@csrf_exempt
@authorize(
    action="DENY",
    not_principals=[principal("orders")],
    methods=["POST"],
    name="charge-only-from-orders",
)
def charge(request: HttpRequest) -> JsonResponse:
    """Charge ``amount`` to ``user``; the same ``Idempotency-Key`` returns the same charge."""
    if request.method != "POST":
        return JsonResponse({"detail": "POST a charge"}, status=405)
    key = request.headers.get("idempotency-key")
    if not key:
        return JsonResponse({"detail": "an Idempotency-Key header is required"}, status=400)
    with _lock:
        existing = _row(key)
        if existing is not None:
            return JsonResponse({**existing, "replayed": True})
        if FAILURE_RATE and _rng.random() < FAILURE_RATE:
            return JsonResponse({"detail": "card processor unavailable"}, status=503)
        body = json.loads(request.body or b"{}")
        number = _db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] + 1
        _db.execute(
            "INSERT INTO charges (key, charge, user, amount) VALUES (?, ?, ?, ?)",
            (key, f"ch-{number}", str(body.get("user")), float(body.get("amount", 0))),
        )
        _db.commit()
        created = _row(key)
    return JsonResponse({**(created or {}), "replayed": False}, status=201)


@authorize(principals=[principal("orders")], name="charges-readable-by-orders")
def get_charge(request: HttpRequest, key: str) -> JsonResponse:
    """One charge, by its idempotency key."""
    with _lock:
        found = _row(key)
    if found is None:
        return JsonResponse({"detail": f"no charge {key!r}"}, status=404)
    return JsonResponse(found)
