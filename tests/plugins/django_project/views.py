"""Views of every kind: sync and async functions, class-based views, decorated every way."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from meshware_django import authorize, rate_limit

FRONTEND = "cluster.local/ns/default/sa/frontend"


def _caller(request: Any) -> dict[str, Any]:
    identity = request.mesh_identity
    if identity is None:
        return {"caller": None}
    return {"caller": identity.principal, "source": identity.source}


def whoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse(_caller(request))


async def awhoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse({**_caller(request), "async": True})


@authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads")
def order(request: HttpRequest, order_id: int) -> JsonResponse:
    return JsonResponse({"order": order_id})


@rate_limit("2/minute", name="create-order")
def create_order(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"created": True})


FREEZE = {"request.headers[x-freeze]": ["yes"]}


@authorize(principals=[FRONTEND], name="inventory-readers")
@method_decorator(rate_limit("1/minute"), name="post")
@method_decorator([authorize(action="DENY", when=FREEZE), rate_limit("5/minute")], name="delete")
@method_decorator(rate_limit("9/minute", name="deletes-hourly"), name="delete")
class InventoryView(View):
    """Class-level policy; method_decorator limits on post and delete (several, stacked and
    in a list); a direct limit on put."""

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"items": ["bolt", "nut"], **_caller(request)})

    def post(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"restocked": True})

    @rate_limit("3/minute", name="replace-inventory")
    def put(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"replaced": True})

    def delete(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"emptied": True})


class AsyncItemView(View):
    """An async class-based view with a method-level policy."""

    @authorize(principals=[FRONTEND], name="item-readers")
    async def get(self, request: HttpRequest, item: str) -> JsonResponse:
        return JsonResponse({"item": item, **_caller(request)})


def call(request: Any) -> JsonResponse:
    response = request.mesh_client.get("http://echo/headers")
    return JsonResponse(response.json())


async def acall(request: Any) -> JsonResponse:
    response = await request.mesh_async_client.get("http://echo/headers")
    return JsonResponse(response.json())
