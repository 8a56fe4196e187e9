"""Live configuration changes: pick up edited mesh configuration files without a restart.

::

    from meshware.config.reload import ConfigWatcher

    watcher = ConfigWatcher(["mesh/"], service="orders", namespace="shop")
    watcher.subscribe(lambda config: stack.prepare(config.inbound_config()))
    watcher.start()            # a daemon thread checks the files once per second
    watcher.config             # the MeshConfig in force

A reload is all or nothing. The watcher notices a change with a cheap ``stat`` per file
(:meth:`ConfigSource.changed() <meshware.config.ConfigSource.changed>`, plus the listing of
each directory given), reads and validates the whole new configuration, then asks every
subscriber to *prepare* its part (build the new stack, the new route table, ...). Only when the
configuration and every subscriber are ready does it *commit*: each subscriber swaps its part
in with a single assignment, so a request sees either the old configuration or the new one,
never a mix. When anything fails, nothing is swapped: the last good configuration stays in
force, the error (every problem of every file) is logged once and kept in
:attr:`ConfigWatcher.last_error`, and the next change of the files is tried again.

Reloads are counted as ``meshware_config_reloads_total{outcome="ok"|"error"}`` when the
watcher is given a :class:`~meshware.telemetry.metrics.MeshMetrics`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from meshware.config.errors import MeshConfigError
from meshware.config.loader import MeshConfig, load_config
from meshware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from meshware.telemetry.metrics import MeshMetrics

__all__ = ["ConfigListener", "ConfigWatcher", "ReloadOutcome", "problems_of"]

logger = logging.getLogger("meshware.config")

ReloadOutcome = Literal["ok", "error", "unchanged"]
"""What one reload did: ``"ok"`` (a new configuration is in force), ``"error"`` (it was
refused; the last good one stays) or ``"unchanged"`` (the files hold the same content)."""

Commit = Callable[[], None]

ConfigListener = Callable[[MeshConfig], "Commit | None"]
"""A subscriber of a :class:`ConfigWatcher`: called with a new configuration, it builds
everything it needs from it and returns a *commit* callable that swaps its new part in (an
assignment; it must not fail), or ``None`` when it has nothing to swap. It raises
:class:`~meshware.exceptions.ConfigurationError` to refuse the configuration."""

_YAML_SUFFIXES = (".yaml", ".yml")

Fingerprint = tuple[tuple[str, int, int], ...]


def _yaml_files(directory: str) -> tuple[str, ...]:
    try:
        names = os.listdir(directory)
    except OSError:
        return ()
    return tuple(sorted(name for name in names if name.endswith(_YAML_SUFFIXES)))


class ConfigWatcher:
    """Holds the mesh configuration in force and reloads it when its files change.

    The first load happens in the constructor, so a broken configuration at start-up fails
    loudly (a service should not start on it). Later loads never raise: a broken file is
    refused, reported and counted, and the last good configuration stays in force.

    Args:
        sources: the YAML files and directories to read, as for
            :func:`~meshware.config.load_config`. A file added to or removed from a directory
            counts as a change.
        service: the service whose view to load (its ``app`` label), or ``None``.
        namespace: the service's namespace.
        root_namespace: the mesh's root namespace.
        interval: the fewest seconds between two checks of the files, by :meth:`poll` and by
            the thread of :meth:`start` (default 1).
        metrics: where reloads are counted (``meshware_config_reloads_total``), or ``None``.
        clock: the monotonic clock that paces the checks (seconds).
        wall_clock: the clock of :attr:`loaded_at` and :attr:`last_error_at` (Unix seconds).

    Attributes:
        sources: the files and directories watched, as given.
        interval: the seconds between checks.
        metrics: where reloads are counted, or ``None``.
        generation: how many configurations have been in force: 1 after the first load, one
            more per successful reload.
        loaded_at: when the configuration in force was loaded (Unix seconds).
        last_outcome: the outcome of the last reload, or ``None`` before any.
        last_error: the error of the last refused reload, or ``None`` when the last reload
            succeeded (or there was none). A :class:`~meshware.config.MeshConfigError` holds
            every problem in :attr:`~meshware.config.MeshConfigError.problems`.
        last_error_at: when :attr:`last_error` happened (Unix seconds), or ``None``.
        reloads: how many reloads ended ``"ok"`` and ``"error"``.

    Raises:
        MeshConfigError: the configuration has errors at start-up.
        ConfigurationError: an argument is invalid.
    """

    def __init__(
        self,
        sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        service: str | None = None,
        namespace: str = "default",
        root_namespace: str = "istio-system",
        interval: float = 1.0,
        metrics: MeshMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        self.sources: tuple[str, ...] = tuple(os.fspath(s) for s in sources)
        if not self.sources:
            raise ConfigurationError(
                "expected at least one file or directory", field="sources", value=sources
            )
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not math.isfinite(interval)
            or interval <= 0
        ):
            raise ConfigurationError(
                "expected a positive, finite number of seconds", field="interval", value=interval
            )
        self.interval = float(interval)
        self.metrics = metrics
        self._service = service
        self._namespace = namespace
        self._root_namespace = root_namespace
        self._clock = clock
        self._wall_clock = wall_clock
        self._directories = tuple(s for s in self.sources if os.path.isdir(s))
        self._lock = threading.Lock()
        self._listeners: list[ConfigListener] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._config = self._load()
        self._listing = self._listings()
        self.generation = 1
        self.loaded_at = wall_clock()
        self.last_outcome: ReloadOutcome | None = None
        self.last_error: ConfigurationError | None = None
        self.last_error_at: float | None = None
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}
        self._next_poll = clock() + self.interval
        self._failed: Fingerprint | None = None
        self._settling: Fingerprint | None = None
        self._logged_error: str | None = None

    @property
    def config(self) -> MeshConfig:
        """The configuration in force (read it once per use: a reload replaces it)."""
        return self._config

    def subscribe(self, listener: ConfigListener) -> None:
        """Call ``listener`` on every reload, after the configuration itself is valid (see
        :data:`ConfigListener`). Subscribers prepare in the order they subscribed."""
        if not callable(listener):
            raise ConfigurationError(
                "expected a callable taking a MeshConfig", field="listener", value=listener
            )
        with self._lock:
            self._listeners.append(listener)

    def poll(self) -> ReloadOutcome | None:
        """Check the files if ``interval`` has passed since the last check, and reload them
        when they changed and then stayed the same for one more check (``settle``, see
        :meth:`reload_if_changed`). Cheap enough to call on every request.

        Returns:
            The reload's outcome, or ``None`` when nothing was due or nothing changed.
        """
        now = self._clock()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.interval
        return self.reload_if_changed(settle=True)

    def reload_if_changed(self, *, settle: bool = False) -> ReloadOutcome | None:
        """Reload when a file (or a directory's listing) changed since the configuration in
        force was read. A change that was refused already is not tried again until the
        files change once more.

        Args:
            settle: reload only when the files look the same (modification times and sizes)
                as at the previous call, so that a file being written is not read half-way
                (a truncated policy file could be a valid, more permissive one). The thread
                of :meth:`start` and :meth:`poll` settle; a change then takes one more
                ``interval`` to apply.

        Returns:
            The reload's outcome, or ``None`` when nothing changed (or it is settling).
        """
        if not (self._config.source.changed() or self._listings() != self._listing):
            self._settling = None
            return None
        fingerprint = self._fingerprint()
        if self._failed is not None and fingerprint == self._failed:
            return None
        if settle and fingerprint != self._settling:
            self._settling = fingerprint
            return None
        self._settling = None
        return self.reload()

    def reload(self) -> ReloadOutcome:
        """Read the files now and, when the configuration and every subscriber accept it,
        swap it in. Never raises for a bad configuration (see :attr:`last_error`).

        Returns:
            ``"ok"``, ``"error"`` or ``"unchanged"`` (see :data:`ReloadOutcome`).
        """
        with self._lock:
            fingerprint = self._fingerprint()
            listing = self._listings()
            try:
                config = self._load()
                if config.source.digest == self._config.source.digest:
                    # Touched, not changed: adopt the new stat data so changed() settles.
                    self._config = config
                    self._listing = listing
                    self._failed = None
                    return "unchanged"
                commits = [listener(config) for listener in self._listeners]
            except Exception as exc:  # a reload must never take the service down
                self._refused(exc, fingerprint)
                return "error"
            for commit in commits:
                if commit is not None:
                    commit()
            self._config = config
            self._listing = listing
            self.generation += 1
            self.loaded_at = self._wall_clock()
            self.last_outcome = "ok"
            self.last_error = None
            self.last_error_at = None
            self._failed = None
            self._logged_error = None
            self.reloads["ok"] += 1
        if self.metrics is not None:
            self.metrics.record_config_reload("ok")
        logger.info(
            "mesh configuration reloaded: generation %d, digest %s, %d file(s)",
            self.generation,
            config.source.digest[:12],
            len(config.source.files),
        )
        return "ok"

    def start(self) -> None:
        """Check the files every ``interval`` seconds in a daemon thread (idempotent).

        Call it in the process that serves: threads do not survive ``fork()``, so a
        pre-forking server starts the watcher in each worker.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="meshware-config-watcher", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread of :meth:`start` and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the thread of :meth:`start` is running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reload_if_changed(settle=True)
            except Exception:  # keep watching whatever happens
                logger.exception("checking the mesh configuration files failed")

    def _load(self) -> MeshConfig:
        return load_config(
            list(self.sources),
            service=self._service,
            namespace=self._namespace,
            root_namespace=self._root_namespace,
        )

    def _listings(self) -> tuple[tuple[str, ...], ...]:
        return tuple(_yaml_files(directory) for directory in self._directories)

    def _fingerprint(self) -> Fingerprint:
        found: list[tuple[str, int, int]] = []
        for source in self.sources:
            paths = (
                [os.path.join(source, name) for name in _yaml_files(source)]
                if os.path.isdir(source)
                else [source]
            )
            for path in paths:
                try:
                    st = os.stat(path)
                except OSError:
                    found.append((path, -1, -1))
                else:
                    found.append((path, st.st_mtime_ns, st.st_size))
        return tuple(found)

    def _refused(self, exc: Exception, fingerprint: Fingerprint) -> None:
        error = (
            exc
            if isinstance(exc, ConfigurationError)
            else ConfigurationError(f"{type(exc).__name__}: {exc}")
        )
        if error is not exc:
            error.__cause__ = exc
        self.last_outcome = "error"
        self.last_error = error
        self.last_error_at = self._wall_clock()
        self._failed = fingerprint
        self.reloads["error"] += 1
        if self.metrics is not None:
            self.metrics.record_config_reload("error")
        text = str(error)
        if text != self._logged_error:
            self._logged_error = text
            logger.error(
                "mesh configuration reload refused; the last good configuration "
                "(generation %d, digest %s) stays in force:\n%s",
                self.generation,
                self._config.source.digest[:12],
                text,
                exc_info=None if isinstance(exc, ConfigurationError) else exc,
            )

    def __repr__(self) -> str:
        return (
            f"<ConfigWatcher {', '.join(self.sources)}: generation {self.generation}, "
            f"digest {self._config.source.digest[:12]}, last outcome {self.last_outcome}>"
        )


def problems_of(error: BaseException | None) -> list[str]:
    """The problems of a refused configuration, one line each (empty for ``None``)."""
    if error is None:
        return []
    if isinstance(error, MeshConfigError):
        return [str(problem) for problem in error.problems]
    return [str(error)]
