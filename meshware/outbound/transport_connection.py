"""The innermost layer: connections to mesh endpoints over mTLS, checked against the SPIFFE id
of the service meant.

Calls to mesh destinations that the balancing layer sent over ``https`` go through an
``httpcore`` connection pool per destination (per expected server identity, so a pooled
connection verified for one service is never reused for another). The pool's network
backend wraps httpcore's default one so that, on every new connection, right after the TLS
handshake and **before any byte of the request is sent**, the server's certificate is
verified:

1. OpenSSL has checked the chain against the mesh trust bundle (every trust domain's CAs);
2. :class:`~meshware.identity.bundle.PeerVerifier` checks it again against the bundle of the
   trust domain the certificate claims, and its validity dates;
3. its SPIFFE id must be one the destination may present: by default
   ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>`` (the namespace and service read
   from the destination's name, see :meth:`WorkloadInfo.service_of
   <meshware.telemetry.metrics.WorkloadInfo.service_of>`), else the DestinationRule's
   ``tls.subjectAltNames`` or this transport's ``server_ids``.

A server that fails raises :class:`WrongServerIdentity` (an ``httpx.ConnectError`` and a
meshware ``OutboundError``) naming the expected and actual ids; the connection is closed
unused. The client certificate is the service's own (``ServicePaths``); its files are checked
for changes at most once per ``reload_interval`` and reloaded into the same ``SSLContext``,
so pooled connections carry on and new connections present the new certificate.

Everything else — calls to hosts that are not mesh services, and mesh calls in plaintext
(``tls.mode: DISABLE``) — goes through a plain :class:`httpx.HTTPTransport`. Without a
certificate (``cert_dir`` and ``paths`` both ``None``) the transport is in plaintext mode and
refuses mesh calls that ask for TLS.

Given the client's :class:`~meshware.outbound.transports.OutboundState`, the transport also
applies the two settings of a cluster's ``connectionPool`` that are about connections rather
than calls (Envoy's semantics):

- ``http.maxRequestsPerConnection``: a connection carries at most that many requests, then
  it is closed and the next call opens a new one (``1`` turns keep-alive off). Such a pool
  speaks HTTP/1.1 only, even with ``http2``: httpcore's HTTP/2 connections cannot be retired
  after a number of streams;
- ``http.idleTimeout``: a connection idle for longer is closed instead of reused (httpcore's
  keep-alive expiry; without it, ``limits.keepalive_expiry``).

Calls whose cluster sets either get pools of their own, mTLS or plaintext. The async
transport pools every plaintext mesh call itself (its connections answer httpcore's idle
check cheaply); the sync one sends a plaintext mesh call with neither setting through the
plain transport, and with ``passthrough`` given, that transport sends every plaintext mesh
call: it owns those connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar, cast

import httpcore
import httpx

from meshware.exceptions import CertificateRejected, ConfigurationError, InvalidSpiffeId
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import ServicePaths
from meshware.identity.spiffe import SpiffeId
from meshware.outbound.call import plan_of
from meshware.outbound.destination import ClientTLSSettings, DestinationRules
from meshware.outbound.errors import OutboundError
from meshware.outbound.mtls import client_ssl_context
from meshware.outbound.pool_limits import ConnectionPoolLimits
from meshware.outbound.transports import (
    SERVER_IDENTITY_KEY,
    TLS_KEY,
    AttemptStamper,
    OutboundState,
    prepare_attempt,
)
from meshware.telemetry.metrics import WorkloadInfo

__all__ = ["AsyncConnectionTransport", "ConnectionTransport", "WrongServerIdentity"]

_log = logging.getLogger("meshware.outbound")
_DEFAULT_TLS: Final = ClientTLSSettings(mode="ISTIO_MUTUAL")
_DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)

_P = TypeVar("_P", httpcore.ConnectionPool, httpcore.AsyncConnectionPool)
_T = TypeVar("_T", httpx.BaseTransport, httpx.AsyncBaseTransport)
#: ``(max_requests_per_connection, idle_timeout)`` of a pool, ``None`` for neither.
_Shape = tuple[int | None, float | None] | None


class WrongServerIdentity(OutboundError, httpx.ConnectError):
    """The server of a mesh call is not the service meant: its certificate names another
    SPIFFE id, or does not verify. Nothing was sent on the connection.

    Attributes:
        destination: the service called.
        expected: the SPIFFE ids the server could have presented.
        actual: the SPIFFE id it presented, or ``None`` when its certificate did not verify.
        reason: ``"wrong-server"``, or the verification failure's reason code
            (``"untrusted"``, ``"expired"``, ``"no-certificate"``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        destination: str,
        expected: tuple[str, ...],
        actual: str | None,
        reason: str,
        request: httpx.Request | None = None,
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.reason = reason
        super().__init__(message, destination=destination, request=request)


# --- the service's credentials ----------------------------------------------------------------


class _Credentials:
    """The service's certificate files, the SSL contexts presenting them, and the verifier
    of servers; reloads changed files into the same contexts."""

    def __init__(self, paths: ServicePaths, clock: Callable[[], float], interval: float) -> None:
        self.paths = paths
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        try:
            self.mutual = client_ssl_context(paths)
            self.simple = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(paths.bundle)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the service's certificate, key or bundle: {exc}",
                field="paths",
                value=str(paths.cert),
            ) from exc
        self.simple.check_hostname = False  # the SPIFFE id is checked instead
        self._bundles = TrustBundles.from_file(paths.bundle)
        self.verifier = PeerVerifier(lambda: self._bundles)
        self._signature = self._stat()
        self._next_check = clock() + interval
        self.reloads = 0
        self.reload_errors = 0

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self.paths.cert, self.paths.key, self.paths.bundle):
            try:
                info = os.stat(path)
                stamps.append((info.st_mtime_ns, info.st_size))
            except OSError:
                stamps.append((-1, -1))
        return tuple(stamps)

    def maybe_reload(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._interval
            signature = self._stat()
            if signature == self._signature:
                return
            paths = self.paths
            try:
                if signature[:2] != self._signature[:2]:
                    self.mutual.load_cert_chain(paths.cert, paths.key)
                if signature[2] != self._signature[2]:
                    bundles = TrustBundles.from_file(paths.bundle)
                    # OpenSSL only adds CAs; the per-trust-domain check uses the new bundle.
                    self.mutual.load_verify_locations(cafile=str(paths.bundle))
                    self.simple.load_verify_locations(cafile=str(paths.bundle))
                    self._bundles = bundles
            except (OSError, ssl.SSLError, ConfigurationError) as exc:
                # Half-written files (a key without its new certificate) settle by the next
                # check; until then the old credentials stay in use.
                self.reload_errors += 1
                _log.warning("could not reload the client certificate from %s: %s", paths.cert, exc)
                return
            self._signature = signature
            self.reloads += 1

    def context(self, tls: ClientTLSSettings) -> ssl.SSLContext:
        return self.mutual if tls.presents_certificate else self.simple


# --- verification at the TLS handshake, requests counted per connection ----------------------


class _Verify:
    """Checks the server of one connection; one per pool (destination and expected ids)."""

    __slots__ = ("destination", "expected", "shown", "verifier")

    def __init__(self, destination: str, expected: frozenset[str], verifier: PeerVerifier) -> None:
        self.destination = destination
        self.expected = expected
        self.shown = tuple(sorted(expected))
        self.verifier = verifier

    def __call__(self, ssl_object: Any) -> str:
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        if not der:
            raise self._error(None, "no-certificate", "the server presented no certificate")
        try:
            actual = self.verifier.verify_der(der).spiffe_id.uri
        except CertificateRejected as exc:
            raise self._error(
                None, exc.reason, f"the server's certificate is refused: {exc}"
            ) from exc
        if actual not in self.expected:
            raise self._error(
                actual,
                "wrong-server",
                f"the server is {actual}, not {' or '.join(self.shown)}; nothing was sent",
            )
        return actual

    def _error(self, actual: str | None, reason: str, message: str) -> WrongServerIdentity:
        return WrongServerIdentity(
            message,
            destination=self.destination,
            expected=self.shown,
            actual=actual,
            reason=reason,
        )


#: ``_Stream.left`` of a connection without a request limit.
_UNCOUNTED: Final = sys.maxsize


class _Stream(httpcore.NetworkStream):
    """A connection's stream, as the pool's backend hands it to httpcore.

    With ``verify``, the server is checked right after the TLS handshake, before any byte of
    the request is sent. ``left`` is how many more requests the connection may carry
    (``maxRequestsPerConnection``): once none is left the stream says it is readable, which
    httpcore's pool takes, on an idle HTTP/1.1 connection, for a connection the server has
    closed; so it closes it instead of reusing it, and the next call opens a new one.
    """

    __slots__ = ("_inner", "_verify", "left")

    def __init__(self, inner: httpcore.NetworkStream, verify: _Verify | None, left: int) -> None:
        self._inner = inner
        self._verify = verify
        self.left = left

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(ssl_context, server_hostname, timeout)
        if self._verify is not None:
            try:
                self._verify(stream.get_extra_info("ssl_object"))
            except BaseException:
                stream.close()
                raise
        # Without a limit, httpcore gets its own TLS stream: nothing in between per read.
        return stream if self.left == _UNCOUNTED else _Stream(stream, None, self.left)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self.left <= 0:
            return True
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's backend, its streams wrapped in :class:`_Stream`."""

    def __init__(self, inner: httpcore.NetworkBackend, verify: _Verify | None, left: int) -> None:
        self._inner = inner
        self._verify = verify
        self._left = left

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream, self._verify, self._left)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _Stream(stream, self._verify, self._left)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _readable(sock: Any) -> bool:
    # What httpcore's sync backend answers: the server closed an idle connection (or sent
    # something it should not have) when its socket has bytes to read.
    fd = sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _answer_readable_directly(stream: httpcore.AsyncNetworkStream) -> None:
    """Make ``stream.get_extra_info("is_readable")`` poll the socket, nothing more.

    httpcore's pool asks every idle connection whether it is readable each time it places a
    request, and its anyio stream answers by rebuilding anyio's dicts of socket attributes
    (a ``getpeername()`` system call among them) for every question: with 20 pooled
    connections that was a fifth of the client's time. The socket is looked up once here.
    """
    sock = stream.get_extra_info("socket")  # asyncio's TransportSocket, under anyio
    if not callable(getattr(sock, "fileno", None)) or not hasattr(select, "poll"):
        return
    answer = stream.get_extra_info

    def get_extra_info(info: str) -> Any:
        return _readable(sock) if info == "is_readable" else answer(info)

    with contextlib.suppress(AttributeError):  # a stream class with slots keeps its own
        stream.get_extra_info = get_extra_info  # type: ignore[method-assign]


class _AsyncStream(httpcore.AsyncNetworkStream):
    """The async twin of :class:`_Stream`."""

    __slots__ = ("_inner", "_verify", "left")

    def __init__(
        self, inner: httpcore.AsyncNetworkStream, verify: _Verify | None, left: int
    ) -> None:
        self._inner = inner
        self._verify = verify
        self.left = left

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        if self._verify is not None:
            try:
                self._verify(stream.get_extra_info("ssl_object"))
            except BaseException:
                await stream.aclose()
                raise
        _answer_readable_directly(stream)
        return stream if self.left == _UNCOUNTED else _AsyncStream(stream, None, self.left)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self.left <= 0:
            return True
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    """The async twin of :class:`_Backend`."""

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend, verify: _Verify | None, left: int
    ) -> None:
        self._inner = inner
        self._verify = verify
        self._left = left

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        if self._verify is not None:  # a TLS pool: start_tls answers for the TLS stream
            return _AsyncStream(stream, self._verify, self._left)
        _answer_readable_directly(stream)
        if self._left == _UNCOUNTED:
            return stream  # plaintext, nothing to count: nothing in between per read
        return _AsyncStream(stream, None, self._left)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncStream(stream, self._verify, self._left)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _sync_pool(
    options: dict[str, Any], verify: _Verify | None, limit: int | None
) -> httpcore.ConnectionPool:
    backend = None
    if verify is not None or limit is not None:
        left = _UNCOUNTED if limit is None else limit
        backend = _Backend(httpcore.SyncBackend(), verify, left)
    return httpcore.ConnectionPool(network_backend=backend, **options)


def _async_pool(
    options: dict[str, Any], verify: _Verify | None, limit: int | None
) -> httpcore.AsyncConnectionPool:
    # Always meshware's backend, for its cheaper idle check (see _answer_readable_directly).
    left = _UNCOUNTED if limit is None else limit
    backend = _AsyncBackend(httpcore.AnyIOBackend(), verify, left)
    return httpcore.AsyncConnectionPool(network_backend=backend, **options)


# --- httpx <-> httpcore ----------------------------------------------------------------------

# Most specific first is not needed: the lookup walks the raised type's MRO.
_ERRORS: Final[dict[type[Exception], type[httpx.TransportError]]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProxyError: httpx.ProxyError,
}


class _HttpxErrors:
    """``with _HTTPX_ERRORS:`` raises httpcore's errors as httpx's. One shared, stateless
    object: nothing is allocated per call, unlike a generator-based context manager."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if isinstance(exc, Exception):
            for cls in type(exc).__mro__:
                target = _ERRORS.get(cls)
                if target is not None:
                    raise target(str(exc)) from exc


_HTTPX_ERRORS: Final = _HttpxErrors()


def _core_request(request: httpx.Request) -> httpcore.Request:
    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


class _CoreStream(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        with _HTTPX_ERRORS:
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            with _HTTPX_ERRORS:
                close()


class _AsyncCoreStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _HTTPX_ERRORS:
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            with _HTTPX_ERRORS:
                await aclose()


# --- the shared core -------------------------------------------------------------------------


class _Pool(Generic[_P]):
    """One httpcore pool, and what the responses of its calls need."""

    __slots__ = ("identity", "limit", "pool", "verify")

    def __init__(self, pool: _P, verify: _Verify | None, limit: int | None) -> None:
        self.pool: _P = pool
        self.verify = verify
        self.limit = limit
        # Every connection of a pool with one expected id was checked against that id.
        self.identity = (
            verify.shown[0] if verify is not None and len(verify.expected) == 1 else None
        )

    def response(
        self, core: httpcore.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
    ) -> httpx.Response:
        extensions = dict(core.extensions)
        if self.limit is not None:
            # Counted when the response arrives; the pool retires the connection once idle.
            counted = extensions.get("network_stream")
            if isinstance(counted, (_Stream, _AsyncStream)):
                counted.left -= 1
        identity = self.identity
        if identity is None and self.verify is not None:
            identity = _identity_of(self.verify, extensions)
        if identity is not None:
            extensions[SERVER_IDENTITY_KEY] = identity
        return httpx.Response(
            status_code=core.status, headers=core.headers, stream=stream, extensions=extensions
        )


def _identity_of(verify: _Verify, extensions: Mapping[str, Any]) -> str | None:
    stream = extensions.get("network_stream")
    ssl_object = None if stream is None else stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    try:
        return verify(ssl_object)
    except WrongServerIdentity:
        return None


def _shapes_connections(rules: DestinationRules, default: ConnectionPoolLimits | None) -> bool:
    """Whether the default or any policy of ``rules`` sets a per-connection setting."""
    found = [default]
    for rule in rules:
        found.append(rule.traffic_policy.connection_pool)
        found.extend(policy.connection_pool for policy in rule.subset_policies.values())
    return any(limits is not None and limits.per_connection is not None for limits in found)


# (tls settings or None for plaintext, the cluster's pool limits, the pool or None): the last
# pool a destination's calls used, found again by identity without building a key.
_Memo = tuple[ClientTLSSettings | None, ConnectionPoolLimits | None, _Pool[Any] | None]
_PoolKey = tuple[str | None, frozenset[str] | None, bool, _Shape]


class _ConnectionCore(Generic[_P]):
    __slots__ = (
        "credentials",
        "default_pool",
        "http2",
        "limits",
        "lock",
        "memo",
        "new_pool",
        "own_plaintext",
        "pool_plaintext",
        "pools",
        "rules_seen",
        "server_ids",
        "state",
        "workload",
    )

    def __init__(
        self,
        workload: WorkloadInfo,
        cert_dir: str | os.PathLike[str] | None,
        paths: ServicePaths | None,
        server_ids: Mapping[str, str | Iterable[str]] | None,
        limits: httpx.Limits,
        http2: bool,
        state: OutboundState | None,
        own_plaintext: bool,
        pool_plaintext: bool,
        clock: Callable[[], float],
        reload_interval: float,
        new_pool: Callable[[dict[str, Any], _Verify | None, int | None], _P],
    ) -> None:
        if not isinstance(workload, WorkloadInfo):
            raise ConfigurationError("expected a WorkloadInfo", field="workload", value=workload)
        if cert_dir is not None and paths is not None:
            raise ConfigurationError("give cert_dir or paths, not both", field="paths", value=paths)
        if paths is not None and not isinstance(paths, ServicePaths):
            raise ConfigurationError("expected ServicePaths", field="paths", value=paths)
        if cert_dir is not None:
            paths = ServicePaths.under(Path(cert_dir), workload.service, workload.namespace)
        if not isinstance(limits, httpx.Limits):
            raise ConfigurationError("expected httpx.Limits", field="limits", value=limits)
        if state is not None and not isinstance(state, OutboundState):
            raise ConfigurationError(
                "expected an OutboundState or None", field="state", value=state
            )
        if (
            isinstance(reload_interval, bool)
            or not isinstance(reload_interval, (int, float))
            or not 0 <= reload_interval < float("inf")
        ):
            raise ConfigurationError(
                "expected a number of seconds, 0 or more",
                field="reload_interval",
                value=reload_interval,
            )
        ids: dict[str, frozenset[str]] = {}
        for destination, value in (server_ids or {}).items():
            values = [value] if isinstance(value, str) else list(value)
            checked = []
            for index, item in enumerate(values):
                try:
                    checked.append(SpiffeId.parse(item).uri)
                except InvalidSpiffeId as exc:
                    raise ConfigurationError(
                        f"expected a SPIFFE id ({exc})",
                        field=f"server_ids.{destination}[{index}]",
                        value=item,
                    ) from exc
            if not checked:
                raise ConfigurationError(
                    "expected at least one SPIFFE id",
                    field=f"server_ids.{destination}",
                    value=value,
                )
            ids[destination.lower()] = frozenset(checked)
        self.workload = workload
        self.server_ids = ids
        self.limits = limits
        self.http2 = bool(http2)
        self.state = state
        # The state's default for clusters whose rule sets no connectionPool; fixed at its
        # construction (a reload replaces the rules only).
        self.default_pool: ConnectionPoolLimits | None = (
            None if state is None else state.connection_pool
        )
        self.rules_seen: tuple[DestinationRules | None, bool] = (None, False)
        self.own_plaintext = own_plaintext and state is not None
        # Whether plaintext mesh calls use this layer's pools even with nothing to apply per
        # connection (the async layer: see _answer_readable_directly).
        self.pool_plaintext = pool_plaintext and self.own_plaintext
        self.new_pool: Callable[[dict[str, Any], _Verify | None, int | None], _P] = new_pool
        self.lock = threading.Lock()
        self.pools: dict[_PoolKey, _Pool[_P]] = {}
        self.memo: dict[str, _Memo] = {}
        self.credentials = (
            None if paths is None else _Credentials(paths, clock, float(reload_interval))
        )

    def route(self, request: httpx.Request) -> _Pool[_P] | None:
        """The pool of the call, or ``None`` for a call the plain transport sends."""
        plan = plan_of(request)
        destination = plan.destination
        if destination is None:
            return None
        tls = None
        if request.url.scheme == "https":
            tls = request.extensions.get(TLS_KEY)
            if not isinstance(tls, ClientTLSSettings):
                tls = _DEFAULT_TLS
            if self.credentials is None:
                raise ConfigurationError(
                    f"a TLS call to {destination} needs the service's certificate; this "
                    "transport has none (plaintext mode): pass cert_dir, or use tls mode "
                    "DISABLE",
                    field="cert_dir",
                )
            self.credentials.maybe_reload()
        # The layers above left the attempt's bounds to this innermost layer (for a
        # plaintext mesh call too, though another transport sends it).
        prepare_attempt(request, plan)
        pool_limits = None
        state = self.state
        if state is not None and (tls is not None or self.own_plaintext):
            pool_limits = self.pool_limits(state, destination, plan.subset)
        if tls is None and pool_limits is None and not self.pool_plaintext:
            return None
        return self.pool(destination, tls, pool_limits)

    def pool_limits(
        self, state: OutboundState, destination: str, subset: str | None
    ) -> ConnectionPoolLimits | None:
        """The cluster's pool limits, or ``None`` when no policy sets a per-connection
        setting (then without looking the cluster up)."""
        rules = state.rules
        seen = self.rules_seen
        if seen[0] is not rules:  # new rules (a reload): look again
            seen = self.rules_seen = (rules, _shapes_connections(rules, self.default_pool))
        if not seen[1]:
            return None
        return state.cluster(destination, subset).policy.connection_pool or self.default_pool

    def pool(
        self,
        destination: str,
        tls: ClientTLSSettings | None,
        pool_limits: ConnectionPoolLimits | None,
    ) -> _Pool[_P] | None:
        """The pool of calls to ``destination`` with these TLS settings (``None``:
        plaintext) and pool limits; ``None`` for a plaintext call with nothing to apply."""
        memo = self.memo.get(destination)
        if memo is not None and memo[0] is tls and memo[1] is pool_limits:
            return memo[2]
        shape = None if pool_limits is None else pool_limits.per_connection
        key: _PoolKey | None = None
        if tls is not None:
            expected = self.expected(destination, tls)
            key = (destination, expected, tls.presents_certificate, shape)
        elif shape is not None or self.pool_plaintext:
            key = (None, None, False, shape)  # plaintext: one pool per shape serves them all
        found = None if key is None else self.pools.get(key)
        if found is None and key is not None:
            with self.lock:
                found = self.pools.get(key)
                if found is None:
                    found = self.pools[key] = self._new(destination, tls, shape)
        self.memo[destination] = (tls, pool_limits, found)
        return found

    def _new(self, destination: str, tls: ClientTLSSettings | None, shape: _Shape) -> _Pool[_P]:
        limit, idle = (None, None) if shape is None else shape
        verify = ssl_context = None
        if tls is not None:
            credentials = cast(_Credentials, self.credentials)  # checked by route()
            verify = _Verify(destination, self.expected(destination, tls), credentials.verifier)
            ssl_context = credentials.context(tls)
        limits = self.limits
        options: dict[str, Any] = {
            "ssl_context": ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry if idle is None else idle,
            "http1": True,
            # httpcore cannot retire an HTTP/2 connection after N streams: HTTP/1.1 then.
            "http2": self.http2 and limit is None,
        }
        return _Pool(self.new_pool(options, verify, limit), verify, limit)

    def expected(self, destination: str, tls: ClientTLSSettings) -> frozenset[str]:
        if tls.subject_alt_names:
            return frozenset(tls.subject_alt_names)
        override = self.server_ids.get(destination)
        if override is not None:
            return override
        workload = self.workload
        name, namespace, _ = workload.service_of(destination)
        return frozenset({f"spiffe://{workload.trust_domain}/ns/{namespace}/sa/{name}"})

    def take_pools(self) -> list[_P]:
        """Forget every pool (for closing them)."""
        with self.lock:
            pools, self.pools, self.memo = list(self.pools.values()), {}, {}
        return [entry.pool for entry in pools]


class _ConnectionLayer(AttemptStamper, Generic[_P, _T]):
    """What the sync and async transports share: their arguments, credentials and pools."""

    _new_pool: Callable[[dict[str, Any], _Verify | None, int | None], _P]
    _pool_plaintext: ClassVar[bool] = False

    def __init__(
        self,
        *,
        workload: WorkloadInfo,
        cert_dir: str | os.PathLike[str] | None = None,
        paths: ServicePaths | None = None,
        server_ids: Mapping[str, str | Iterable[str]] | None = None,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        http2: bool = False,
        passthrough: _T | None = None,
        state: OutboundState | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = 1.0,
    ) -> None:
        self._core: _ConnectionCore[_P] = _ConnectionCore(
            workload,
            cert_dir,
            paths,
            server_ids,
            limits,
            http2,
            state,
            passthrough is None,
            self._pool_plaintext,
            clock,
            reload_interval,
            self._new_pool,
        )
        self._passthrough: _T = (
            passthrough if passthrough is not None else self._new_passthrough(limits, http2)
        )

    def _new_passthrough(self, limits: httpx.Limits, http2: bool) -> _T:
        raise NotImplementedError

    @property
    def plaintext(self) -> bool:
        """Whether the transport has no certificate (plaintext mode)."""
        return self._core.credentials is None

    @property
    def reloads(self) -> int:
        """How many times changed certificate files were reloaded."""
        credentials = self._core.credentials
        return 0 if credentials is None else credentials.reloads


class ConnectionTransport(
    _ConnectionLayer[httpcore.ConnectionPool, httpx.BaseTransport], httpx.BaseTransport
):
    """Sends calls; mesh calls over mTLS to verified servers (see the module docs).

    Args:
        workload: this service (its name and namespace locate its certificate, its namespace
            and trust domain make the servers' expected ids).
        cert_dir: the certificate directory (``meshware ca`` layout); the service's files are
            ``services/<namespace>/<service>/{cert,key,bundle}.pem`` under it.
        paths: the service's files, instead of ``cert_dir``. Neither: plaintext mode.
        server_ids: per destination name, the SPIFFE id(s) its servers may present, instead of
            the default ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``.
        limits: the connection limits of each destination's pool (and of the plain pool).
        http2: offer HTTP/2 (ALPN) on mesh connections.
        passthrough: the transport of calls that are not mesh TLS calls; a new
            :class:`httpx.HTTPTransport` with ``limits`` and ``http2`` when ``None``. One
            given here sends every plaintext mesh call, its connections shaped by itself.
        state: the client's :class:`~meshware.outbound.transports.OutboundState` (the one
            its balancing and breaker layers share): each cluster's
            ``connectionPool.http.maxRequestsPerConnection`` and ``idleTimeout`` are applied
            to its connections. ``None``: neither is.
        clock: the monotonic clock that paces the certificate-file checks.
        reload_interval: seconds between checks of the certificate files (default 1).

    Raises:
        ConfigurationError: at construction, for unreadable credentials or bad arguments;
            per call, for a TLS mesh call in plaintext mode.
        WrongServerIdentity: per call, when the server is not the service meant.
    """

    _new_pool = staticmethod(_sync_pool)

    def _new_passthrough(self, limits: httpx.Limits, http2: bool) -> httpx.BaseTransport:
        return httpx.HTTPTransport(limits=limits, http2=http2)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: over a verified mTLS connection for a mesh TLS call, else through
        the plain transport."""
        target = self._core.route(request)
        if target is None:
            return self._passthrough.handle_request(request)
        try:
            with _HTTPX_ERRORS:
                response = target.pool.handle_request(_core_request(request))
        except WrongServerIdentity as exc:
            exc.request = request
            raise
        return target.response(response, _CoreStream(cast(Iterable[bytes], response.stream)))

    def close(self) -> None:
        """Close every pool and the plain transport."""
        for pool in self._core.take_pools():
            pool.close()
        self._passthrough.close()


class AsyncConnectionTransport(
    _ConnectionLayer[httpcore.AsyncConnectionPool, httpx.AsyncBaseTransport],
    httpx.AsyncBaseTransport,
):
    """The async twin of :class:`ConnectionTransport`, with the same arguments
    (``passthrough`` is an :class:`httpx.AsyncHTTPTransport` by default)."""

    _new_pool = staticmethod(_async_pool)
    # Plaintext mesh calls too go through pools with the cheaper idle check.
    _pool_plaintext = True

    def _new_passthrough(self, limits: httpx.Limits, http2: bool) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(limits=limits, http2=http2)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: over a verified mTLS connection for a mesh TLS call, else through
        the plain transport."""
        target = self._core.route(request)
        if target is None:
            return await self._passthrough.handle_async_request(request)
        try:
            with _HTTPX_ERRORS:
                response = await target.pool.handle_async_request(_core_request(request))
        except WrongServerIdentity as exc:
            exc.request = request
            raise
        return target.response(response, _AsyncCoreStream(response.stream))

    async def aclose(self) -> None:
        """Close every pool and the plain transport."""
        for pool in self._core.take_pools():
            await pool.aclose()
        await self._passthrough.aclose()
