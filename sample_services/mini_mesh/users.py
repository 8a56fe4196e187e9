"""``users``: a Flask service (WSGI, served by gunicorn)."""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from sample_services.mini_mesh.peer import call_peer

app = Flask(__name__)


@app.get("/hello")
def hello() -> dict[str, Any]:
    identity = request.environ.get("meshware.identity")
    return {
        "service": "users",
        "caller": identity.principal if identity else None,
        "established_by": identity.source if identity else None,
    }


@app.get("/call-peer")
def peer() -> dict[str, Any]:
    return call_peer("users")
