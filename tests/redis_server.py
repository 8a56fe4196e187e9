"""A real redis-server on 127.0.0.1 for tests (state backends, shared rate limits).

``redis_server`` (session) starts one in a temporary directory with persistence off;
``redis_url`` hands a test an emptied database; ``redis_control`` lets a test stop and
restart the server (the same port) and guarantees it runs again afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """One redis-server process that can be stopped and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self, *args: str) -> bytes:
        """Send one command over a fresh connection; return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(_encode(*args))
            reply = b""
            # Replies used here are small: read until the reply looks complete.
            while True:
                chunk = sock.recv(65536)
                reply += chunk
                if not chunk or self._complete(reply):
                    return reply

    @staticmethod
    def _complete(reply: bytes) -> bool:
        if reply[:1] in (b"+", b"-", b":"):
            return reply.endswith(b"\r\n")
        if reply[:1] == b"$":
            header, _, rest = reply.partition(b"\r\n")
            size = int(header[1:])
            return size < 0 or len(rest) >= size + 2
        return reply.endswith(b"\r\n")

    def info(self, section: str) -> dict[str, str]:
        """``INFO <section>`` as a dict of its ``name:value`` lines."""
        raw = self.command("INFO", section).decode()
        body = raw.split("\r\n", 1)[1]
        return dict(
            line.split(":", 1) for line in body.split("\r\n") if ":" in line and line[0] != "#"
        )

    def start(self) -> None:
        if self.running:
            return
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed; run `bash scripts/system-deps.sh`")
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.directory),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self.command("PING") == b"+PONG\r\n":
                    return
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not answer PING; log:\n{self._log.read_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server on a free 127.0.0.1 port, killed at the end of the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the running server, its data and script cache emptied for this test."""
    redis_server.start()
    assert redis_server.command("FLUSHALL") == b"+OK\r\n"
    assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    return redis_server.url


@pytest.fixture
def redis_control(redis_server: RedisServer, redis_url: str) -> Iterator[RedisServer]:
    """The server, for tests that stop and restart it; it runs again after the test."""
    try:
        yield redis_server
    finally:
        redis_server.start()
