"""The access log writes each line from the values: exactly what encoding its fields gives."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.record import RequestRecord
from meshware.telemetry.access_log import _MAX_KEPT, AccessLog


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture() -> Capture:
    return Capture()


def make_log(name: str, capture: Capture, **kwargs: Any) -> AccessLog:
    return AccessLog(logging.Logger(f"test.lines.{name}"), handler=capture, **kwargs)


CALLER = Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), "xfcc")
text = st.text(max_size=30)
maybe_text = st.none() | text | st.sampled_from(["allow", "deny", "allowed", "limited"])
numbers = st.integers(-5, 10**12) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()


@settings(max_examples=400, deadline=None)
@given(
    method=text,
    route=maybe_text,
    path=text,
    status=numbers,
    duration=st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 10**6),
    bytes_in=numbers,
    bytes_out=numbers,
    trace_id=maybe_text,
    user_agent=maybe_text,
    caller=st.booleans(),
    values=st.lists(maybe_text, min_size=8, max_size=8),
    start=st.floats(0, 4e9),
)
def test_a_written_line_is_the_encoding_of_its_fields(
    method: str,
    route: str | None,
    path: str,
    status: Any,
    duration: Any,
    bytes_in: Any,
    bytes_out: Any,
    trace_id: str | None,
    user_agent: str | None,
    caller: bool,
    values: list[str | None],
    start: float,
) -> None:
    capture = Capture()
    log = make_log("hypothesis", capture, max_path_length=12, max_user_agent_length=8)
    record = RequestRecord(
        identity=CALLER if caller else None,
        request_principal=values[0],
        request_id=values[1],
        authz_decision=values[2],
        authz_policy=values[3],
        authz_reason=values[4],
        authz_dry_run=values[5],
        ratelimit=values[6],
        identity_error=values[7],
    )
    arguments: dict[str, Any] = {
        "start_time": start,
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": duration,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "record": record,
        "trace_id": trace_id,
        "user_agent": user_agent,
    }
    for _ in range(2):  # the second line reuses what the first one kept
        log.emit(**arguments)

    expected = log.format(**arguments)
    fields = log.fields(**arguments)
    for written in capture.records:
        assert written.getMessage() == expected
        assert json.dumps(written.meshware_access, default=str) == json.dumps(fields, default=str)
        assert list(written.meshware_access) == list(fields)


def arguments(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "start_time": 1714564800.25,
        "method": "GET",
        "route": "/users/{id}",
        "path": "/users/7",
        "status": 200,
        "duration_ms": 1.5,
        "bytes_in": 0,
        "bytes_out": 2,
        "record": RequestRecord(request_id="r-1", identity=CALLER, authz_decision="allow"),
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "user_agent": "curl/8.5",
    }
    values.update(overrides)
    return values


def test_lines_with_extra_fields(capture: Capture) -> None:
    log = make_log("extra", capture)
    record = RequestRecord(request_id="r-2", extra={"authz_audit": ["audit-all"], "status": 1})

    log.emit(**arguments(record=record))

    [written] = capture.records
    line = json.loads(written.getMessage())
    assert line["authz_audit"] == ["audit-all"]
    assert line["status"] == 200  # an extra field never replaces a standard one
    assert list(line)[-1] == "authz_audit"
    assert written.getMessage() == log.format(**arguments(record=record))


def test_what_is_kept_is_bounded(capture: Capture) -> None:
    log = make_log("bounded", capture)

    for n in range(_MAX_KEPT + 10):
        log.emit(**arguments(user_agent=f"client/{n}"))

    assert 0 < len(log._kept) <= _MAX_KEPT
    assert json.loads(capture.records[-1].getMessage())["user_agent"] == f"client/{_MAX_KEPT + 9}"


def test_unhashable_values_are_still_written(capture: Capture) -> None:
    log = make_log("unhashable", capture)
    record = RequestRecord(request_id="r-3", authz_reason=["not", "a", "string"])  # type: ignore[arg-type]

    log.emit(**arguments(record=record))

    [written] = capture.records
    assert json.loads(written.getMessage())["authz_reason"] == ["not", "a", "string"]


def test_a_subclass_overriding_fields_writes_its_fields(capture: Capture) -> None:
    class Tagged(AccessLog):
        def fields(self, **kwargs: Any) -> dict[str, Any]:
            return {**super().fields(**kwargs), "team": "payments"}

    log = Tagged(logging.Logger("test.lines.tagged"), handler=capture)

    log.emit(**arguments())

    [written] = capture.records
    assert json.loads(written.getMessage())["team"] == "payments"
    assert written.meshware_access["team"] == "payments"


def test_a_logger_class_with_its_own_make_record_is_used(capture: Capture) -> None:
    class Stamped(logging.Logger):
        def makeRecord(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
            record = super().makeRecord(*args, **kwargs)
            record.stamped = True
            return record

    log = AccessLog(Stamped("test.lines.stamped"), handler=capture)

    log.emit(**arguments())

    [written] = capture.records
    assert written.stamped is True  # type: ignore[attr-defined]
    assert written.meshware_access["method"] == "GET"


def test_a_custom_record_factory_is_used(capture: Capture) -> None:
    default = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.host = "node-1"
        return record

    log = make_log("factory", capture)
    logging.setLogRecordFactory(factory)
    try:
        log.emit(**arguments())
    finally:
        logging.setLogRecordFactory(default)

    [written] = capture.records
    assert written.host == "node-1"  # type: ignore[attr-defined]
    assert written.pathname == "(access log)"
    assert written.levelno == logging.INFO
