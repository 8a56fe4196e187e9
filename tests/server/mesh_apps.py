"""Services for the inbound-stack integration tests: a Starlette and a Flask app, each under
the full inbound stack built from code, configured through environment variables so that
``meshware serve`` can import them in a separate process:

- ``MESH_TEST_BUNDLE``: the trust bundle file;
- ``MESH_TEST_RATE``: the per-caller rate limit (default ``5/minute``);
- ``MESH_TEST_BACKEND``: the rate-limit backend URL (default ``memory://``).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshware.inbound.asgi.stack import build_asgi_stack
from meshware.inbound.routes import FlaskRoutes, StarletteRoutes
from meshware.inbound.stack import InboundConfig
from meshware.inbound.wsgi.stack import build_wsgi_stack
from meshware.policy.authz import AuthorizationPolicy
from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule

POLICY = AuthorizationPolicy.from_mapping(
    "catalog-readers",
    {
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/default/sa/users"]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
            }
        ],
    },
)


def _config(routes: Any) -> InboundConfig:
    return InboundConfig(
        service="catalog",
        bundle=os.environ["MESH_TEST_BUNDLE"],
        policies=(POLICY,),
        rate_limit=RateLimitPolicy(
            rules=(
                RateLimitRule(
                    name="per-caller",
                    rate=os.environ.get("MESH_TEST_RATE", "5/minute"),
                    key="principal",
                ),
            ),
            backend=os.environ.get("MESH_TEST_BACKEND", "memory://"),
        ),
        routes=routes,
    )


async def item(req: Request) -> JSONResponse:
    identity = req.scope.get("meshware.identity")
    return JSONResponse({"item": req.path_params["item_id"], "caller": identity.principal})


_starlette = Starlette(routes=[Route("/api/items/{item_id}", item)])
asgi_stack = build_asgi_stack(_starlette, _config(StarletteRoutes(_starlette)))

_flask = Flask(__name__)


@_flask.get("/api/items/<item_id>")
def flask_item(item_id: str) -> dict[str, Any]:
    identity = request.environ.get("meshware.identity")
    return {"item": item_id, "caller": identity.principal, "pid": os.getpid()}


wsgi_stack = build_wsgi_stack(_flask, _config(FlaskRoutes(_flask)))
