"""Views of ``inventory``: function views, a class-based view, sync and async."""

from __future__ import annotations

from typing import Any

from django.http import Http404, HttpRequest, JsonResponse
from django.views import View
from meshware_django import authorize, rate_limit

FRONTEND = "cluster.local/ns/default/sa/frontend"
CALLEES = frozenset({"orders", "payments", "inventory"})


def whoami(request: Any) -> JsonResponse:
    """Who called: any caller, verified or not."""
    caller = request.mesh_identity
    return JsonResponse({"service": "inventory", "caller": caller.principal if caller else None})


@authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads-stock")
def stock(request: HttpRequest, order_id: int) -> JsonResponse:
    """Only the frontend may read stock."""
    return JsonResponse({"order": order_id, "status": "in stock"})


class OrdersView(View):
    """Reserving stock: two reservations a minute per caller."""

    @rate_limit("2/minute", name="create-order")
    def post(self, request: Any) -> JsonResponse:
        caller = request.mesh_identity
        if caller is None:
            return JsonResponse({"detail": "a verified peer identity is required"}, status=401)
        return JsonResponse({"created": True, "by": caller.principal})


@authorize(principals=["*"], name="verified-callers-echo")
async def echo(request: Any) -> JsonResponse:
    """What a verified caller sent: its principal and trace context (an async view)."""
    return JsonResponse(
        {
            "service": "inventory",
            "caller": request.mesh_identity.principal,
            "traceparent": request.headers.get("traceparent"),
            "x-request-id": request.headers.get("x-request-id"),
        }
    )


def call(request: Any, service: str) -> JsonResponse:
    """Call another service's echo through the mesh, with this service's certificate."""
    if service not in CALLEES:
        raise Http404(service)
    response = request.mesh_client.get(f"http://{service}/api/echo")
    return JsonResponse({"status": response.status_code, "callee": response.json()})
