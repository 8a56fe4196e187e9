"""``MeshwareMiddleware``: the mesh inside Django, for sync and async requests alike.

The work is split by who knows what:

- **The server-level stack** knows the connection: telemetry, ``/livez`` ``/readyz``
  ``/metrics``, deadlines, the caller's identity (from the TLS connection or a trusted
  proxy's XFCC) and JWT. It runs around Django: ``meshware serve`` puts it there (serve
  ``meshware_django.get_wsgi_application()`` to have it built from ``MESHWARE``, or Django's
  own application for a stack built from ``meshware serve``'s options).
- **This middleware** knows the view: in ``process_view`` it applies the service-wide
  authorization policies and rate limits together with the view's own ``@authorize`` and
  ``@rate_limit`` declarations, and it puts the caller's identity on
  ``request.mesh_identity`` and the mesh clients on ``request.mesh_client`` (and, on async
  requests, ``request.mesh_async_client``).

When no stack ran around Django (``manage.py runserver``, Django's test ``Client``, another
server), the middleware runs the server-level layers itself, around the rest of Django, so a
service behaves the same however it is served.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.http import HttpResponse  # type: ignore[import-untyped]

from meshware.exceptions import ConfigurationError
from meshware.inbound.facts import facts_from_environ, facts_from_scope
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY, RequestRecord, record_of
from meshware.policy.paths import InvalidPath
from meshware_django.conf import DjangoMesh, ViewPlan, mesh

if TYPE_CHECKING:
    from meshware.policy.facts import RequestFacts
    from meshware.policy.ratelimit import RateLimitDecision
    from meshware.types import Message, Receive, Scope, Send

__all__ = ["MeshwareMiddleware"]

# Per-request notes in the environ / scope, removed before the response leaves Django.
_REQUEST: Final = "meshware.django.request"
_RESPONSE: Final = "meshware.django.response"
_SENT: Final = "meshware.django.headers"
_FIELDS: Final = "meshware.django.fields"
_VIEWED: Final = "meshware.django.viewed"

Carrier = MutableMapping[str, Any]
View = Callable[..., Any]


def _json(status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    response = HttpResponse(body, status=status, content_type="application/json")
    for name, value in headers:
        response[name] = value
    return response


def _stack_answer(status: int, headers: Iterable[tuple[str, str]], body: bytes) -> HttpResponse:
    """A response the stack gave itself (a probe, a scrape, a refusal) as Django's."""
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    return response


def _add_headers(
    response: HttpResponse, sent: Iterable[tuple[str, str]], final: Iterable[tuple[str, str]]
) -> None:
    """Copy onto ``response`` the header fields the stack's layers added (``x-request-id``)."""
    before = set(sent)
    for name, value in final:
        if (name, value) not in before:
            response[name] = value


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _discard(data: bytes) -> None:
    raise RuntimeError("the mesh stack around Django does not write()")


async def _no_body() -> Message:
    # Django has read the body already; the layers never do.
    return {"type": "http.request", "body": b"", "more_body": False}


def _carrier(request: Any) -> tuple[Carrier, bool]:
    """The request's ASGI scope or WSGI environ, and whether it is a scope."""
    scope = getattr(request, "scope", None)
    if isinstance(scope, MutableMapping):
        return scope, True
    return request.META, False


class MeshwareMiddleware:
    """Django middleware applying the mesh's per-view policies; sync and async capable.

    List it first in ``MIDDLEWARE``, so that refused requests cost nothing else and every
    request is measured::

        MIDDLEWARE = ["meshware_django.middleware.MeshwareMiddleware", ...]

    For each request it:

    1. runs the server-level stack itself when none ran around Django (see the module docs);
    2. sets ``request.mesh_identity`` (the caller's verified
       :class:`~meshware.identity.identity.Identity`, or ``None``), ``request.mesh_client``
       (the process's ``httpx.Client``) and, on async requests,
       ``request.mesh_async_client`` (the event loop's ``httpx.AsyncClient``);
    3. in ``process_view``, labels the request with the view's route (``/orders/<int:id>``)
       and decides with the service-wide policies and rate limits (``MESHWARE["POLICIES"]``,
       ``MESHWARE["RATE_LIMIT"]``) plus the view's own declarations: ``403`` with Istio's
       ``RBAC: access denied`` body, ``429`` with ``Retry-After`` and the
       ``RateLimit-Policy`` / ``RateLimit`` fields, or the view runs and its response gets
       those fields;
    4. applies the service-wide policies and limits to requests that reach no view (a 404,
       a redirect by ``CommonMiddleware``) too, so an unknown path is no way around them.

    Args:
        get_response: the rest of Django, sync or async.

    Raises:
        ImproperlyConfigured: a setting is unknown, missing or invalid (``manage.py check``
            names it first).
    """

    sync_capable = True
    async_capable = True

    process_view: Callable[[Any, View, tuple[Any, ...], dict[str, Any]], Any]
    """``process_view(request, view, args, kwargs)``: a coroutine function when the
    middleware serves async requests, so Django never runs it in a thread."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        try:
            self.mesh: DjangoMesh = mesh()
        except ConfigurationError as exc:
            raise ImproperlyConfigured(f"meshware: {exc}") from exc
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
            self.process_view = self._process_view_async
        else:
            self.process_view = self._process_view_sync
        self._wsgi: Callable[..., Iterable[bytes]] | None = None
        self._asgi: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    # -- entry ----------------------------------------------------------------------------------

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        carrier, is_scope = _carrier(request)
        if RECORD_KEY in carrier:
            return self._respond(request, carrier)
        if is_scope:  # an ASGI request in a sync chain (a sync-only middleware after this one)
            return async_to_sync(self._through_asgi_stack)(request, carrier)
        return self._through_wsgi_stack(request, request.META)

    async def __acall__(self, request: Any) -> Any:
        carrier, is_scope = _carrier(request)
        if RECORD_KEY in carrier or not is_scope:
            return await self._arespond(request, carrier)
        return await self._through_asgi_stack(request, carrier)

    # -- the Django side ------------------------------------------------------------------------

    def _respond(self, request: Any, carrier: Carrier) -> Any:
        request.mesh_identity = carrier.get(IDENTITY_KEY)
        request.mesh_client = self.mesh.client()
        response = self.get_response(request)
        if _VIEWED not in carrier and self.mesh.guards_unrouted:
            refused = self._decide(request, carrier, None)
            if refused is not None:
                return refused
        return self._finish(carrier, response)

    async def _arespond(self, request: Any, carrier: Carrier) -> Any:
        request.mesh_identity = carrier.get(IDENTITY_KEY)
        request.mesh_client = self.mesh.client()
        request.mesh_async_client = self.mesh.async_client()
        response = await self.get_response(request)
        if _VIEWED not in carrier and self.mesh.guards_unrouted:
            refused = await self._adecide(request, carrier, None)
            if refused is not None:
                return refused
        return self._finish(carrier, response)

    @staticmethod
    def _finish(carrier: Carrier, response: Any) -> Any:
        carrier.pop(_VIEWED, None)
        fields = carrier.pop(_FIELDS, None)
        if fields:
            for name, value in fields:
                response[name] = value
        return response

    def _process_view_sync(
        self, request: Any, view: View, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> HttpResponse | None:
        carrier, _ = _carrier(request)
        return self._decide(request, carrier, view)

    async def _process_view_async(
        self, request: Any, view: View, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> HttpResponse | None:
        carrier, _ = _carrier(request)
        return await self._adecide(request, carrier, view)

    def _prepare(
        self, request: Any, carrier: Carrier, view: View | None
    ) -> tuple[ViewPlan, RequestRecord]:
        plan = self.mesh.view_plan(view, request.method)
        record = record_of(carrier)
        if view is not None:
            carrier[_VIEWED] = True
            match = getattr(request, "resolver_match", None)
            route = getattr(match, "route", None)
            if route:
                record.route = route if route.startswith("^") else "/" + route
        return plan, record

    @staticmethod
    def _facts(carrier: Carrier, record: RequestRecord, headers: bool) -> RequestFacts:
        if "type" in carrier and "headers" in carrier:
            return facts_from_scope(carrier, record, headers=headers)
        return facts_from_environ(carrier, record, headers=headers)

    def _authorize(self, plan: ViewPlan, carrier: Carrier, record: RequestRecord) -> Any:
        if plan.authorizer is None:
            return None
        core = self.mesh.authz
        facts = self._facts(carrier, record, plan.authz_headers)
        try:
            core.normalize(facts.path)
        except InvalidPath as exc:
            return _json(400, core.invalid_path(record, exc))
        denied = core.decided(record, plan.authorizer.decide(facts))
        return None if denied is None else _json(403, denied)

    def _limited(self, carrier: Carrier, record: RequestRecord, decision: RateLimitDecision) -> Any:
        verdict = self.mesh.limiter.decided(record, decision)
        if isinstance(verdict, tuple):
            status, body, headers = verdict
            return _json(status, body, headers)
        if verdict:
            carrier[_FIELDS] = verdict
        return None

    def _decide(self, request: Any, carrier: Carrier, view: View | None) -> HttpResponse | None:
        plan, record = self._prepare(request, carrier, view)
        refused = self._authorize(plan, carrier, record)
        if refused is not None or not plan.limited:
            return refused
        facts = self._facts(carrier, record, plan.limit_headers)
        decision = self.mesh.limiter.limiter.decide(facts, route_rules=plan.rules)
        return self._limited(carrier, record, decision)

    async def _adecide(
        self, request: Any, carrier: Carrier, view: View | None
    ) -> HttpResponse | None:
        plan, record = self._prepare(request, carrier, view)
        refused = self._authorize(plan, carrier, record)
        if refused is not None or not plan.limited:
            return refused
        facts = self._facts(carrier, record, plan.limit_headers)
        decision = await self.mesh.limiter.limiter.decide_async(facts, route_rules=plan.rules)
        return self._limited(carrier, record, decision)

    # -- the server-level stack, when none ran around Django -------------------------------------

    def _through_wsgi_stack(self, request: Any, environ: dict[str, Any]) -> Any:
        stack = self._wsgi
        if stack is None:
            stack = self._wsgi = self.mesh.wsgi_stack(self._inner_wsgi)
        started: list[Any] = [None, ()]

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            started[0], started[1] = status, headers
            return _discard

        environ[_REQUEST] = request
        try:
            body = stack(environ, start_response)
        finally:
            environ.pop(_REQUEST, None)
        response = environ.pop(_RESPONSE, None)
        sent = environ.pop(_SENT, ())
        if response is None:
            try:
                content = b"".join(body)
            finally:
                _close(body)
            status = str(started[0] or "500")
            return _stack_answer(int(status[:3]), started[1], content)
        _add_headers(response, sent, started[1])
        if response.streaming and not getattr(response, "is_async", False):
            # The telemetry layer counts the bytes as they stream, and finishes when Django
            # closes the response.
            response.streaming_content = body
            return response
        try:
            for _ in body:
                pass
        finally:
            _close(body)
        return response

    def _inner_wsgi(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = environ[_REQUEST]
        response = environ[_RESPONSE] = self._respond(request, environ)
        headers = list(response.items())
        environ[_SENT] = tuple(headers)
        start_response(f"{response.status_code} {response.reason_phrase}", headers)
        if not response.streaming:
            return [response.content]
        if getattr(response, "is_async", False):
            return []
        content: Iterator[bytes] = response.streaming_content
        return content

    async def _through_asgi_stack(self, request: Any, scope: Carrier) -> Any:
        stack = self._asgi
        if stack is None:
            stack = self._asgi = self.mesh.asgi_stack(self._inner_asgi)
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        scope[_REQUEST] = request
        try:
            await stack(scope, _no_body, send)
        finally:
            scope.pop(_REQUEST, None)
        response = scope.pop(_RESPONSE, None)
        sent = scope.pop(_SENT, ())
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in started.get("headers", ())
        ]
        if response is None:
            return _stack_answer(int(started.get("status", 500)), headers, b"".join(chunks))
        _add_headers(response, sent, headers)
        return response

    async def _inner_asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = scope[_REQUEST]
        if self._async:
            response = await self._arespond(request, scope)
        else:
            response = await sync_to_async(functools.partial(self._respond, request, scope))()
        scope[_RESPONSE] = response
        headers = list(response.items())
        scope[_SENT] = tuple(headers)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        # A streaming body is Django's to send; the layers see its status and headers.
        body = b"" if response.streaming else response.content
        await send({"type": "http.response.body", "body": body})
