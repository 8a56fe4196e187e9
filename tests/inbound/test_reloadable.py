"""ReloadableStack / ReloadableWsgiStack: swaps, what carries over, requests in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from meshware.config import load_config
from meshware.exceptions import ConfigurationError
from meshware.inbound.reloadable import ReloadableStack, ReloadableWsgiStack
from meshware.inbound.stack import InboundConfig
from meshware.state.memory import MemoryBackend

ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-{name}}}
spec:
  rules:
  - to:
    - operation: {{paths: ["/{name}"]}}
---
apiVersion: meshware.dev/v1alpha1
kind: RateLimit
metadata: {{name: rl}}
spec:
  backend: {backend}
  rules:
  - {{name: per-ip, rate: {rate}, key: client_ip}}
"""


def inbound(name: str, *, rate: str = "3/minute", backend: str = "memory://") -> InboundConfig:
    text = ALLOW.format(name=name, rate=rate, backend=backend)
    return load_config(text=text, service="catalog").inbound_config(access_log=False)


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


class _AsyncWsgi(httpx.AsyncBaseTransport):
    def __init__(self, app: Any) -> None:
        self._inner = httpx.WSGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._inner.handle_request(request)
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.read()
        )


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(kind: str, config: InboundConfig) -> Any:
    if kind == "asgi":
        return ReloadableStack(asgi_app, config)
    return ReloadableWsgiStack(wsgi_app, config)


def client(kind: str, stack: Any) -> httpx.AsyncClient:
    transport: httpx.AsyncBaseTransport = (
        httpx.ASGITransport(stack) if kind == "asgi" else _AsyncWsgi(stack)
    )
    return httpx.AsyncClient(transport=transport, base_url="http://catalog")


async def test_swap_changes_decisions(kind: str) -> None:
    stack = make(kind, inbound("a"))
    async with client(kind, stack) as http:
        assert (await http.get("/a")).status_code == 200
        assert (await http.get("/b")).status_code == 403
        stack.swap(inbound("b"))
        assert (await http.get("/a")).status_code == 403
        assert (await http.get("/b")).status_code == 200
    assert stack.generation == 2
    assert [p.name for p in stack.config.policies] == ["allow-b"]


async def test_long_lived_parts_carry_over(kind: str) -> None:
    first = inbound("a")
    stack = make(kind, first)
    stack.health.mark_draining()
    stack.swap(inbound("a"))
    assert stack.current.metrics is first.metrics
    assert stack.current.health is first.health
    async with client(kind, stack) as http:
        ready = await http.get("/readyz")
    assert ready.status_code == 503  # draining survived the swap


async def test_rate_limit_buckets_survive_a_swap(kind: str) -> None:
    stack = make(kind, inbound("a", rate="3/minute"))
    async with client(kind, stack) as http:
        assert [(await http.get("/a")).status_code for _ in range(2)] == [200, 200]
        before = stack.limiter.backend
        stack.swap(inbound("a", rate="3/minute"))
        assert stack.limiter.backend is before
        assert [(await http.get("/a")).status_code for _ in range(2)] == [200, 429]
        # Another backend URL: a backend of its own, with fresh buckets.
        stack.swap(inbound("a", rate="3/minute", backend="memory://?max_keys=100"))
        assert stack.limiter.backend is not before
        assert (await http.get("/a")).status_code == 200
    assert set(stack.backends) == {"memory://", "memory://?max_keys=100"}
    assert all(isinstance(b, MemoryBackend) for b in stack.backends.values())


async def test_prepare_builds_without_serving() -> None:
    stack = ReloadableStack(asgi_app, inbound("a"))
    old = stack.current
    commit = stack.prepare(inbound("b"))
    assert stack.current is old
    commit()
    assert stack.current is not old


async def test_request_in_flight_finishes_on_the_old_stack() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        await asgi_app(scope, receive, send)

    stack = ReloadableStack(slow, inbound("a"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(stack), base_url="http://catalog"
    ) as http:
        pending = asyncio.ensure_future(http.get("/a"))
        await entered.wait()
        stack.swap(inbound("b"))
        refused = await http.get("/a")
        release.set()
        finished = await pending
    assert finished.status_code == 200
    assert refused.status_code == 403


def test_a_bad_config_keeps_the_current_stack() -> None:
    stack = ReloadableStack(asgi_app, inbound("a"))
    old = stack.current
    with pytest.raises(ConfigurationError, match="config: expected an InboundConfig"):
        stack.swap("not a config")  # type: ignore[arg-type]
    assert stack.current is old
    assert stack.generation == 1


async def test_close_releases_the_backends() -> None:
    stack = ReloadableStack(asgi_app, inbound("a"))
    await stack.aclose()
    assert stack.backends == {}
    wsgi = ReloadableWsgiStack(wsgi_app, inbound("a"))
    wsgi.close()
    assert wsgi.backends == {}


def test_marked_as_a_stack_for_serve() -> None:
    stack = ReloadableWsgiStack(wsgi_app, inbound("a"))
    assert stack.__meshware_stack__ is True
    assert stack.resolver is None
    assert "ReloadableWsgiStack generation 1" in repr(stack)
