"""A buffered, line-oriented log file, as Envoy writes its access log files.

Lines are collected in memory and written with one ``os.write`` when the buffer holds
``buffer_bytes`` or when ``flush_interval`` seconds have passed (a daemon thread flushes on
that interval), and once more at interpreter exit. Each write carries whole lines and the file
is opened with ``O_APPEND``, so processes sharing a file (gunicorn workers, ``/dev/stdout`` of
a container) never split each other's lines.

Per line the caller pays a lock and a list append: no ``logging`` record, handler lock,
formatter or system call per request.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Final

from meshware.exceptions import ConfigurationError

__all__ = ["BufferedLineFile"]

_internal_log = logging.getLogger("meshware.telemetry")
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

# Every open file, flushed at exit and reset in a forked child (whose buffer would otherwise
# repeat the parent's unflushed lines, and whose flusher thread does not exist).
_open_files: weakref.WeakSet[BufferedLineFile] = weakref.WeakSet()


class BufferedLineFile:
    """Appends text lines to a file, buffered.

    Args:
        path: the file; created (mode 0644 less the umask) when missing. ``/dev/stdout`` and
            ``/dev/stderr`` write to the process's own streams.
        flush_interval: the most seconds a written line waits before it reaches the file
            (Envoy's ``file_flush_interval``, 1 s by default).
        buffer_bytes: a buffer holding this many bytes is written at once, from the thread
            that filled it (Envoy flushes at 64 KiB).

    Raises:
        ConfigurationError: an argument is invalid, or the file cannot be opened (the
            operating system's reason is in the message).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_failed",
        "_fd",
        "_lines",
        "_lock",
        "_size",
        "_thread",
        "_wake",
        "buffer_bytes",
        "flush_interval",
        "path",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 1.0,
        buffer_bytes: int = 65536,
    ) -> None:
        if isinstance(flush_interval, bool) or not isinstance(flush_interval, (int, float)):
            raise ConfigurationError(
                "expected seconds as a number", field="flush_interval", value=flush_interval
            )
        if not 0.0 < flush_interval <= 3600.0:
            raise ConfigurationError(
                "expected seconds above 0 and at most 3600",
                field="flush_interval",
                value=flush_interval,
            )
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
            raise ConfigurationError(
                "expected a positive number of bytes", field="buffer_bytes", value=buffer_bytes
            )
        try:
            text_path = os.fspath(path)
        except TypeError:
            raise ConfigurationError("expected a file path", field="path", value=path) from None
        if not isinstance(text_path, str) or not text_path or "\x00" in text_path:
            raise ConfigurationError(
                "expected a file path (text without NUL characters)", field="path", value=path
            )
        try:
            self._fd = os.open(text_path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot open {text_path} for appending: {exc.strerror}",
                field="path",
                value=text_path,
            ) from None
        self.path = text_path
        self.flush_interval = float(flush_interval)
        self.buffer_bytes = buffer_bytes
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._size = 0
        self._failed = False
        self._closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        _open_files.add(self)

    def write(self, line: str) -> None:
        """Queue one line (without its newline). Never raises; a failing file is reported once
        on the ``meshware.telemetry`` logger and its lines are dropped."""
        with self._lock:
            if self._closed:
                return
            self._lines.append(line)
            self._size += len(line) + 1
            full = self._size >= self.buffer_bytes
            if self._thread is None:
                self._start()
        if full:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered now. Never raises."""
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
            if not lines or self._fd < 0:
                return
            lines.append("")
            data = "\n".join(lines).encode("utf-8", "backslashreplace")
            # Under the lock, so that lines reach the file in the order they were written.
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                if not self._failed:
                    self._failed = True
                    _internal_log.warning(
                        "could not write to the log file %s; lines are dropped",
                        self.path,
                        exc_info=True,
                    )

    def close(self) -> None:
        """Flush, stop the flusher and close the file. Later lines are dropped."""
        self.flush()
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, -1
        self._wake.set()
        if fd >= 0:
            os.close(fd)
        _open_files.discard(self)

    def _start(self) -> None:
        # Lazily, so that a file opened before a server forks its workers gets a flusher in
        # each worker and none in the parent that only configured it.
        thread = threading.Thread(
            target=_flush_every, args=(weakref.ref(self),), name="meshware-log-flush", daemon=True
        )
        self._thread = thread
        thread.start()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._lines = []
        self._size = 0
        self._wake = threading.Event()
        self._thread = None


def _flush_every(ref: weakref.ref[BufferedLineFile]) -> None:
    # Holds the file only while flushing, so an unused file can still be collected.
    while True:
        file = ref()
        if file is None or file._closed:
            return
        wake, interval = file._wake, file.flush_interval
        del file
        wake.wait(interval)
        file = ref()
        if file is None:
            return
        file.flush()
        del file


def _flush_all() -> None:
    for file in list(_open_files):
        file.flush()


def _reset_in_child() -> None:
    for file in list(_open_files):
        file._after_fork()


atexit.register(_flush_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
