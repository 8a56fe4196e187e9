"""Health and readiness: the framework-neutral core behind ``/livez`` and ``/readyz``.

Three pieces, all free of any web framework:

- ``HealthChecks`` is the registry of checks and the readiness state machine
  (``STARTING -> READY -> DRAINING``). It runs checks concurrently, each under its own timeout,
  caches their results briefly so a storm of probes does not run them per request, and never
  lets a check's exception escape.
- ``HealthReport`` is the outcome of one evaluation, renderable as a body in the format of the
  IETF health-check draft (``draft-inadarei-api-health-check``, ``application/health+json``).
- ``HealthResponder`` turns ``(method, path, query)`` into a ``HealthResponse`` (status code,
  headers, body). The ASGI and WSGI ``HealthMiddleware`` shells only write that response out;
  ``HealthMiddlewareBase`` holds the arguments and state they share.

A check is any callable taking no arguments, plain or ``async``. It passes by returning ``None``
or ``True``, fails by returning ``False`` or raising, and may return a ``(status, detail)`` pair
or a ``CheckResult`` to say more (``"warn"``, an observed value, an output message).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import inspect
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, Literal, TypeVar

from meshware.exceptions import ConfigurationError

__all__ = [
    "HEALTH_CONTENT_TYPE",
    "CheckKind",
    "CheckOutcome",
    "CheckResult",
    "CheckStatus",
    "HealthCheck",
    "HealthChecks",
    "HealthMiddlewareBase",
    "HealthReport",
    "HealthResponder",
    "HealthResponse",
    "HealthState",
    "wants_verbose",
]

logger = logging.getLogger("meshware.health")

HEALTH_CONTENT_TYPE = "application/health+json"
"""The media type of health bodies, from the IETF health-check draft."""

CheckStatus = Literal["pass", "warn", "fail"]
"""The status of a check or of a whole report, as the IETF health-check draft names them."""

CheckKind = Literal["readiness", "liveness"]
"""Which probe a check belongs to: ``/readyz`` (readiness) or ``/livez`` (liveness)."""

# The draft lists these spellings as equivalent ("ok"/"up" for NodeJS/Java users).
_STATUS_ALIASES: Mapping[str, CheckStatus] = {
    "pass": "pass",
    "ok": "pass",
    "up": "pass",
    "warn": "warn",
    "fail": "fail",
    "error": "fail",
    "down": "fail",
}
_KINDS = frozenset({"readiness", "liveness"})
_ALLOW = "GET, HEAD"


class HealthState(enum.Enum):
    """The readiness state of a service.

    ``STARTING`` until the application has started, ``READY`` while it serves, and
    ``DRAINING`` once shutdown has begun. ``/readyz`` answers 200 only in ``READY``;
    ``/livez`` does not depend on the state at all.
    """

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalize_status(value: object) -> CheckStatus | None:
    if isinstance(value, str):
        return _STATUS_ALIASES.get(value.strip().lower())
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """A detailed result a check may return instead of ``None``/``True``/``False``.

    Args:
        status: ``"pass"``, ``"warn"`` or ``"fail"`` (the draft's aliases ``"ok"``, ``"up"``,
            ``"error"`` and ``"down"`` are accepted and normalized).
        output: a human-readable message; shown as the check's ``"output"``.
        observed_value: a measured value (a number, string, list or mapping that JSON can
            represent), shown as ``"observedValue"``.
        observed_unit: the unit of ``observed_value`` (``"ms"``, ``"percent"``), shown as
            ``"observedUnit"``.

    Raises:
        ConfigurationError: if ``status`` is not one of the accepted words or ``output`` is
            not a string.
    """

    status: CheckStatus
    output: str = ""
    observed_value: Any = None
    observed_unit: str | None = None

    def __post_init__(self) -> None:
        normalized = _normalize_status(self.status)
        if normalized is None:
            raise ConfigurationError(
                "expected 'pass', 'warn' or 'fail'", field="status", value=self.status
            )
        object.__setattr__(self, "status", normalized)
        if not isinstance(self.output, str):
            raise ConfigurationError("expected a string", field="output", value=self.output)
        if self.observed_unit is not None and not isinstance(self.observed_unit, str):
            raise ConfigurationError(
                "expected a string or None", field="observed_unit", value=self.observed_unit
            )


def _is_async_callable(check: Callable[..., object]) -> bool:
    if inspect.iscoroutinefunction(check):
        return True
    call = getattr(check, "__call__", None)  # noqa: B004 - instances with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """One registered check. Built by ``HealthChecks.add``; rarely constructed directly.

    Args:
        name: the key of the check in the verbose body (the draft suggests
            ``"<component>:<measurement>"``, e.g. ``"postgres:connections"``).
        check: a plain or ``async`` callable taking no arguments (see ``HealthChecks.add``).
        timeout: seconds the check may take before it is reported as failed with a
            ``"timeout"`` output; a positive finite number.
        critical: whether a failure fails the probe (503). A failing non-critical check only
            turns the overall status into ``"warn"`` and the probe still answers 200.
        kind: ``"readiness"`` (``/readyz``) or ``"liveness"`` (``/livez``).
        component_type: the draft's ``"componentType"`` (``"datastore"``, ``"component"``,
            ``"system"``), or ``None`` to leave it out.

    Raises:
        ConfigurationError: naming the field and the value when an argument is invalid.
    """

    name: str
    check: Callable[[], object]
    timeout: float = 1.0
    critical: bool = True
    kind: CheckKind = "readiness"
    component_type: str | None = None
    is_async: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError("expected a non-empty string", field="name", value=self.name)
        if not callable(self.check):
            raise ConfigurationError(
                "expected a callable taking no arguments", field="check", value=self.check
            )
        if not _is_number(self.timeout) or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ConfigurationError(
                "expected a positive number of seconds", field="timeout", value=self.timeout
            )
        if not isinstance(self.critical, bool):
            raise ConfigurationError(
                "expected True or False", field="critical", value=self.critical
            )
        if self.kind not in _KINDS:
            raise ConfigurationError(
                "expected 'readiness' or 'liveness'", field="kind", value=self.kind
            )
        if self.component_type is not None and not isinstance(self.component_type, str):
            raise ConfigurationError(
                "expected a string or None", field="component_type", value=self.component_type
            )
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "is_async", _is_async_callable(self.check))


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckOutcome:
    """What one run of one check produced.

    Attributes:
        name: the check's name.
        status: ``"pass"``, ``"warn"`` or ``"fail"`` for this check alone (a failing
            non-critical check is ``"fail"`` here; only the report's status softens it).
        output: the check's message: what it returned, ``"<ExceptionType>: <message>"`` when
            it raised, or ``"timeout: ..."`` when it did not finish within its timeout.
        time: when the result was taken, seconds since the epoch (from the wall clock).
        critical: whether the check is critical.
        observed_value: the value the check reported, or ``None``.
        observed_unit: the unit of ``observed_value``, or ``None``.
        component_type: the check's ``component_type``, or ``None``.
    """

    name: str
    status: CheckStatus
    output: str
    time: float
    critical: bool
    observed_value: Any = None
    observed_unit: str | None = None
    component_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the check's entry in the ``"checks"`` object of a verbose body."""
        entry: dict[str, Any] = {"status": self.status}
        if self.component_type is not None:
            entry["componentType"] = self.component_type
        if self.observed_value is not None:
            entry["observedValue"] = self.observed_value
        if self.observed_unit is not None:
            entry["observedUnit"] = self.observed_unit
        entry["output"] = self.output
        entry["time"] = _iso8601(self.time)
        return entry


def _iso8601(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """The outcome of evaluating one probe.

    Attributes:
        kind: ``"readiness"`` or ``"liveness"``.
        status: ``"fail"`` if the service is not ``READY`` (readiness only) or a critical
            check failed; ``"warn"`` if any check warned or a non-critical check failed;
            ``"pass"`` otherwise.
        state: the readiness state at the time of the evaluation.
        checks: one outcome per check that ran, in registration order (empty when the
            checks did not run because the service was not ``READY``).
        output: a one-line summary for ``"warn"``/``"fail"`` (``"starting"``, ``"draining"``,
            ``"failing: db"``, ``"warning: cache"``); ``""`` on ``"pass"``.
    """

    kind: CheckKind
    status: CheckStatus
    state: HealthState
    checks: tuple[CheckOutcome, ...] = ()
    output: str = ""

    @property
    def http_status(self) -> int:
        """503 when ``status`` is ``"fail"``, otherwise 200."""
        return 503 if self.status == "fail" else 200

    def to_dict(self, *, verbose: bool = False) -> dict[str, Any]:
        """Return the report as the draft's JSON object.

        Args:
            verbose: include the ``"checks"`` object with one entry list per check.
        """
        body: dict[str, Any] = {"status": self.status}
        if self.output:
            body["output"] = self.output
        if verbose:
            body["checks"] = {outcome.name: [outcome.to_dict()] for outcome in self.checks}
        return body


def _summarize(
    kind: CheckKind, state: HealthState, outcomes: tuple[CheckOutcome, ...]
) -> HealthReport:
    failing = [o.name for o in outcomes if o.status == "fail" and o.critical]
    if failing:
        return HealthReport(
            kind=kind,
            status="fail",
            state=state,
            checks=outcomes,
            output="failing: " + ", ".join(failing),
        )
    warning = [o.name for o in outcomes if o.status != "pass"]
    if warning:
        return HealthReport(
            kind=kind,
            status="warn",
            state=state,
            checks=outcomes,
            output="warning: " + ", ".join(warning),
        )
    return HealthReport(kind=kind, status="pass", state=state, checks=outcomes)


# --- running checks --------------------------------------------------------------------------

_Verdict = tuple[CheckStatus, str, Any, "str | None"]


def _interpret(value: object) -> _Verdict:
    """Map whatever a check returned to (status, output, observed value, observed unit)."""
    if value is None or value is True:
        return ("pass", "", None, None)
    if value is False:
        return ("fail", "check returned False", None, None)
    if isinstance(value, CheckResult):
        return (value.status, value.output, value.observed_value, value.observed_unit)
    if isinstance(value, tuple) and len(value) == 2:
        raw_status, detail = value
        status = _normalize_status(raw_status)
        if status is None:
            return ("fail", f"check returned an unknown status {raw_status!r}", None, None)
        if detail is None:
            return (status, "", None, None)
        if isinstance(detail, str):
            return (status, detail, None, None)
        if isinstance(detail, Mapping):
            output = detail.get("output", "")
            unit = detail.get("observedUnit")
            return (
                status,
                output if isinstance(output, str) else str(output),
                detail.get("observedValue"),
                unit if unit is None or isinstance(unit, str) else str(unit),
            )
        return (status, str(detail), None, None)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited; closing avoids a "never awaited" warning
        return ("fail", "check returned an awaitable; register an async def instead", None, None)
    return (
        "fail",
        f"check returned an unsupported value of type {type(value).__name__}",
        None,
        None,
    )


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception:
        message = ""
    return f"{name}: {message}" if message else name


def _run_sync_check(check: Callable[[], object]) -> _Verdict:
    try:
        return _interpret(check())
    except Exception as exc:
        return ("fail", _describe(exc), None, None)


async def _run_async_check(check: Callable[[], object]) -> _Verdict:
    try:
        return _interpret(await check())  # type: ignore[misc]
    except Exception as exc:
        return ("fail", _describe(exc), None, None)


def _run_async_check_in_thread(check: Callable[[], object], timeout: float) -> _Verdict:
    # Sync callers (WSGI) run async checks on a private loop in a pool thread.
    try:
        return asyncio.run(asyncio.wait_for(_run_async_check(check), timeout))
    except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
        return _timeout_verdict(timeout)


def _jsonable(value: object) -> object:
    # Checked once per run, so rendering (once per probe) cannot fail on a check's value.
    try:
        json.dumps(value, default=str)
    except Exception:
        try:
            return str(value)
        except Exception:
            return f"<unrepresentable {type(value).__name__}>"
    return value


def _timeout_verdict(timeout: float) -> _Verdict:
    return ("fail", f"timeout: no result within {timeout:g}s", None, None)


_STILL_RUNNING: _Verdict = ("fail", "timeout: the previous run has not finished yet", None, None)


_IDLE_SECONDS = 10.0
_ASYNC_GRACE = 0.25


class _DaemonPool:
    """A small pool of daemon threads.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so a check
    that hangs forever would block the process from exiting; daemon threads do not. Threads
    leave after ``_IDLE_SECONDS`` without work and are started again on demand.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[_Verdict], Callable[[], _Verdict]]
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work (or just handed some, not yet counted)
        self._queued = 0  # items put and not yet taken

    def submit(self, fn: Callable[[], _Verdict]) -> concurrent.futures.Future[_Verdict]:
        future: concurrent.futures.Future[_Verdict] = concurrent.futures.Future()
        with self._lock:
            self._queue.put((future, fn))
            self._queued += 1
            # An item taken but not yet counted is in both _queued and _idle, so this
            # compares the items nobody will pick up with the threads free to pick them up.
            if self._queued > self._idle and self._threads < self._max_workers:
                self._threads += 1
                threading.Thread(target=self._work, name="meshware-health", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                future, fn = self._queue.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queued == 0:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # pragma: no cover - fn never raises Exception
                future.set_exception(exc)


class HealthChecks:
    """The registry of health checks and the service's readiness state.

    One instance is shared by the inbound shells (which answer the probes and drive the state
    from the server's lifecycle) and the application (which registers checks and may call
    ``mark_ready()`` / ``mark_draining()`` itself).

    Checks run concurrently, each under its own timeout: ``async`` checks with
    ``asyncio.wait_for``, plain ones on a small pool of daemon threads. A check that hangs is
    reported as failed with a ``"timeout: ..."`` output once its timeout elapses; while a hung
    plain check is still running, later evaluations report it the same way at once instead of
    starting another copy. Results are cached for ``cache_seconds`` per probe kind, and
    concurrent evaluations on a cache miss share one run.

    Args:
        cache_seconds: how long the results of one evaluation answer later probes (0 turns
            caching off). Applies to readiness and liveness checks alike.
        clock: a monotonic clock in seconds, used for the cache; inject a fake in tests.
        wall_clock: seconds since the epoch, used for the ``"time"`` of each result.
        max_workers: the most threads that run plain (non-``async``) checks at once.

    Raises:
        ConfigurationError: if ``cache_seconds`` is negative or not finite, or
            ``max_workers`` is not a positive integer.
    """

    def __init__(
        self,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_workers: int = 4,
    ) -> None:
        if not _is_number(cache_seconds) or not math.isfinite(cache_seconds) or cache_seconds < 0:
            raise ConfigurationError(
                "expected a number of seconds >= 0", field="cache_seconds", value=cache_seconds
            )
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ConfigurationError(
                "expected a positive integer", field="max_workers", value=max_workers
            )
        self._cache_seconds = float(cache_seconds)
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_workers = max_workers
        self._specs: dict[CheckKind, tuple[HealthCheck, ...]] = {"readiness": (), "liveness": ()}
        self._names: set[str] = set()
        self._state = HealthState.STARTING
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        # Everything here is per process: threads and locks do not survive a fork (gunicorn).
        self._pid = os.getpid()
        self._state_lock = threading.Lock()
        self._pool = _DaemonPool(self._max_workers)
        self._running: dict[str, concurrent.futures.Future[_Verdict]] = {}
        self._cache: dict[CheckKind, tuple[float, HealthReport]] = {}
        self._sync_locks: dict[CheckKind, threading.Lock] = {
            "readiness": threading.Lock(),
            "liveness": threading.Lock(),
        }
        self._pending: dict[CheckKind, asyncio.Task[HealthReport]] = {}

    # -- registration ---------------------------------------------------------------------

    def add(
        self,
        name: str,
        check: Callable[[], object],
        *,
        timeout: float = 1.0,
        critical: bool = True,
        kind: CheckKind = "readiness",
        component_type: str | None = None,
    ) -> HealthCheck:
        """Register a check.

        Args:
            name: a unique name; the check's key in the verbose body.
            check: a plain or ``async`` callable taking no arguments. It passes by returning
                ``None`` or ``True``; fails by returning ``False`` or raising (the output is
                ``"<ExceptionType>: <message>"``, the exception never escapes); or returns a
                ``(status, detail)`` pair where status is ``"pass"``/``"warn"``/``"fail"`` and
                detail is an output string or a mapping with ``"output"``,
                ``"observedValue"`` and ``"observedUnit"``; or returns a ``CheckResult``.
            timeout: seconds before the check is reported as failed with a ``"timeout"``
                output.
            critical: whether a failure fails the probe; a failing non-critical check only
                makes the status ``"warn"``.
            kind: ``"readiness"`` for ``/readyz`` or ``"liveness"`` for ``/livez``. Keep
                liveness checks to the process itself: a liveness failure gets the container
                restarted, which does not fix a database that is down.
            component_type: the draft's ``"componentType"`` for the verbose body.

        Returns:
            The registered ``HealthCheck``.

        Raises:
            ConfigurationError: if an argument is invalid or the name is already registered.
        """
        spec = HealthCheck(
            name=name,
            check=check,
            timeout=timeout,
            critical=critical,
            kind=kind,
            component_type=component_type,
        )
        if name in self._names:
            raise ConfigurationError(
                "a check with this name is already registered", field="name", value=name
            )
        self._names.add(name)
        self._specs[spec.kind] = (*self._specs[spec.kind], spec)
        self._cache.pop(spec.kind, None)
        return spec

    @property
    def registered(self) -> tuple[HealthCheck, ...]:
        """All registered checks, readiness checks first, each in registration order."""
        return self._specs["readiness"] + self._specs["liveness"]

    # -- the state machine ----------------------------------------------------------------

    @property
    def state(self) -> HealthState:
        """The current readiness state."""
        return self._state

    def mark_ready(self) -> None:
        """Move from ``STARTING`` to ``READY``.

        Does nothing when already ``READY``, and nothing when ``DRAINING``: a service that
        has begun shutting down never becomes ready again.
        """
        with self._state_lock:
            if self._state is HealthState.STARTING:
                self._state = HealthState.READY
                logger.info("health: ready")

    def mark_draining(self) -> None:
        """Move to ``DRAINING`` from any state; ``/readyz`` answers 503 from now on."""
        with self._state_lock:
            if self._state is not HealthState.DRAINING:
                self._state = HealthState.DRAINING
                logger.info("health: draining")

    # -- evaluation -----------------------------------------------------------------------

    def _not_ready(self, kind: CheckKind) -> HealthReport | None:
        state = self._state
        if kind == "readiness" and state is not HealthState.READY:
            return HealthReport(kind=kind, status="fail", state=state, output=state.value)
        return None

    def _cached(self, kind: CheckKind) -> HealthReport | None:
        entry = self._cache.get(kind)
        if entry is not None and self._clock() < entry[0]:
            return entry[1]
        return None

    def _store(self, kind: CheckKind, outcomes: tuple[CheckOutcome, ...]) -> HealthReport:
        report = _summarize(kind, self._state, outcomes)
        if self._cache_seconds > 0:
            self._cache[kind] = (self._clock() + self._cache_seconds, report)
        return report

    def _outcome(self, spec: HealthCheck, verdict: _Verdict) -> CheckOutcome:
        status, output, observed_value, observed_unit = verdict
        if observed_value is not None:
            observed_value = _jsonable(observed_value)
        return CheckOutcome(
            name=spec.name,
            status=status,
            output=output,
            time=self._wall_clock(),
            critical=spec.critical,
            observed_value=observed_value,
            observed_unit=observed_unit,
            component_type=spec.component_type,
        )

    def _submit(self, spec: HealthCheck) -> concurrent.futures.Future[_Verdict] | None:
        """Start a plain check (or an async one for a sync caller) on the pool.

        Returns ``None`` when the previous run of the same check is still going.
        """
        previous = self._running.get(spec.name)
        if previous is not None and not previous.done():
            return None
        if spec.is_async:
            timeout = spec.timeout
            future = self._pool.submit(lambda: _run_async_check_in_thread(spec.check, timeout))
        else:
            future = self._pool.submit(lambda: _run_sync_check(spec.check))
        self._running[spec.name] = future
        return future

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._reset_runtime()

    async def evaluate(self, kind: CheckKind = "readiness") -> HealthReport:
        """Evaluate the ``kind`` probe from async code (the ASGI shell uses this).

        A readiness evaluation while not ``READY`` returns ``"fail"`` at once without running
        any check. Otherwise a fresh cached report is returned if there is one; if not, the
        checks run (one shared run for concurrent callers) and the report is cached.

        Args:
            kind: ``"readiness"`` or ``"liveness"``.

        Returns:
            The ``HealthReport``. Never raises because of a check.
        """
        early = self._not_ready(kind) or self._cached(kind)
        if early is not None:
            return early
        self._check_fork()
        loop = asyncio.get_running_loop()
        task = self._pending.get(kind)
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._run_all_async(kind))
            self._pending[kind] = task
        # Shielded: a probe whose client goes away must not cancel the run others wait on.
        return await asyncio.shield(task)

    async def _run_all_async(self, kind: CheckKind) -> HealthReport:
        specs = self._specs[kind]
        if not specs:
            return self._store(kind, ())
        outcomes = await asyncio.gather(*(self._run_one_async(spec) for spec in specs))
        return self._store(kind, tuple(outcomes))

    async def _run_one_async(self, spec: HealthCheck) -> CheckOutcome:
        awaitable: Awaitable[_Verdict]
        if spec.is_async:
            awaitable = _run_async_check(spec.check)
        else:
            future = self._submit(spec)
            if future is None:
                return self._outcome(spec, _STILL_RUNNING)
            awaitable = asyncio.wrap_future(future)
        try:
            verdict = await asyncio.wait_for(awaitable, spec.timeout)
        except asyncio.TimeoutError:
            verdict = _timeout_verdict(spec.timeout)
        return self._outcome(spec, verdict)

    def evaluate_sync(self, kind: CheckKind = "readiness") -> HealthReport:
        """Evaluate the ``kind`` probe from a plain thread (the WSGI shell uses this).

        Same semantics as ``evaluate``; concurrent callers on a cache miss wait for the one
        run in progress and then share its result.

        Args:
            kind: ``"readiness"`` or ``"liveness"``.

        Returns:
            The ``HealthReport``. Never raises because of a check.
        """
        early = self._not_ready(kind) or self._cached(kind)
        if early is not None:
            return early
        self._check_fork()
        with self._sync_locks[kind]:
            cached = self._cached(kind)
            if cached is not None:
                return cached
            specs = self._specs[kind]
            started = time.monotonic()
            futures = [(spec, self._submit(spec)) for spec in specs]
            outcomes = []
            for spec, future in futures:
                if future is None:
                    outcomes.append(self._outcome(spec, _STILL_RUNNING))
                    continue
                # All checks started together, so each one's deadline counts from `started`.
                # An async check times itself out on its own loop; the grace lets that result
                # arrive, and only a check blocking that loop is cut off by the wait here.
                deadline = started + spec.timeout + (_ASYNC_GRACE if spec.is_async else 0.0)
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    verdict = future.result(timeout=remaining)
                except concurrent.futures.TimeoutError:
                    verdict = _timeout_verdict(spec.timeout)
                outcomes.append(self._outcome(spec, verdict))
            return self._store(kind, tuple(outcomes))


def wants_verbose(query: str) -> bool:
    """Whether a raw query string asks for a verbose body: ``verbose`` present, any value.

    ``"verbose"``, ``"verbose="``, ``"verbose=1"`` and ``"a=b&verbose"`` all count;
    ``"verbosee=1"`` and ``"x=verbose"`` do not. Never raises.
    """
    if "verbose" not in query:
        return False
    return any(part.split("=", 1)[0] == "verbose" for part in query.split("&"))


@dataclass(frozen=True, slots=True)
class HealthResponse:
    """A complete answer to a health request, ready for a shell to write out.

    Attributes:
        status: the HTTP status code (200, 503 or 405).
        headers: ``(name, value)`` pairs with lower-case names.
        body: the body bytes (empty for ``HEAD`` and 405).
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class HealthResponder:
    """Answers requests to the liveness and readiness paths.

    The shells call ``respond`` (async) or ``respond_sync`` for any request whose path is in
    ``paths``; everything the answer needs beyond the request line is fixed here.

    Args:
        checks: the registry whose checks and state the answers report.
        live_path: the liveness path (``/livez``); a path starting with ``/``.
        ready_path: the readiness path (``/readyz``); a different path starting with ``/``.
        service_id: the draft's ``"serviceId"``, or ``None`` to leave it out.
        version: the draft's ``"version"`` (the public version of the service), or ``None``.
        release_id: the draft's ``"releaseId"`` (the build or release), or ``None``.

    Raises:
        ConfigurationError: if a path is empty, does not start with ``/``, contains ``?``
            or ``#``, or both paths are the same; or a metadata value is not a string.
    """

    def __init__(
        self,
        checks: HealthChecks,
        *,
        live_path: str = "/livez",
        ready_path: str = "/readyz",
        service_id: str | None = None,
        version: str | None = None,
        release_id: str | None = None,
    ) -> None:
        for name, path in (("live_path", live_path), ("ready_path", ready_path)):
            if not isinstance(path, str) or not path.startswith("/") or "?" in path or "#" in path:
                raise ConfigurationError(
                    "expected a path starting with '/' and without a query", field=name, value=path
                )
        if live_path == ready_path:
            raise ConfigurationError(
                "expected a path different from live_path", field="ready_path", value=ready_path
            )
        for name, value in (
            ("service_id", service_id),
            ("version", version),
            ("release_id", release_id),
        ):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError("expected a string or None", field=name, value=value)
        self.checks = checks
        self.paths: frozenset[str] = frozenset({live_path, ready_path})
        self._kinds: dict[str, CheckKind] = {live_path: "liveness", ready_path: "readiness"}
        meta: dict[str, str] = {}
        if version is not None:
            meta["version"] = version
        if release_id is not None:
            meta["releaseId"] = release_id
        if service_id is not None:
            meta["serviceId"] = service_id
        self._meta = meta
        self._not_allowed = HealthResponse(
            405,
            (("allow", _ALLOW), ("cache-control", "no-store"), ("content-length", "0")),
            b"",
        )

    def kind_of(self, path: str) -> CheckKind | None:
        """Return ``"liveness"``/``"readiness"`` for a health path, ``None`` for others."""
        return self._kinds.get(path)

    def render(self, report: HealthReport, *, method: str, verbose: bool) -> HealthResponse:
        """Build the response for an evaluated report.

        Args:
            report: the evaluation to show.
            method: ``"GET"`` or ``"HEAD"`` (``HEAD`` gets the same headers, no body).
            verbose: include the ``"checks"`` object.
        """
        body = report.to_dict(verbose=verbose)
        if self._meta:
            # "status" first, then the service's metadata, as the draft's examples show.
            body = {"status": body["status"], **self._meta, **body}
        # default=str: an observed value JSON cannot represent must not break the probe.
        data = json.dumps(body, default=str).encode()
        headers = (
            ("content-type", HEALTH_CONTENT_TYPE),
            ("cache-control", "no-store"),
            ("content-length", str(len(data))),
        )
        return HealthResponse(report.http_status, headers, b"" if method == "HEAD" else data)

    async def respond(self, method: str, path: str, query: str = "") -> HealthResponse:
        """Answer a request to one of ``paths`` from async code.

        Args:
            method: the request method, upper-case.
            path: one of ``paths``.
            query: the raw query string without ``?``.

        Returns:
            200/503 with an ``application/health+json`` body for ``GET``/``HEAD``, 405 with
            ``Allow: GET, HEAD`` for other methods.

        Raises:
            KeyError: if ``path`` is not one of ``paths``.
        """
        kind = self._kinds[path]
        if method != "GET" and method != "HEAD":
            return self._not_allowed
        report = await self.checks.evaluate(kind)
        return self.render(report, method=method, verbose=wants_verbose(query))

    def respond_sync(self, method: str, path: str, query: str = "") -> HealthResponse:
        """Answer a request to one of ``paths`` from a plain thread; see ``respond``."""
        kind = self._kinds[path]
        if method != "GET" and method != "HEAD":
            return self._not_allowed
        report = self.checks.evaluate_sync(kind)
        return self.render(report, method=method, verbose=wants_verbose(query))


_App = TypeVar("_App")


class HealthMiddlewareBase(Generic[_App]):
    """What the ASGI and the WSGI ``HealthMiddleware`` share: their arguments and the
    ``HealthResponder`` that answers ``live_path`` and ``ready_path``.

    ``GET``/``HEAD`` on ``live_path`` or ``ready_path`` is answered directly with an
    ``application/health+json`` body (add ``?verbose`` for per-check details); other methods
    on those paths get 405. Every other request goes to ``app`` untouched.

    Args:
        app: the application to wrap.
        checks: the registry of checks and the readiness state; a new empty one when
            ``None``. Available afterwards as ``middleware.checks``.
        live_path: the liveness path.
        ready_path: the readiness path.
        service_id: ``"serviceId"`` in health bodies, or ``None`` to leave it out.
        version: ``"version"`` in health bodies, or ``None``.
        release_id: ``"releaseId"`` in health bodies, or ``None``.
        ready_on_start: mark the service ready once it has started; each shell says when
            that is. Pass ``False`` to call ``checks.mark_ready()`` yourself, e.g. after
            warming caches.

    Raises:
        ConfigurationError: if a path or a metadata value is invalid (see
            ``HealthResponder``).

    Attributes:
        paths: the health paths as a frozenset, for outer layers (telemetry) that skip them.
        checks: the ``HealthChecks`` in use.
    """

    def __init__(
        self,
        app: _App,
        *,
        checks: HealthChecks | None = None,
        live_path: str = "/livez",
        ready_path: str = "/readyz",
        service_id: str | None = None,
        version: str | None = None,
        release_id: str | None = None,
        ready_on_start: bool = True,
    ) -> None:
        self.app = app
        self.checks = checks if checks is not None else HealthChecks()
        self._responder = HealthResponder(
            self.checks,
            live_path=live_path,
            ready_path=ready_path,
            service_id=service_id,
            version=version,
            release_id=release_id,
        )
        self.paths: frozenset[str] = self._responder.paths
        self._apply_ready_on_start(ready_on_start)

    def _apply_ready_on_start(self, ready_on_start: bool) -> None:
        """Apply ``ready_on_start``; here the service has started once its middleware is
        built. A shell that learns of the start later overrides this."""
        if ready_on_start:
            self.checks.mark_ready()
