"""A structured access log: one JSON line per request, on the ``meshware.access`` logger or
straight into a buffered file (Istio's ``accessLogFile``).

Each line is a single JSON encoding of one dict; what the inner layers noted in the request's
``RequestRecord`` (caller, authorization, rate limit) rides along. Writing the line
never raises into the request: a failing handler or an unserialisable field is reported once
on the ``meshware.telemetry`` logger and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

from meshware.exceptions import ConfigurationError
from meshware.telemetry.log_file import BufferedLineFile

if TYPE_CHECKING:
    from meshware.inbound.record import RequestRecord

__all__ = ["ACCESS_LOGGER", "AccessLog", "access_log_of", "clean_text", "rfc3339_ms"]

ACCESS_LOGGER: Final = "meshware.access"
"""Name of the logger the access log writes to by default."""

_CONTROL: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), default=str).encode
_STRING: Final = json.encoder.encode_basestring_ascii
_STANDARD_FIELDS: Final = 19  # the fields every line has, before RequestRecord.extra's
_MAKE_RECORD: Final = logging.Logger.makeRecord


def _json(value: object) -> str:
    """``value`` exactly as ``_ENCODE`` writes it inside a line, the common types first."""
    kind = type(value)
    if kind is str:
        return _STRING(value)  # type: ignore[arg-type]
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is float and value - value == 0.0:  # type: ignore[operator]
        return float.__repr__(value)
    return _ENCODE(value)


_internal_log = logging.getLogger("meshware.telemetry")
_second_cache: tuple[int, str] = (-1, "")


_MAX_KEPT: Final = 1024  # combinations kept by an AccessLog; peers choose some of the values


_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def rfc3339_ms(timestamp: float) -> str:
    """Format a POSIX timestamp as RFC 3339 UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    global _second_cache
    millis = int(timestamp * 1000)
    second, ms = divmod(millis, 1000)
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)
    return prefix + _MILLIS[ms]


def clean_text(value: str, limit: int) -> str:
    """Truncate ``value`` to ``limit`` characters, then escape control characters as ``\\xNN``.

    Escaping keeps a hostile path or user agent from forging log lines or driving a terminal.
    """
    if len(value) > limit:
        value = value[:limit]
    if not value.isprintable():
        value = value.translate(_CONTROL)
    return value


class AccessLog:
    """Writes one JSON line per request.

    The fields, in order: ``time`` (request start, RFC 3339 UTC with milliseconds),
    ``method``, ``route`` (template or ``null``), ``path`` (the raw path as received, without
    the query), ``status``, ``duration_ms``, ``bytes_in``, ``bytes_out``, ``source_principal``,
    ``request_principal``, ``request_id``, ``trace_id``, ``authz`` (the decision),
    ``authz_policy``, ``authz_reason``, ``authz_dry_run``, ``ratelimit``, ``identity_error``,
    ``user_agent``, then any fields inner layers put in ``RequestRecord.extra``. Absent values
    are ``null``.

    Args:
        logger: the logger (or its name) to write to.
        handler: where the lines go. ``"auto"`` (the default) adds a stderr handler that
            writes the bare JSON line, and stops propagation to the root logger, when logging
            has not been configured (neither the logger nor its ancestors have handlers);
            otherwise the lines go to the configured handlers. A ``logging.Handler`` is added
            to the logger as is. ``None`` leaves the logger's configuration untouched.
        level: the level of the records; the logger's level is set to it when it has none
            (unless ``handler`` is ``None``).
        max_path_length: the path is truncated to this many characters.
        max_user_agent_length: the user agent is truncated to this many characters.
        wall_clock: the clock of the ``time`` field (POSIX seconds), for tests.
        file: write the lines straight to this file instead of a logger, as Istio's
            ``accessLogFile`` (``"/dev/stdout"`` for a container's log collector): buffered,
            and written at least every ``flush_interval`` seconds or when ``buffer_bytes``
            are waiting (see :class:`~meshware.telemetry.log_file.BufferedLineFile`). The
            logging module is not involved, which makes a line several times cheaper;
            ``logger``, ``handler`` and ``level`` must then be left at their defaults.
        flush_interval: with ``file``: the most seconds a line waits before it is written.
        buffer_bytes: with ``file``: the buffered bytes that are written at once.

    Raises:
        ConfigurationError: an argument has the wrong type or is out of range.

    The record of each line also carries the fields as a dict in its ``meshware_access``
    attribute, for handlers that format records themselves.
    """

    __slots__ = (
        "_failed",
        "_kept",
        "_level",
        "_logger",
        "_max_path",
        "_max_user_agent",
        "_sink",
        "now",
    )

    def __init__(
        self,
        logger: logging.Logger | str = ACCESS_LOGGER,
        *,
        handler: logging.Handler | Literal["auto"] | None = "auto",
        level: int = logging.INFO,
        max_path_length: int = 1024,
        max_user_agent_length: int = 256,
        wall_clock: Callable[[], float] = time.time,
        file: str | os.PathLike[str] | None = None,
        flush_interval: float = 1.0,
        buffer_bytes: int = 65536,
    ) -> None:
        self._sink: BufferedLineFile | None = None
        if file is not None:
            if logger != ACCESS_LOGGER or handler != "auto" or level != logging.INFO:
                raise ConfigurationError(
                    "a file takes the place of a logger: leave logger, handler and level unset",
                    field="access_log.file",
                    value=file,
                )
            handler = None  # the logger is not written to
            try:
                self._sink = BufferedLineFile(
                    file, flush_interval=flush_interval, buffer_bytes=buffer_bytes
                )
            except ConfigurationError as exc:
                name = "file" if exc.field == "path" else exc.field
                raise exc.moved(f"access_log.{name}", exc.value) from None
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise ConfigurationError(
                "expected a logging.Logger or a logger name",
                field="access_log.logger",
                value=logger,
            )
        if isinstance(level, bool) or not isinstance(level, int) or level <= 0:
            raise ConfigurationError(
                "expected a logging level above NOTSET", field="access_log.level", value=level
            )
        for field, value in (
            ("access_log.max_path_length", max_path_length),
            ("access_log.max_user_agent_length", max_user_agent_length),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError("expected a positive integer", field=field, value=value)
        if handler == "auto":
            if not logger.hasHandlers():
                stream = logging.StreamHandler(sys.stderr)
                stream.setFormatter(logging.Formatter("%(message)s"))
                logger.addHandler(stream)
                logger.propagate = False
        elif isinstance(handler, logging.Handler):
            if handler not in logger.handlers:
                logger.addHandler(handler)
        elif handler is not None:
            raise ConfigurationError(
                'expected "auto", a logging.Handler or None',
                field="access_log.handler",
                value=handler,
            )
        if handler is not None and logger.level == logging.NOTSET:
            logger.setLevel(level)
        self._logger = logger
        self._level = level
        self._max_path = max_path_length
        self._max_user_agent = max_user_agent_length
        self._failed = False
        # What _line keeps per combination of the fields that repeat.
        self._kept: dict[tuple[Any, ...], tuple[dict[str, Any], str, str, str]] = {}
        self.now = wall_clock
        """The wall clock the shells read a request's start time from."""

    @property
    def logger(self) -> logging.Logger:
        """The logger the lines are written to."""
        return self._logger

    @property
    def file(self) -> BufferedLineFile | None:
        """The file the lines are written to, or ``None`` when they go to the logger."""
        return self._sink

    @property
    def enabled(self) -> bool:
        """Whether a line written now would be kept (a file, or a logger whose level allows
        it)."""
        return self._sink is not None or self._logger.isEnabledFor(self._level)

    def close(self) -> None:
        """Write what a file still buffers and close it; nothing to do for a logger."""
        if self._sink is not None:
            self._sink.close()

    def fields(
        self,
        *,
        start_time: float,
        method: str,
        route: str | None,
        path: str,
        status: int,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        record: RequestRecord | None,
        trace_id: str | None,
        user_agent: str | None,
    ) -> dict[str, Any]:
        """The fields of one line as a dict (see the class docstring for their meaning).

        Args:
            start_time: when the request arrived, as a POSIX timestamp (``time.time()``).
            method: the request method.
            route: the route template, or ``None``.
            path: the raw request path, without the query.
            status: the response status code (``0`` when no response was sent).
            duration_ms: how long the request took, in milliseconds.
            bytes_in: the request body's size in bytes.
            bytes_out: the response body's size in bytes.
            record: what the inner layers noted about the request.
            trace_id: the request's trace id (32 hex digits), or ``None``.
            user_agent: the ``User-Agent`` header, or ``None``.
        """
        identity = None if record is None else record.identity
        line: dict[str, Any] = {
            "time": rfc3339_ms(start_time),
            "method": clean_text(method, 32),
            "route": route,
            "path": clean_text(path, self._max_path),
            "status": status,
            "duration_ms": round(duration_ms, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "source_principal": None if identity is None else identity.principal,
            "request_principal": None,
            "request_id": None,
            "trace_id": trace_id,
            "authz": None,
            "authz_policy": None,
            "authz_reason": None,
            "authz_dry_run": None,
            "ratelimit": None,
            "identity_error": None,
            "user_agent": None
            if user_agent is None
            else clean_text(user_agent, self._max_user_agent),
        }
        if record is not None:
            line["request_principal"] = record.request_principal
            line["request_id"] = record.request_id
            line["authz"] = record.authz_decision
            line["authz_policy"] = record.authz_policy
            line["authz_reason"] = record.authz_reason
            line["authz_dry_run"] = record.authz_dry_run
            line["ratelimit"] = record.ratelimit
            line["identity_error"] = record.identity_error
            if record.extra:
                for key, value in record.extra.items():
                    line.setdefault(str(key), value)
        return line

    def format(self, **fields: Any) -> str:
        """The JSON line for a request; takes the arguments of :meth:`fields`."""
        return _ENCODE(self.fields(**fields))

    def emit(
        self,
        *,
        start_time: float,
        method: str,
        route: str | None,
        path: str,
        status: int,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        record: RequestRecord | None,
        trace_id: str | None,
        user_agent: str | None,
    ) -> None:
        """Write the line of one request; takes the arguments of :meth:`fields`. Never raises."""
        self.write(
            start_time,
            method,
            route,
            path,
            status,
            duration_ms,
            bytes_in,
            bytes_out,
            record,
            trace_id,
            user_agent,
        )

    def write(
        self,
        start_time: float,
        method: str,
        route: str | None,
        path: str,
        status: int,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        record: RequestRecord | None,
        trace_id: str | None,
        user_agent: str | None,
    ) -> None:
        """:meth:`emit` with positional arguments, for the shells' per-request path."""
        logger = self._logger
        sink = self._sink
        if sink is None and not logger.isEnabledFor(self._level):
            return
        if type(self).fields is not AccessLog.fields:
            self._emit_fields(
                start_time=start_time,
                method=method,
                route=route,
                path=path,
                status=status,
                duration_ms=duration_ms,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                record=record,
                trace_id=trace_id,
                user_agent=user_agent,
            )
            return
        try:
            if record is None or record.extra:
                fields = self.fields(
                    start_time=start_time,
                    method=method,
                    route=route,
                    path=path,
                    status=status,
                    duration_ms=duration_ms,
                    bytes_in=bytes_in,
                    bytes_out=bytes_out,
                    record=record,
                    trace_id=trace_id,
                    user_agent=user_agent,
                )
                line = _ENCODE(fields)
            else:
                fields, line = self._line(
                    start_time,
                    method,
                    route,
                    path,
                    status,
                    duration_ms,
                    bytes_in,
                    bytes_out,
                    record,
                    trace_id,
                    user_agent,
                    sink is None,
                )
            if sink is not None:
                sink.write(line)
                return
            if type(logger).makeRecord is _MAKE_RECORD:
                # What Logger.makeRecord does, without its loop over ``extra``.
                log_record = logging.getLogRecordFactory()(
                    logger.name, self._level, "(access log)", 0, line, (), None, None, None
                )
                attributes = log_record.__dict__
                if "meshware_access" in attributes:
                    raise KeyError("Attempt to overwrite 'meshware_access' in LogRecord")
                attributes["meshware_access"] = fields
            else:
                log_record = logger.makeRecord(
                    logger.name,
                    self._level,
                    "(access log)",
                    0,
                    line,
                    (),
                    None,
                    extra={"meshware_access": fields},
                )
            logger.handle(log_record)
        except Exception:
            self._warn()

    def _line(
        self,
        start_time: float,
        method: str,
        route: str | None,
        path: str,
        status: int,
        duration_ms: float,
        bytes_in: int,
        bytes_out: int,
        record: RequestRecord,
        trace_id: str | None,
        user_agent: str | None,
        with_fields: bool = True,
    ) -> tuple[dict[str, Any], str]:
        """The fields of a request without ``extra`` fields, and their JSON line.

        The line is exactly ``_ENCODE(fields)``, written from the values. Without
        ``with_fields`` (a file needs only the line) the dict returned is the shared template,
        not to be changed. What repeats from
        request to request (method and route, caller, decisions, user agent) is encoded once
        per combination and kept, with a copy of the fields dict to start from.
        """
        identity = record.identity
        principal = None if identity is None else identity.principal
        key = (
            method,
            route,
            principal,
            record.request_principal,
            record.authz_decision,
            record.authz_policy,
            record.authz_reason,
            record.authz_dry_run,
            record.ratelimit,
            record.identity_error,
            user_agent,
        )
        try:
            kept = self._kept.get(key)
        except TypeError:  # a value that cannot be a key
            kept = self._parts(key)
        else:
            if kept is None:
                kept = self._parts(key)
                if len(self._kept) >= _MAX_KEPT:
                    self._kept.clear()
                self._kept[key] = kept
        template, head, middle, tail = kept
        if len(path) > self._max_path or not path.isprintable():
            path = clean_text(path, self._max_path)
        stamp = rfc3339_ms(start_time)
        duration = round(duration_ms, 3)
        request_id = record.request_id
        if with_fields:
            fields = template.copy()
            fields["time"] = stamp
            fields["path"] = path
            fields["status"] = status
            fields["duration_ms"] = duration
            fields["bytes_in"] = bytes_in
            fields["bytes_out"] = bytes_out
            fields["request_id"] = request_id
            fields["trace_id"] = trace_id
        else:
            fields = template
        took = (
            repr(duration)
            if type(duration) is float and duration - duration == 0.0
            else _json(duration)
        )
        # The time is digits and punctuation, never escaped.
        line = (
            f'{{"time":"{stamp}",{head}{_STRING(path)},'
            f'"status":{status if type(status) is int else _json(status)},'
            f'"duration_ms":{took},'
            f'"bytes_in":{bytes_in if type(bytes_in) is int else _json(bytes_in)},'
            f'"bytes_out":{bytes_out if type(bytes_out) is int else _json(bytes_out)},'
            f"{middle}{_STRING(request_id) if type(request_id) is str else _json(request_id)},"
            f'"trace_id":{_STRING(trace_id) if type(trace_id) is str else _json(trace_id)}{tail}'
        )
        return fields, line

    def _parts(self, key: tuple[Any, ...]) -> tuple[dict[str, Any], str, str, str]:
        """The fields dict (variable fields ``None``) and the JSON around the variable fields,
        for one combination of the fields that repeat."""
        (
            method,
            route,
            principal,
            request_principal,
            authz,
            authz_policy,
            authz_reason,
            dry_run,
            ratelimit,
            identity_error,
            user_agent,
        ) = key
        method = clean_text(method, 32)
        if user_agent is not None:
            user_agent = clean_text(user_agent, self._max_user_agent)
        template: dict[str, Any] = {
            "time": None,
            "method": method,
            "route": route,
            "path": None,
            "status": None,
            "duration_ms": None,
            "bytes_in": None,
            "bytes_out": None,
            "source_principal": principal,
            "request_principal": request_principal,
            "request_id": None,
            "trace_id": None,
            "authz": authz,
            "authz_policy": authz_policy,
            "authz_reason": authz_reason,
            "authz_dry_run": dry_run,
            "ratelimit": ratelimit,
            "identity_error": identity_error,
            "user_agent": user_agent,
        }
        head = f'"method":{_STRING(method)},"route":{_json(route)},"path":'
        middle = (
            f'"source_principal":{_json(principal)},'
            f'"request_principal":{_json(request_principal)},"request_id":'
        )
        tail = (
            f',"authz":{_json(authz)},"authz_policy":{_json(authz_policy)},'
            f'"authz_reason":{_json(authz_reason)},"authz_dry_run":{_json(dry_run)},'
            f'"ratelimit":{_json(ratelimit)},"identity_error":{_json(identity_error)},'
            f'"user_agent":{_json(user_agent)}}}'
        )
        return template, head, middle, tail

    def _emit_fields(self, **arguments: Any) -> None:
        # For subclasses that override fields(): the line is the encoding of their dict.
        logger = self._logger
        try:
            fields = self.fields(**arguments)
            line = _ENCODE(fields)
            if self._sink is not None:
                self._sink.write(line)
                return
            log_record = logger.makeRecord(
                logger.name,
                self._level,
                "(access log)",
                0,
                line,
                (),
                None,
                extra={"meshware_access": fields},
            )
            logger.handle(log_record)
        except Exception:
            self._warn()

    def _warn(self) -> None:
        if not self._failed:
            self._failed = True
            _internal_log.warning("could not write an access log line", exc_info=True)


def access_log_of(enabled: bool, file: str | None) -> bool | AccessLog:
    """What ``InboundConfig.access_log`` takes for the ``access_log`` and ``access_log_file``
    settings: ``enabled`` itself, or an :class:`AccessLog` writing to ``file`` (opened now).

    Raises:
        ConfigurationError: ``file`` cannot be opened for appending; ``field`` is
            ``"access_log_file"``.
    """
    if not enabled or file is None:
        return enabled
    try:
        return AccessLog(file=file)
    except ConfigurationError as exc:
        raise exc.moved("access_log_file", file) from None
