"""The JSON access log."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.record import RequestRecord
from meshware.telemetry.access_log import AccessLog, clean_text, rfc3339_ms


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> logging.Logger:
    """A logger of the test's own: outside the logging tree, so without any handlers (pytest
    attaches its capture handlers to the loggers of the tree)."""
    return logging.Logger(f"test.access.{request.node.name}")


def request_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "start_time": 1714564800.25,
        "method": "GET",
        "route": "/users/{id}",
        "path": "/users/7",
        "status": 200,
        "duration_ms": 12.34567,
        "bytes_in": 0,
        "bytes_out": 42,
        "record": RequestRecord(request_id="r-1"),
        "trace_id": None,
        "user_agent": "curl/8.5",
    }
    fields.update(overrides)
    return fields


# -- formatting helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1714564800.25, "2024-05-01T12:00:00.250Z"),
        (1714564800.9999, "2024-05-01T12:00:00.999Z"),
        (1714564801.001, "2024-05-01T12:00:01.001Z"),
        (1714564800.5, "2024-05-01T12:00:00.500Z"),
    ],
)
def test_rfc3339_ms(timestamp: float, text: str) -> None:
    assert rfc3339_ms(timestamp) == text


@pytest.mark.parametrize(
    ("value", "limit", "cleaned"),
    [
        ("/plain", 10, "/plain"),
        ("/abcdefghij", 5, "/abcd"),
        ("/a\x1b[31m\n", 100, "/a\\x1b[31m\\x0a"),
        ("/del\x7f\x85", 100, "/del\\x7f\\x85"),
        ("/ünïcode", 100, "/ünïcode"),
    ],
)
def test_clean_text(value: str, limit: int, cleaned: str) -> None:
    assert clean_text(value, limit) == cleaned


@given(st.text(max_size=300), st.integers(min_value=1, max_value=200))
def test_clean_text_leaves_no_control_characters(value: str, limit: int) -> None:
    cleaned = clean_text(value, limit)

    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in cleaned)
    assert len(cleaned) <= 4 * limit
    if value[:limit].isprintable():
        assert cleaned == value[:limit]


# -- the line ---------------------------------------------------------------------------------


def test_line_fields(logger: logging.Logger) -> None:
    record = RequestRecord(
        request_id="r-1",
        identity=Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), "tls"),
        request_principal="iss/alice",
        authz_decision="deny",
        authz_policy="deny-anon",
        authz_reason="no principal",
        authz_dry_run="allow",
        ratelimit="limited",
        identity_error=None,
        extra={"tenant": "acme", "status": "not overriding", 7: {"nested": True}},
    )
    log = AccessLog(logger, handler=None)

    line = log.format(**request_fields(record=record, trace_id="ab" * 16))

    assert line == (
        '{"time":"2024-05-01T12:00:00.250Z","method":"GET","route":"/users/{id}",'
        '"path":"/users/7","status":200,"duration_ms":12.346,"bytes_in":0,"bytes_out":42,'
        '"source_principal":"cluster.local/ns/shop/sa/web","request_principal":"iss/alice",'
        '"request_id":"r-1","trace_id":"' + "ab" * 16 + '","authz":"deny",'
        '"authz_policy":"deny-anon","authz_reason":"no principal","authz_dry_run":"allow",'
        '"ratelimit":"limited","identity_error":null,"user_agent":"curl/8.5",'
        '"tenant":"acme","7":{"nested":true}}'
    )


def test_hostile_path_and_user_agent_are_truncated_and_escaped(logger: logging.Logger) -> None:
    log = AccessLog(logger, handler=None, max_path_length=8, max_user_agent_length=4)

    fields = log.fields(**request_fields(path="/a\nb\x1bcdefgh", user_agent="agent\x00x"))

    assert fields["path"] == "/a\\x0ab\\x1bcde"
    assert fields["user_agent"] == "agen"
    assert "\n" not in log.format(**request_fields(path="/x\r\ny"))


def test_line_without_a_record(logger: logging.Logger) -> None:
    fields = AccessLog(logger, handler=None).fields(
        **request_fields(record=None, route=None, user_agent=None)
    )

    assert fields["route"] is None
    assert fields["request_id"] is None
    assert fields["source_principal"] is None
    assert fields["user_agent"] is None


# -- writing ----------------------------------------------------------------------------------


def test_auto_handler_writes_bare_json_to_stderr(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AccessLog(logger)

    log.emit(**request_fields())

    err = capsys.readouterr().err
    assert err.endswith("\n")
    assert json.loads(err)["request_id"] == "r-1"
    assert logger.level == logging.INFO
    assert logger.propagate is False


def test_auto_handler_defers_to_configured_logging(logger: logging.Logger) -> None:
    configured = logging.StreamHandler(io.StringIO())
    logger.addHandler(configured)

    AccessLog(logger)

    assert logger.handlers == [configured]


def test_auto_handler_is_installed_once(logger: logging.Logger) -> None:
    AccessLog(logger)
    AccessLog(logger)

    assert len(logger.handlers) == 1


def test_given_handler_receives_records_with_the_fields(logger: logging.Logger) -> None:
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    log = AccessLog(logger, handler=Keep(), level=logging.WARNING)
    log.emit(**request_fields())

    [record] = captured
    assert record.levelno == logging.WARNING
    assert json.loads(record.getMessage()) == record.meshware_access
    assert record.meshware_access["bytes_out"] == 42


def test_none_handler_leaves_the_logger_alone(logger: logging.Logger) -> None:
    log = AccessLog(logger, handler=None)

    assert logger.handlers == []
    assert logger.level == logging.NOTSET
    assert log.logger is logger


def test_disabled_level_writes_nothing(logger: logging.Logger) -> None:
    stream = io.StringIO()
    log = AccessLog(logger, handler=logging.StreamHandler(stream))
    logger.setLevel(logging.ERROR)

    log.emit(**request_fields())

    assert not log.enabled
    assert stream.getvalue() == ""


def test_emit_never_raises(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no")

    log = AccessLog(logger, handler=logging.StreamHandler(io.StringIO()))
    bad = RequestRecord(extra={"x": Unprintable()})

    with caplog.at_level(logging.WARNING, logger="meshware.telemetry"):
        log.emit(**request_fields(record=bad))
        log.emit(**request_fields(record=bad))

    warnings = [r for r in caplog.records if r.name == "meshware.telemetry"]
    assert [r.getMessage() for r in warnings] == ["could not write an access log line"]


def test_wall_clock_is_injectable(logger: logging.Logger) -> None:
    log = AccessLog(logger, handler=None, wall_clock=lambda: 86400.0)

    assert log.now() == 86400.0


@pytest.mark.parametrize(
    ("arguments", "field", "message"),
    [
        ({"logger": 3}, "access_log.logger", "expected a logging.Logger or a logger name"),
        ({"handler": "stderr"}, "access_log.handler", 'expected "auto", a logging.Handler or None'),
        ({"level": 0}, "access_log.level", "expected a logging level above NOTSET"),
        ({"max_path_length": 0}, "access_log.max_path_length", "expected a positive integer"),
        ({"max_user_agent_length": 1.5}, "access_log.max_user_agent_length", "expected a positive integer"),
    ],
)  # fmt: skip
def test_invalid_arguments(arguments: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AccessLog(**arguments)

    assert caught.value.field == field
    assert str(caught.value) == f"{field}: {message}"


# -- straight to a file -----------------------------------------------------------------------


def test_a_file_gets_the_same_lines_as_the_logger(logger: logging.Logger, tmp_path: Any) -> None:
    path = tmp_path / "access.log"
    to_file = AccessLog(file=path, flush_interval=3600)
    to_logger = AccessLog(logger, handler=None)
    identity = Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), "tls")
    requests = [
        request_fields(),
        request_fields(record=RequestRecord(request_id="r-2", identity=identity)),
        request_fields(path="/evil\npath", user_agent="x" * 400, status=503),
        request_fields(record=RequestRecord(request_id="r-3", extra={"tenant": "acme"})),
        request_fields(record=None, trace_id="cd" * 16),
    ]
    for fields in requests:
        to_file.emit(**fields)
    assert to_file.enabled and to_file.file is not None
    to_file.close()

    assert path.read_text().splitlines() == [to_logger.format(**f) for f in requests]


def test_a_subclass_fields_reach_the_file(tmp_path: Any) -> None:
    class Short(AccessLog):
        def fields(self, **arguments: Any) -> dict[str, Any]:
            return {"status": arguments["status"], "path": arguments["path"]}

    path = tmp_path / "access.log"
    log = Short(file=path)
    log.emit(**request_fields())
    log.close()
    assert path.read_text() == '{"status":200,"path":"/users/7"}\n'


@pytest.mark.parametrize(
    ("arguments", "field", "message"),
    [
        ({"logger": "other"}, "access_log.file", "a file takes the place of a logger"),
        ({"handler": None}, "access_log.file", "a file takes the place of a logger"),
        ({"level": logging.DEBUG}, "access_log.file", "a file takes the place of a logger"),
        ({"flush_interval": 0}, "access_log.flush_interval", "expected seconds above 0"),
        ({"buffer_bytes": -1}, "access_log.buffer_bytes", "expected a positive number of bytes"),
    ],
)  # fmt: skip
def test_invalid_file_arguments(
    tmp_path: Any, arguments: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        AccessLog(file=tmp_path / "access.log", **arguments)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_an_unopenable_file_names_the_setting(tmp_path: Any) -> None:
    missing = tmp_path / "nowhere" / "access.log"
    with pytest.raises(ConfigurationError) as caught:
        AccessLog(file=missing)
    assert caught.value.field == "access_log.file"
    assert str(caught.value) == (
        f"access_log.file: cannot open {missing} for appending: No such file or directory"
    )
