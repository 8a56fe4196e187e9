"""The least in-process code that does what the meshware stack does for the benchmark's request.

A lower bound, not a product: one hand-written ASGI function that, for ``GET /api/items/1``
from the trusted proxy, does every observable thing the meshware stack does, with every
answer that can be worked out ahead of time worked out once and looked up afterwards:

- the request id: generated, added to the request headers, echoed on the response;
- the caller's identity from ``x-forwarded-client-cert``, trusted from 127.0.0.1 only;
- the authorization decision over the caller, method and path (looked up, never evaluated);
- a GCRA rate limit per caller, with ``RateLimit-Policy`` / ``RateLimit`` on the response;
- a trace id and a 1% sampling decision, made the current OpenTelemetry context so that
  outbound calls would propagate it;
- Istio's request count and duration histogram, tallied per label set;
- a JSON access-log line per request, buffered and written out in blocks.

It skips what a real stack cannot: header validation, repeated headers, path normalization,
route resolution, websocket and lifespan handling, sampled spans, errors. Whatever this
function keeps of the bare app's throughput is more than any pure-Python in-process stack with
the same features can keep on the same interpreter and server.
"""

from __future__ import annotations

import atexit
import bisect
import os
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from random import getrandbits, random
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from bench.inbound_apps import CALLER, _starlette

_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_INTERVAL = 1 / 1_000_000  # "1000000/second"
_BURST = 1_000_000
_TRUSTED = "127.0.0.1"

_app = _starlette()
_request_id: ContextVar[bytes] = ContextVar("request_id")
_callers: dict[tuple[str, bytes], str | None] = {}  # (peer, xfcc) -> principal
_decisions: dict[tuple[str | None, str, str], bool] = {}  # (principal, method, path) -> allowed
_tats: dict[str, float] = {}
_tallies: dict[tuple[Any, ...], list[Any]] = {}
_lines: list[str] = []
_sink = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the process)
atexit.register(_sink.close)


def _caller(peer: str, xfcc: bytes | None) -> str | None:
    if xfcc is None or peer != _TRUSTED:
        return None
    key = (peer, xfcc)
    if key not in _callers:
        uri = xfcc.decode("latin-1").partition("URI=")[2].partition(";")[0]
        _callers[key] = uri.removeprefix("spiffe://") or None
    return _callers[key]


def _allowed(principal: str | None, method: str, path: str) -> bool:
    key = (principal, method, path)
    if key not in _decisions:
        _decisions[key] = principal == CALLER and method == "GET" and path.startswith("/api/")
    return _decisions[key]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _app(scope, receive, send)
        return
    start = time.perf_counter()
    wall = time.time()
    raw = scope["headers"]
    headers = dict(raw)
    request_id = headers.get(b"x-request-id")
    if request_id is None:
        request_id = b"%032x" % getrandbits(128)
        scope["headers"] = [*raw, (b"x-request-id", request_id)]
    client = scope.get("client")
    principal = _caller(client[0] if client else "", headers.get(b"x-forwarded-client-cert"))
    method: str = scope["method"]
    path: str = scope["path"]
    if not _allowed(principal, method, path):
        await send({"type": "http.response.start", "status": 403, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status":403}'})
        return
    bucket = f"per-caller:{principal}"
    now = time.perf_counter()
    tat = _tats.get(bucket, now)
    base = tat if tat > now else now
    backlog = (base - now) / _INTERVAL
    remaining = int(_BURST - backlog - 1)
    _tats[bucket] = base + _INTERVAL
    added = [
        (b"x-request-id", request_id),
        (b"ratelimit-policy", b'"per-caller";q=1000000;w=1'),
        (b"ratelimit", b'"per-caller";r=%d;t=0' % remaining),
    ]
    trace_id = getrandbits(128)
    flags = TraceFlags(TraceFlags.SAMPLED if random() < 0.01 else TraceFlags.DEFAULT)
    span = NonRecordingSpan(SpanContext(trace_id, getrandbits(64), False, flags))
    token = otel_context.attach(trace.set_span_in_context(span))
    id_token = _request_id.set(request_id)
    status = 0
    sent = 0

    async def send_wrapper(message: MutableMapping[str, Any]) -> None:
        nonlocal status, sent
        if message["type"] == "http.response.start":
            status = message["status"]
            message["headers"] = [*message.get("headers", ()), *added]
        else:
            sent += len(message.get("body", b""))
        await send(message)

    try:
        await _app(scope, receive, send_wrapper)
    finally:
        _request_id.reset(id_token)
        otel_context.detach(token)
        duration_ms = (time.perf_counter() - start) * 1000.0
        route = getattr(scope.get("route"), "path", None)
        labels = (principal, method, route, status)
        tally = _tallies.get(labels)
        if tally is None:
            tally = _tallies[labels] = [0, 0.0, [0] * (len(_BUCKETS) + 1)]
        tally[0] += 1
        tally[1] += duration_ms
        tally[2][bisect.bisect_left(_BUCKETS, duration_ms)] += 1
        _lines.append(
            f'{{"start_time":{wall:.6f},"method":"{method}","route":"{route}","path":"{path}",'
            f'"status":{status},"duration_ms":{duration_ms:.3f},"bytes_out":{sent},'
            f'"principal":"{principal}","request_id":"{request_id.decode()}",'
            f'"trace_id":"{trace_id:032x}","authz":"allow"}}\n'
        )
        if len(_lines) >= 512:
            _sink.write("".join(_lines))
            _lines.clear()
