from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.inbound.asgi.health import HealthMiddleware as AsgiHealth
from meshware.inbound.health import (
    CheckResult,
    HealthChecks,
    HealthResponder,
    HealthState,
    wants_verbose,
)
from meshware.inbound.wsgi.health import HealthMiddleware as WsgiHealth
from meshware.inbound.wsgi.health import gunicorn_hooks

NOON = 1714564800.25  # 2024-05-01T12:00:00.250Z
NOON_ISO = "2024-05-01T12:00:00.250Z"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_checks(**kwargs: Any) -> HealthChecks:
    kwargs.setdefault("wall_clock", lambda: NOON)
    return HealthChecks(**kwargs)


class Harness:
    """One shell (ASGI or WSGI) around an inner app that records what reaches it."""

    def __init__(self, shell: str, checks: HealthChecks, **kwargs: Any) -> None:
        self.shell = shell
        self.inner_paths: list[str] = []
        if shell == "asgi":
            self.middleware: Any = AsgiHealth(self._asgi_inner, checks=checks, **kwargs)
        else:
            self.middleware = WsgiHealth(self._wsgi_inner, checks=checks, **kwargs)

    async def _asgi_inner(self, scope: Any, receive: Any, send: Any) -> None:
        self.inner_paths.append(scope["path"])
        body = f"inner {scope['method']} {scope['path']}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 218,
                "headers": [(b"content-type", b"text/plain"), (b"x-inner", b"1")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _wsgi_inner(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.inner_paths.append(environ["PATH_INFO"])
        start_response("218 Inner", [("content-type", "text/plain"), ("x-inner", "1")])
        return [f"inner {environ['REQUEST_METHOD']} {environ['PATH_INFO']}".encode()]

    async def request(self, method: str, url: str) -> httpx.Response:
        if self.shell == "asgi":
            transport = httpx.ASGITransport(app=self.middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
                return await client.request(method, url)
        with httpx.Client(
            transport=httpx.WSGITransport(app=self.middleware), base_url="http://svc"
        ) as client:
            return client.request(method, url)

    async def get(self, url: str) -> httpx.Response:
        return await self.request("GET", url)


Make = Callable[..., Harness]


@pytest.fixture(params=["asgi", "wsgi"])
def make(request: pytest.FixtureRequest) -> Make:
    def build(checks: HealthChecks | None = None, **kwargs: Any) -> Harness:
        return Harness(request.param, checks if checks is not None else make_checks(), **kwargs)

    return build


def counting(result: object = None) -> tuple[Callable[[], object], list[int]]:
    calls: list[int] = []

    def check() -> object:
        calls.append(1)
        return result

    return check, calls


# --- states and status codes, through both shells ---------------------------------------------


async def test_ready_service_passes_with_health_json(make: Make) -> None:
    h = make()
    response = await h.get("/readyz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/health+json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {"status": "pass"}
    assert h.inner_paths == []


async def test_state_machine_drives_readyz_but_not_livez(make: Make) -> None:
    checks = make_checks()
    h = make(checks, ready_on_start=False)
    assert checks.state is HealthState.STARTING

    response = await h.get("/readyz")
    assert (response.status_code, response.json()) == (
        503,
        {"status": "fail", "output": "starting"},
    )
    assert (await h.get("/livez")).json() == {"status": "pass"}

    checks.mark_ready()
    assert checks.state is HealthState.READY
    response = await h.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "pass"})

    checks.mark_draining()
    checks.mark_ready()  # a draining service never becomes ready again
    assert checks.state is HealthState.DRAINING
    response = await h.get("/readyz")
    assert (response.status_code, response.json()) == (
        503,
        {"status": "fail", "output": "draining"},
    )
    live = await h.get("/livez")
    assert (live.status_code, live.json()) == (200, {"status": "pass"})
    assert h.inner_paths == []


async def test_readiness_checks_do_not_run_while_starting(make: Make) -> None:
    checks = make_checks()
    check, calls = counting()
    checks.add("db", check)
    h = make(checks, ready_on_start=False)
    assert (await h.get("/readyz?verbose")).json() == {
        "status": "fail",
        "output": "starting",
        "checks": {},
    }
    assert calls == []


async def test_livez_never_runs_readiness_checks(make: Make) -> None:
    checks = make_checks()
    ready_check, ready_calls = counting(False)
    live_check, live_calls = counting()
    checks.add("db", ready_check)
    checks.add("loop", live_check, kind="liveness")
    h = make(checks)
    response = await h.get("/livez?verbose")
    assert response.status_code == 200
    assert response.json() == {
        "status": "pass",
        "checks": {"loop": [{"status": "pass", "output": "", "time": NOON_ISO}]},
    }
    assert (ready_calls, live_calls) == ([], [1])
    assert (await h.get("/readyz")).status_code == 503


async def test_failing_liveness_check_fails_livez(make: Make) -> None:
    checks = make_checks()
    checks.add("deadlock-detector", lambda: False, kind="liveness")
    h = make(checks)
    response = await h.get("/livez")
    assert response.status_code == 503
    assert response.json() == {"status": "fail", "output": "failing: deadlock-detector"}


async def test_verbose_body_follows_the_draft(make: Make) -> None:
    checks = make_checks()
    checks.add("postgres:connections", lambda: None, component_type="datastore")
    checks.add(
        "redis:responseTime",
        lambda: CheckResult(status="warn", output="slow", observed_value=250, observed_unit="ms"),
        critical=False,
        component_type="datastore",
    )
    h = make(checks, service_id="orders", version="1", release_id="1.4.2")
    response = await h.get("/readyz?verbose=true")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/health+json"
    assert list(response.json()) == [
        "status",
        "version",
        "releaseId",
        "serviceId",
        "output",
        "checks",
    ]
    assert response.json() == {
        "status": "warn",
        "version": "1",
        "releaseId": "1.4.2",
        "serviceId": "orders",
        "output": "warning: redis:responseTime",
        "checks": {
            "postgres:connections": [
                {"status": "pass", "componentType": "datastore", "output": "", "time": NOON_ISO}
            ],
            "redis:responseTime": [
                {
                    "status": "warn",
                    "componentType": "datastore",
                    "observedValue": 250,
                    "observedUnit": "ms",
                    "output": "slow",
                    "time": NOON_ISO,
                }
            ],
        },
    }
    # Without ?verbose the per-check details stay out.
    assert (await h.get("/readyz")).json() == {
        "status": "warn",
        "version": "1",
        "releaseId": "1.4.2",
        "serviceId": "orders",
        "output": "warning: redis:responseTime",
    }


async def test_failing_critical_check_is_503(make: Make) -> None:
    checks = make_checks()
    checks.add("db", lambda: False)
    checks.add("cache", lambda: True)
    response = await make(checks).get("/readyz?verbose")
    assert response.status_code == 503
    assert response.json() == {
        "status": "fail",
        "output": "failing: db",
        "checks": {
            "db": [{"status": "fail", "output": "check returned False", "time": NOON_ISO}],
            "cache": [{"status": "pass", "output": "", "time": NOON_ISO}],
        },
    }


async def test_failing_non_critical_check_warns_with_200(make: Make) -> None:
    checks = make_checks()
    checks.add("db", lambda: None)
    checks.add("recommendations", lambda: ("fail", "upstream 502"), critical=False)
    response = await make(checks).get("/readyz?verbose")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["output"]) == ("warn", "warning: recommendations")
    assert body["checks"]["recommendations"] == [
        {"status": "fail", "output": "upstream 502", "time": NOON_ISO}
    ]


async def test_exceptions_in_checks_are_reported_not_raised(make: Make) -> None:
    checks = make_checks()

    def sync_boom() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    async def async_boom() -> None:
        raise RuntimeError("pool closed")

    def bare() -> None:
        raise KeyError

    checks.add("db", sync_boom)
    checks.add("queue", async_boom)
    checks.add("bare", bare, critical=False)
    response = await make(checks).get("/readyz?verbose")
    assert response.status_code == 503
    body = response.json()
    assert body["output"] == "failing: db, queue"
    outputs = {name: entries[0]["output"] for name, entries in body["checks"].items()}
    assert outputs == {
        "db": "ConnectionRefusedError: [Errno 111] Connection refused",
        "queue": "RuntimeError: pool closed",
        "bare": "KeyError",
    }


async def test_hanging_checks_time_out(make: Make) -> None:
    release = threading.Event()

    def hangs() -> None:
        release.wait(10)

    async def hangs_async() -> None:
        await asyncio.sleep(3600)

    checks = make_checks(cache_seconds=0)
    checks.add("sync", hangs, timeout=0.05)
    checks.add("async", hangs_async, timeout=0.05)
    checks.add("fine", lambda: None)
    h = make(checks)
    try:
        response = await h.get("/readyz?verbose")
        assert response.status_code == 503
        body = response.json()
        assert body["output"] == "failing: sync, async"
        assert body["checks"]["sync"][0]["output"] == "timeout: no result within 0.05s"
        assert body["checks"]["async"][0]["output"] == "timeout: no result within 0.05s"
        assert body["checks"]["fine"][0]["status"] == "pass"

        # The hung plain check is not started a second time while it is still running.
        body = (await h.get("/readyz?verbose")).json()
        assert body["checks"]["sync"][0]["output"] == (
            "timeout: the previous run has not finished yet"
        )
        assert body["checks"]["async"][0]["output"] == "timeout: no result within 0.05s"
    finally:
        release.set()


async def test_checks_run_concurrently(make: Make) -> None:
    # Each check passes only if the other one is running at the same time.
    barrier = threading.Barrier(2, timeout=5)
    checks = make_checks()
    checks.add("a", lambda: barrier.wait() is not None, timeout=5)
    checks.add("b", lambda: barrier.wait() is not None, timeout=5)
    response = await make(checks).get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "pass"})


async def test_results_are_cached_for_cache_seconds(make: Make) -> None:
    clock = FakeClock()
    checks = make_checks(clock=clock, cache_seconds=1.0)
    check, calls = counting()
    checks.add("db", check)
    h = make(checks)
    for _ in range(5):
        assert (await h.get("/readyz")).status_code == 200
    assert len(calls) == 1
    clock.now += 0.999
    await h.get("/readyz")
    assert len(calls) == 1
    clock.now += 0.001
    await h.get("/readyz")
    assert len(calls) == 2


async def test_non_health_paths_pass_through_untouched(make: Make) -> None:
    h = make()
    for url in ("/", "/api/orders?verbose", "/readyz/", "/livezz", "/READYZ"):
        response = await h.request("POST", url)
        assert response.status_code == 218
        assert response.headers["x-inner"] == "1"
        assert response.text == f"inner POST {url.split('?')[0]}"
    assert h.inner_paths == ["/", "/api/orders", "/readyz/", "/livezz", "/READYZ"]


async def test_custom_paths(make: Make) -> None:
    h = make(live_path="/healthz/live", ready_path="/healthz/ready")
    assert h.middleware.paths == frozenset({"/healthz/live", "/healthz/ready"})
    assert (await h.get("/healthz/ready")).json() == {"status": "pass"}
    assert (await h.get("/readyz")).status_code == 218


async def test_head_is_get_without_body(make: Make) -> None:
    checks = make_checks()
    checks.add("db", lambda: False)
    h = make(checks)
    get = await h.get("/readyz")
    head = await h.request("HEAD", "/readyz")
    assert head.status_code == get.status_code == 503
    assert head.content == b""
    assert head.headers["content-type"] == "application/health+json"
    assert head.headers["content-length"] == str(len(get.content))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_get_405_with_allow(make: Make, method: str) -> None:
    h = make()
    for path in ("/readyz", "/livez"):
        response = await h.request(method, path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert response.content == b""
    assert h.inner_paths == []


# --- the ASGI shell: lifespan and scope types ---------------------------------------------------


class LifespanDriver:
    """Plays the server's side of the ASGI lifespan protocol."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[str] = []
        self.sent_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message["type"])
        self.sent_event.set()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self.task = asyncio.ensure_future(self.app(scope, self.to_app.get, self._send))
        await self.to_app.put({"type": "lifespan.startup"})
        await self.wait_for_sent(1)

    async def stop(self) -> None:
        await self.to_app.put({"type": "lifespan.shutdown"})
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    async def wait_for_sent(self, count: int) -> None:
        async def wait() -> None:
            while len(self.sent) < count and not (self.task and self.task.done()):
                self.sent_event.clear()
                await self.sent_event.wait()

        waiter = asyncio.ensure_future(wait())
        assert self.task is not None
        await asyncio.wait({waiter, self.task}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()


def lifespan_app(checks: HealthChecks, log: list[str], *, fail: bool = False) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            log.append(f"{message['type']} seen in state {checks.state.value}")
            if message["type"] == "lifespan.startup":
                if fail:
                    await send({"type": "lifespan.startup.failed", "message": "no db"})
                    return
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


async def test_lifespan_marks_ready_after_startup_and_draining_before_shutdown() -> None:
    checks = make_checks()
    log: list[str] = []
    driver = LifespanDriver(AsgiHealth(lifespan_app(checks, log), checks=checks))
    await driver.start()
    assert driver.sent == ["lifespan.startup.complete"]
    assert checks.state is HealthState.READY
    await driver.stop()
    assert driver.sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == [
        "lifespan.startup seen in state starting",
        "lifespan.shutdown seen in state draining",
    ]
    assert checks.state is HealthState.DRAINING


async def test_lifespan_startup_failure_stays_starting() -> None:
    checks = make_checks()
    driver = LifespanDriver(AsgiHealth(lifespan_app(checks, [], fail=True), checks=checks))
    await driver.start()
    assert driver.task is not None
    await driver.task
    assert driver.sent == ["lifespan.startup.failed"]
    assert checks.state is HealthState.STARTING


async def test_lifespan_with_ready_on_start_false_leaves_readiness_to_the_app() -> None:
    checks = make_checks()
    driver = LifespanDriver(
        AsgiHealth(lifespan_app(checks, []), checks=checks, ready_on_start=False)
    )
    await driver.start()
    assert checks.state is HealthState.STARTING
    await driver.stop()
    assert checks.state is HealthState.DRAINING


async def _raises_before_receive(scope: Any, receive: Any, send: Any) -> None:
    raise ValueError("only http is supported")


async def _returns_at_once(scope: Any, receive: Any, send: Any) -> None:
    return None


@pytest.mark.parametrize("app", [_raises_before_receive, _returns_at_once])
async def test_app_without_lifespan_gets_it_spoken_for(app: Any) -> None:
    checks = make_checks()
    driver = LifespanDriver(AsgiHealth(app, checks=checks))
    await driver.start()
    assert driver.sent == ["lifespan.startup.complete"]
    assert checks.state is HealthState.READY
    await driver.stop()
    assert driver.sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert checks.state is HealthState.DRAINING


async def test_app_raising_mid_lifespan_is_ready_and_error_propagates() -> None:
    checks = make_checks()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("lifespan unsupported here")

    driver = LifespanDriver(AsgiHealth(app, checks=checks))
    await driver.start()
    assert driver.task is not None
    with pytest.raises(RuntimeError, match="lifespan unsupported here"):
        await driver.task
    assert driver.sent == []
    assert checks.state is HealthState.READY


async def test_server_without_lifespan_becomes_ready_on_first_request() -> None:
    checks = make_checks()
    h = Harness("asgi", checks)
    assert checks.state is HealthState.STARTING
    assert (await h.get("/readyz")).status_code == 200
    assert checks.state is HealthState.READY


async def test_websocket_and_other_scopes_reach_the_app() -> None:
    seen: list[tuple[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], scope["path"]))

    middleware = AsgiHealth(app)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        raise AssertionError("the middleware must not answer a websocket")

    await middleware({"type": "websocket", "path": "/readyz"}, receive, send)
    assert seen == [("websocket", "/readyz")]


# --- the WSGI shell and gunicorn --------------------------------------------------------------


def test_wsgi_is_ready_on_construction_unless_told_otherwise() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        return []

    assert WsgiHealth(app).checks.state is HealthState.READY
    assert WsgiHealth(app, ready_on_start=False).checks.state is HealthState.STARTING


@pytest.mark.parametrize("hook", ["worker_int", "worker_abort", "worker_exit", "on_exit"])
def test_gunicorn_hooks_mark_draining(hook: str) -> None:
    from gunicorn.config import Config

    checks = make_checks()
    checks.mark_ready()
    hooks = gunicorn_hooks(checks)
    assert set(hooks) == {
        "post_worker_init",
        "worker_int",
        "worker_abort",
        "worker_exit",
        "on_exit",
    }
    config = Config()
    for name, fn in hooks.items():
        config.set(name, fn)  # gunicorn validates each hook's arity here
    args = (object(), object()) if hook == "worker_exit" else (object(),)
    getattr(config, hook)(*args)
    assert checks.state is HealthState.DRAINING


def test_gunicorn_post_worker_init_chains_sigterm() -> None:
    original = signal.getsignal(signal.SIGTERM)
    received: list[str] = []
    checks = make_checks()
    checks.mark_ready()

    def gunicorn_handler(signum: int, frame: Any) -> None:
        received.append(f"gunicorn saw {signal.Signals(signum).name} in {checks.state.value}")

    try:
        signal.signal(signal.SIGTERM, gunicorn_handler)
        gunicorn_hooks(checks)["post_worker_init"](object())
        signal.raise_signal(signal.SIGTERM)
        assert received == ["gunicorn saw SIGTERM in draining"]
    finally:
        signal.signal(signal.SIGTERM, original)


# --- the core ---------------------------------------------------------------------------------


def evaluate_one(result: object) -> dict[str, Any]:
    checks = make_checks()
    checks.mark_ready()
    checks.add("c", lambda: result)
    report = checks.evaluate_sync()
    (entry,) = report.to_dict(verbose=True)["checks"]["c"]
    return {"report": report.status, **entry}


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (None, {"report": "pass", "status": "pass", "output": ""}),
        (True, {"report": "pass", "status": "pass", "output": ""}),
        (False, {"report": "fail", "status": "fail", "output": "check returned False"}),
        (
            ("warn", "disk 91% full"),
            {"report": "warn", "status": "warn", "output": "disk 91% full"},
        ),
        (("UP", None), {"report": "pass", "status": "pass", "output": ""}),
        (("down", "gone"), {"report": "fail", "status": "fail", "output": "gone"}),
        (
            ("ok", {"observedValue": 12, "observedUnit": "ms", "output": "fast"}),
            {
                "report": "pass",
                "status": "pass",
                "observedValue": 12,
                "observedUnit": "ms",
                "output": "fast",
            },
        ),
        (
            ("maybe", "?"),
            {
                "report": "fail",
                "status": "fail",
                "output": "check returned an unknown status 'maybe'",
            },
        ),
        (
            42,
            {
                "report": "fail",
                "status": "fail",
                "output": "check returned an unsupported value of type int",
            },
        ),
    ],
)
def test_check_results_are_interpreted(result: object, expected: dict[str, Any]) -> None:
    assert evaluate_one(result) == {**expected, "time": NOON_ISO}


def test_sync_function_returning_a_coroutine_fails_cleanly() -> None:
    async def later() -> None:
        return None

    outcome = evaluate_one_factory(lambda: later())
    assert outcome == ("fail", "check returned an awaitable; register an async def instead")


def evaluate_one_factory(check: Callable[[], object]) -> tuple[str, str]:
    checks = make_checks()
    checks.mark_ready()
    checks.add("c", check)
    (outcome,) = checks.evaluate_sync().checks
    return (outcome.status, outcome.output)


def test_async_callable_instances_are_awaited() -> None:
    class Probe:
        async def __call__(self) -> tuple[str, str]:
            return ("warn", "replica lag")

    assert evaluate_one_factory(Probe()) == ("warn", "replica lag")


async def test_concurrent_async_evaluations_share_one_run() -> None:
    checks = make_checks(cache_seconds=0)
    checks.mark_ready()
    gate = asyncio.Event()
    calls: list[int] = []

    async def slow() -> None:
        calls.append(1)
        await gate.wait()

    checks.add("db", slow)
    waiters = [asyncio.ensure_future(checks.evaluate()) for _ in range(5)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gate.set()
    reports = await asyncio.gather(*waiters)
    assert calls == [1]
    assert {r.status for r in reports} == {"pass"}
    assert len({id(r) for r in reports}) == 1


def test_unserializable_observed_value_is_rendered_as_text() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd-value"

    checks = make_checks()
    checks.mark_ready()
    checks.add("c", lambda: CheckResult(status="pass", observed_value=Odd()))
    response = HealthResponder(checks).respond_sync("GET", "/readyz", "verbose")
    assert json.loads(response.body)["checks"]["c"][0]["observedValue"] == "odd-value"


def test_values_json_cannot_hold_and_unprintable_errors_do_not_break_the_probe() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def raises_unprintable() -> None:
        raise Unprintable

    circular: list[object] = []
    circular.append(circular)
    checks = make_checks()
    checks.mark_ready()
    checks.add("tuple-keys", lambda: ("pass", {"observedValue": {(1, 2): "x"}}))
    checks.add("circular", lambda: CheckResult(status="pass", observed_value=circular))
    checks.add("unprintable", raises_unprintable, critical=False)
    response = HealthResponder(checks).respond_sync("GET", "/readyz", "verbose")
    body = json.loads(response.body)
    assert (response.status, body["status"]) == (200, "warn")
    assert body["checks"]["tuple-keys"][0]["observedValue"] == "{(1, 2): 'x'}"
    assert body["checks"]["circular"][0]["observedValue"] == "[[...]]"
    assert body["checks"]["unprintable"][0]["output"] == "Unprintable"


def test_adding_a_check_invalidates_the_cache() -> None:
    clock = FakeClock()
    checks = make_checks(clock=clock)
    checks.mark_ready()
    assert checks.evaluate_sync().status == "pass"
    checks.add("db", lambda: False)
    assert checks.evaluate_sync().status == "fail"
    assert [c.name for c in checks.registered] == ["db"]


@pytest.mark.parametrize(
    ("build", "field", "message"),
    [
        (
            lambda c: c.add("db", lambda: None, timeout=0),
            "timeout",
            "timeout: expected a positive number of seconds",
        ),
        (
            lambda c: c.add("db", lambda: None, timeout=float("inf")),
            "timeout",
            "timeout: expected a positive number of seconds",
        ),
        (
            lambda c: c.add("db", lambda: None, kind="startup"),
            "kind",
            "kind: expected 'readiness' or 'liveness'",
        ),
        (lambda c: c.add("", lambda: None), "name", "name: expected a non-empty string"),
        (
            lambda c: c.add("db", "not callable"),
            "check",
            "check: expected a callable taking no arguments",
        ),
        (
            lambda c: c.add("db", lambda: None, critical="yes"),
            "critical",
            "critical: expected True or False",
        ),
        (
            lambda c: (c.add("db", lambda: None), c.add("db", lambda: None)),
            "name",
            "name: a check with this name is already registered",
        ),
        (
            lambda c: HealthResponder(c, live_path="livez"),
            "live_path",
            "live_path: expected a path starting with '/' and without a query",
        ),
        (
            lambda c: HealthResponder(c, ready_path="/livez"),
            "ready_path",
            "ready_path: expected a path different from live_path",
        ),
        (
            lambda c: HealthResponder(c, version=2),
            "version",
            "version: expected a string or None",
        ),
        (
            lambda c: HealthChecks(cache_seconds=-1),
            "cache_seconds",
            "cache_seconds: expected a number of seconds >= 0",
        ),
        (
            lambda c: HealthChecks(max_workers=0),
            "max_workers",
            "max_workers: expected a positive integer",
        ),
        (
            lambda c: CheckResult(status="great"),  # type: ignore[arg-type]
            "status",
            "status: expected 'pass', 'warn' or 'fail'",
        ),
    ],
)
def test_invalid_configuration_is_rejected(
    build: Callable[[HealthChecks], object], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build(make_checks())
    assert caught.value.field == field
    assert str(caught.value) == message


def test_shells_validate_their_arguments() -> None:
    with pytest.raises(ConfigurationError, match="ready_path: expected a path different"):
        AsgiHealth(_returns_at_once, live_path="/h", ready_path="/h")
    with pytest.raises(ConfigurationError, match="live_path: expected a path starting"):
        WsgiHealth(lambda e, s: [], live_path="/livez?x")


# --- properties ---------------------------------------------------------------------------------


@given(st.text())
def test_wants_verbose_matches_the_parameter_names(query: str) -> None:
    expected = "verbose" in [part.partition("=")[0] for part in query.split("&")]
    assert wants_verbose(query) is expected


@given(
    st.lists(st.sampled_from(["verbose", "verbose=", "verbose=0", "a=verbose", "x", "verbosex"]))
)
def test_wants_verbose_on_composed_queries(parts: list[str]) -> None:
    query = "&".join(parts)
    assert wants_verbose(query) is any(
        p.startswith("verbose") and p[7:8] in ("", "=") for p in parts
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
check_results = (
    json_values
    | st.tuples(st.sampled_from(["pass", "ok", "warn", "fail", "down", "bogus", ""]), json_values)
    | st.tuples(json_values, json_values)
    | st.builds(
        CheckResult,
        status=st.sampled_from(["pass", "warn", "fail"]),
        output=st.text(),
        observed_value=json_values,
    )
)


@given(check_results, st.booleans())
def test_any_check_result_yields_a_valid_body(result: object, critical: bool) -> None:
    checks = make_checks()
    checks.mark_ready()
    checks.add("c", lambda: result, critical=critical)
    response = HealthResponder(checks).respond_sync("GET", "/readyz", "verbose")
    body = json.loads(response.body)
    assert body["status"] in ("pass", "warn", "fail")
    assert response.status == (503 if body["status"] == "fail" else 200)
    (entry,) = body["checks"]["c"]
    assert entry["status"] in ("pass", "warn", "fail")
    assert isinstance(entry["output"], str)
    assert response.headers == (
        ("content-type", "application/health+json"),
        ("cache-control", "no-store"),
        ("content-length", str(len(response.body))),
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_more_plain_checks_than_workers_still_all_run(mode: str) -> None:
    checks = make_checks(max_workers=1, cache_seconds=0)
    checks.mark_ready()
    calls: list[str] = []
    for name in ("a", "b", "c"):
        checks.add(name, lambda name=name: calls.append(name) is None)
    report = checks.evaluate_sync() if mode == "sync" else await checks.evaluate()
    assert report.status == "pass"
    assert sorted(calls) == ["a", "b", "c"]
