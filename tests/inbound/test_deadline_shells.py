"""The deadline middleware through both shells: the app sees what the caller has left."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.inbound import asgi, wsgi
from meshware.inbound.record import RequestRecord, record_of
from meshware.outbound.deadline import TIMEOUT_HEADER, current_deadline


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def remaining() -> float | None:
    deadline = current_deadline()
    return None if deadline is None else deadline.remaining()


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps({"remaining": remaining()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [])
    return [json.dumps({"remaining": remaining()}).encode()]


class Shell:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module: Any = asgi if kind == "asgi" else wsgi
        self.clock = FakeClock()
        self.records: list[RequestRecord] = []
        self.app: Any = None

    def build(self, app: Any = None, **options: Any) -> Shell:
        inner = app or (asgi_app if self.kind == "asgi" else wsgi_app)
        self.app = self.module.DeadlineMiddleware(inner, clock=self.clock, **options)
        return self

    def server(self) -> Any:
        inner = self.app
        if self.kind == "asgi":

            async def asgi_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                self.records.append(record_of(scope))
                await inner(scope, receive, send)

            return asgi_server

        def wsgi_server(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            self.records.append(record_of(environ))
            return inner(environ, start_response)  # type: ignore[no-any-return]

        return wsgi_server

    async def request(self, timeout: str | None = None) -> httpx.Response:
        headers = {} if timeout is None else {TIMEOUT_HEADER: timeout}
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=self.server())
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.get("/", headers=headers)
        with httpx.Client(
            transport=httpx.WSGITransport(app=self.server()), base_url="http://orders"
        ) as sync_client:
            return sync_client.get("/", headers=headers)


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest) -> Shell:
    return Shell(request.param)


@pytest.mark.parametrize(
    ("header", "options", "expected"),
    [
        ("1500m", {}, 1.5),
        ("2S", {"default_timeout": 30.0}, 2.0),
        ("250000u", {"max_timeout": 10.0}, 0.25),
        ("10M", {"max_timeout": 10.0}, 10.0),  # clamped
        (None, {"default_timeout": 5.0}, 5.0),
        (None, {}, None),
        ("0n", {}, 0.0),
    ],
)
async def test_the_app_sees_the_remaining_time(
    shell: Shell, header: str | None, options: dict[str, Any], expected: float | None
) -> None:
    shell.build(**options)

    response = await shell.request(header)

    assert response.status_code == 200
    assert response.json() == {"remaining": expected}
    # The deadline belonged to the request: nothing is left set afterwards.
    assert current_deadline() is None


async def test_time_passing_is_measured_on_the_clock(shell: Shell) -> None:
    def later(*args: Any) -> Any:
        shell.clock.now += 0.4  # the handler works for 400 ms before calling out
        return (asgi_app if shell.kind == "asgi" else wsgi_app)(*args)

    shell.build(app=later)

    response = await shell.request("1S")

    assert response.json()["remaining"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("header", "reason", "detail"),
    [
        (
            "abc",
            "bad-unit",
            "invalid x-meshware-timeout header 'abc': unit 'c' is not one of H, M, S, m, u, n; "
            "expected 1-8 ASCII digits followed by a unit H, M, S, m, u or n (e.g. '2500m') "
            "[bad-unit]",
        ),
        (
            "100",
            "missing-unit",
            "invalid x-meshware-timeout header '100': expected 1-8 ASCII digits followed by a "
            "unit H, M, S, m, u or n (e.g. '2500m') [missing-unit]",
        ),
        (
            "123456789S",
            "too-many-digits",
            "invalid x-meshware-timeout header '123456789S': 9 digits, at most 8 allowed "
            "[too-many-digits]",
        ),
    ],
)
async def test_a_malformed_header_gets_400(
    shell: Shell, header: str, reason: str, detail: str
) -> None:
    shell.build(default_timeout=1.0)

    response = await shell.request(header)

    assert response.status_code == 400
    assert response.json() == {
        "status": 400,
        "error": "bad_request",
        "detail": detail,
        "reason": reason,
    }
    assert shell.records[-1].extra == {"deadline_error": reason}


async def test_the_first_of_repeated_headers_counts(shell: Shell) -> None:
    shell.build()
    if shell.kind == "asgi":
        transport = httpx.ASGITransport(app=shell.server())
        async with httpx.AsyncClient(transport=transport, base_url="http://o") as client:
            headers = [(TIMEOUT_HEADER, "3S"), (TIMEOUT_HEADER, "9S")]
            response = await client.get("/", headers=headers)
    else:
        # WSGI servers join repeated fields into one value (httpx's test transport does not).
        response = await shell.request("3S, 9S")

    assert response.json() == {"remaining": 3.0}


async def test_a_streaming_wsgi_response_keeps_its_deadline_until_closed() -> None:
    shell = Shell("wsgi")
    closed: list[float | None] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            for _ in range(3):
                # Each chunk is produced while the server iterates, after the app returned.
                yield f"{remaining()};".encode()

        def close(self) -> None:
            closed.append(remaining())

    def streaming(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    shell.build(app=streaming)

    response = await shell.request("2S")

    assert response.text == "2.0;2.0;2.0;"
    assert closed == [2.0]  # the app's own close still runs inside the deadline
    assert current_deadline() is None


async def test_a_wsgi_app_that_raises_leaves_no_deadline_behind() -> None:
    shell = Shell("wsgi")

    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    shell.build(app=broken)

    with pytest.raises(RuntimeError, match="boom"):
        await shell.request("2S")

    assert current_deadline() is None


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"default_timeout": 0}, "default_timeout", "expected a positive, finite number"),
        ({"max_timeout": -1.0}, "max_timeout", "expected a positive, finite number"),
        ({"max_timeout": float("inf")}, "max_timeout", "expected a positive, finite number"),
        ({"default_timeout": True}, "default_timeout", "expected a positive, finite number"),
        (
            {"default_timeout": 30.0, "max_timeout": 10.0},
            "default_timeout",
            "expected at most max_timeout (10 s)",
        ),
        ({"clock": 5}, "clock", "expected a callable"),
    ],
)
def test_bad_arguments(kind: str, options: dict[str, Any], field: str, message: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi

    with pytest.raises(ConfigurationError) as caught:
        module.DeadlineMiddleware(asgi_app, **options)

    assert caught.value.field == field
    assert message in str(caught.value)


async def test_lifespan_and_websockets_pass_through() -> None:
    seen: list[tuple[str, float | None]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["type"], remaining()))

    middleware = asgi.DeadlineMiddleware(app, default_timeout=1.0)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await middleware({"type": "websocket", "headers": []}, None, None)  # type: ignore[arg-type]

    assert seen == [("lifespan", None), ("websocket", None)]
