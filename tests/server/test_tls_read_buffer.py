"""start_server_tls: asyncio's server-side TLS with a 32 KiB read buffer instead of 256 KiB,
moving large bodies both ways intact over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import sys
from pathlib import Path

import pytest

from meshware.identity.ca import LocalCA
from meshware.server.asgi_server import TLS_READ_BUFFER, start_server_tls


class _Echo(asyncio.Protocol):
    """Upgrades its connection to TLS, then echoes back the SHA-256 of every 1 MiB received,
    followed by 1 MiB of its own."""

    def __init__(self, context: ssl.SSLContext, secured: asyncio.Future[asyncio.Transport]):
        self.context = context
        self.secured = secured
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        asyncio.get_running_loop().create_task(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        secure = await start_server_tls(asyncio.get_running_loop(), transport, self, self.context)
        assert secure is not None
        self.transport = secure
        self.secured.set_result(secure)

    def data_received(self, data: bytes) -> None:
        self.received += data
        while len(self.received) >= 2**20:
            chunk, self.received = self.received[: 2**20], self.received[2**20 :]
            assert self.transport is not None
            self.transport.write(hashlib.sha256(chunk).digest() + bytes(range(256)) * 4096)


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = LocalCA.init(tmp_path)
    server, client = ca.issue("orders"), ca.issue("users")
    server_ctx = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "bundle.pem")
    )
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(server.cert, server.key)
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "bundle.pem"))
    client_ctx.check_hostname = False
    client_ctx.load_cert_chain(client.cert, client.key)
    return server_ctx, client_ctx


async def _round_trips(tmp_path: Path) -> tuple[int, list[bool]]:
    server_ctx, client_ctx = _contexts(tmp_path)
    loop = asyncio.get_running_loop()
    secured: asyncio.Future[asyncio.Transport] = loop.create_future()
    server = await loop.create_server(lambda: _Echo(server_ctx, secured), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    secure = await secured
    buffer_size = len(secure._ssl_protocol._ssl_buffer)  # type: ignore[attr-defined]
    results = []
    for n in range(3):
        body = hashlib.sha256(str(n).encode()).digest() * (2**15)  # 1 MiB
        writer.write(body)
        await writer.drain()
        digest = await reader.readexactly(32)
        reply = await reader.readexactly(2**20)
        results.append(
            digest == hashlib.sha256(body).digest() and reply == bytes(range(256)) * 4096
        )
    writer.close()
    server.close()
    await server.wait_closed()
    return buffer_size, results


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the loop's own start_tls before 3.11")
def test_large_bodies_cross_a_lean_tls_connection_intact(tmp_path: Path) -> None:
    buffer_size, results = asyncio.run(_round_trips(tmp_path))
    assert buffer_size == TLS_READ_BUFFER == 32 * 1024
    assert results == [True, True, True]
