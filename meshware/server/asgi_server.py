"""Serving an ASGI app on uvicorn with meshware's TLS: mTLS modes, rotation, and the ASGI TLS
extension (``scope["extensions"]["tls"]``, asgiref's TLS spec), which uvicorn does not provide.

uvicorn accepts an HTTP protocol class (``Config(http=...)``). :func:`mesh_protocol_class`
returns one that owns the connection only until its TLS question is settled: it peeks at the
first byte (PERMISSIVE), runs the TLS handshake with ``loop.start_tls`` (STRICT/PERMISSIVE), reads
the peer certificate once, and then hands the connection to uvicorn's own protocol — from there
on the wrapper is out of the data path. The TLS extension dict is built once per connection and
attached to each request's scope by a one-line app wrapper.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from asyncio import sslproto as _sslproto
from typing import Any

from meshware.inbound.responses import send_json
from meshware.server.tls import TLS_HANDSHAKE_FIRST_BYTE, MtlsMode, ReloadingServerTLS
from meshware.types import ASGIApp, Receive, Scope, Send

try:  # httptools is faster; h11 is always there.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Inner
except ImportError:  # pragma: no cover - depends on the installed extras
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Inner  # type: ignore[assignment]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
HANDSHAKE_TIMEOUT = 10  # seconds
TLS_READ_BUFFER = 32 * 1024
"""Bytes a TLS connection reads from its socket at once: two full TLS records. asyncio's own
is 256 KiB per connection, allocated and zeroed up front — 8 MB for 32 idle keep-alive
connections of a service."""


_OLD_SSLPROTO = sys.version_info < (3, 11)  # before 3.11, another SSLProtocol


class _LeanSSLProtocol(_sslproto.SSLProtocol):
    max_size = TLS_READ_BUFFER  # read by SSLProtocol.__init__ (3.11+) to size its buffer


async def start_server_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
) -> asyncio.Transport | None:
    """``loop.start_tls(..., server_side=True)`` with a :data:`TLS_READ_BUFFER` read buffer.

    On Python 3.11+ asyncio loops this does what ``BaseEventLoop.start_tls`` does, with an
    ``SSLProtocol`` whose buffer is smaller; elsewhere (3.10, other loops) it is the loop's own
    ``start_tls``.
    """
    if _OLD_SSLPROTO or not isinstance(loop, asyncio.BaseEventLoop):
        return await loop.start_tls(
            transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    waiter: asyncio.Future[None] = loop.create_future()
    ssl_protocol = _LeanSSLProtocol(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        call_connection_made=False,
    )
    # As BaseEventLoop.start_tls: nothing is read before the protocol is connected.
    transport.pause_reading()
    transport.set_protocol(ssl_protocol)
    made = loop.call_soon(ssl_protocol.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resume.cancel()
        raise
    return ssl_protocol._app_transport


def tls_extension(sslobj: ssl.SSLObject, server_cert_pem: str) -> dict[str, Any]:
    """The asgiref TLS extension dict for one TLS connection."""
    der = sslobj.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    name = None
    if der:
        peer = sslobj.getpeercert() or {}
        subject = peer.get("subject") or ()
        name = ",".join(f"{k}={v}" for rdn in reversed(subject) for k, v in rdn) or None
    return {
        "server_cert": server_cert_pem,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(sslobj.version() or ""),
        "cipher_suite": None,
    }


def _with_tls(app: ASGIApp, tls: dict[str, Any]) -> ASGIApp:
    async def app_with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions")
        if extensions is None:
            scope["extensions"] = {"tls": tls}
        else:
            extensions["tls"] = tls
        await app(scope, receive, send)

    return app_with_tls


def health_only(app: ASGIApp, paths: frozenset[str]) -> ASGIApp:
    """An app for the plaintext health port: ``paths`` go to ``app``, anything else is 404."""
    body = b'{"status":404,"error":"not_found","detail":"only health paths are served here"}'

    async def health_port_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in paths:
            await app(scope, receive, send)
        elif scope["type"] == "http":
            await send_json(send, 404, body)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    return health_port_app


def mesh_protocol_class(
    tls: ReloadingServerTLS | None,
    mode: MtlsMode,
    *,
    health_port: int | None = None,
    health_app: ASGIApp | None = None,
    admin_port: int | None = None,
    admin_app: ASGIApp | None = None,
) -> type[asyncio.Protocol]:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` applying ``mode``.

    Connections to ``health_port`` (a second listening socket) are plaintext and served by
    ``health_app``, so kubelet probes, which carry no client certificate, work under STRICT.
    Connections to ``admin_port`` (a loopback-only listening socket) are plaintext and served
    by ``admin_app`` (``/meshz``).
    """
    plaintext_apps: dict[int, ASGIApp] = {}
    if health_port is not None and health_app is not None:
        plaintext_apps[health_port] = health_app
    if admin_port is not None and admin_app is not None:
        plaintext_apps[admin_port] = admin_app

    class MeshHttpProtocol(asyncio.Protocol):
        def __init__(
            self, config: Any, server_state: Any, app_state: Any, _loop: Any = None
        ) -> None:
            self._inner = _Inner(config, server_state, app_state, _loop)
            self._loop = self._inner.loop
            self._transport: asyncio.Transport | None = None
            self._peek: socket.socket | None = None
            self._timer: asyncio.TimerHandle | None = None
            # Application data that arrives between the end of the handshake and the hand-over.
            self._early: list[bytes] = []
            self._lost = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self._transport = transport
            if plaintext_apps:
                sockname = transport.get_extra_info("sockname")
                local = plaintext_apps.get(sockname[1]) if sockname else None
                if local is not None:
                    self._inner.app = local
                    self._plaintext()
                    return
            if mode is MtlsMode.DISABLE or tls is None:
                self._plaintext()
            elif mode is MtlsMode.STRICT:
                self._start_tls()
            else:
                self._sniff()

        # PERMISSIVE: look at the first byte without consuming it.
        def _sniff(self) -> None:
            assert self._transport is not None
            self._transport.pause_reading()
            raw = self._transport.get_extra_info("socket")
            self._peek = socket.socket(fileno=os.dup(raw.fileno()))
            self._peek.setblocking(False)
            self._loop.add_reader(self._peek.fileno(), self._on_first_byte)
            self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._give_up)

        def _on_first_byte(self) -> None:
            peek = self._stop_peeking()
            if peek is None:
                return
            try:
                first = peek.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                self._sniff()
                return
            except OSError:
                first = b""
            finally:
                peek.close()
            if not first:
                self._close()
            elif first[0] == TLS_HANDSHAKE_FIRST_BYTE:
                self._start_tls()
            else:
                self._plaintext()

        def _stop_peeking(self) -> socket.socket | None:
            peek, self._peek = self._peek, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if peek is not None:
                self._loop.remove_reader(peek.fileno())
            return peek

        def _give_up(self) -> None:
            peek = self._stop_peeking()
            if peek is not None:
                peek.close()
            self._close()

        def _close(self) -> None:
            if self._transport is not None:
                self._transport.close()

        def _plaintext(self) -> None:
            assert self._transport is not None
            self._transport.set_protocol(self._inner)
            self._inner.connection_made(self._transport)
            self._transport.resume_reading()

        def _start_tls(self) -> None:
            assert self._transport is not None
            # Nothing may be read before the TLS layer is in place.
            self._transport.pause_reading()
            self._handshake_task = self._loop.create_task(self._handshake())

        async def _handshake(self) -> None:
            assert self._transport is not None and tls is not None
            transport = self._transport
            try:
                secure = await start_server_tls(self._loop, transport, self, tls.entry_context)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
                # A refused handshake (no client certificate under STRICT, an unknown CA, a
                # plaintext request): the connection is closed, nothing reaches the app.
                transport.close()
                return
            if secure is None:
                transport.close()
                return
            if self._lost:
                return
            sslobj = secure.get_extra_info("ssl_object")
            self._inner.app = _with_tls(self._inner.app, tls_extension(sslobj, tls.server_cert_pem))
            secure.set_protocol(self._inner)
            self._inner.connection_made(secure)
            early, self._early = self._early, []
            for chunk in early:
                self._inner.data_received(chunk)

        # Until the hand-over, the wrapper is the transport's protocol.
        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True
            peek = self._stop_peeking()
            if peek is not None:
                peek.close()

        def data_received(self, data: bytes) -> None:
            self._early.append(data)

        def eof_received(self) -> bool | None:
            return None

    return MeshHttpProtocol
