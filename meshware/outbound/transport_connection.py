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
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, cast

import httpcore
import httpx

from meshware.exceptions import CertificateRejected, ConfigurationError, InvalidSpiffeId
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import ServicePaths
from meshware.identity.spiffe import SpiffeId
from meshware.outbound.call import CallPlan, plan_of
from meshware.outbound.destination import ClientTLSSettings
from meshware.outbound.errors import OutboundError
from meshware.outbound.mtls import client_ssl_context
from meshware.outbound.transports import (
    SERVER_IDENTITY_KEY,
    TLS_KEY,
    AttemptStamper,
    prepare_attempt,
)
from meshware.telemetry.metrics import WorkloadInfo

__all__ = ["AsyncConnectionTransport", "ConnectionTransport", "WrongServerIdentity"]

_log = logging.getLogger("meshware.outbound")
_DEFAULT_TLS: Final = ClientTLSSettings(mode="ISTIO_MUTUAL")
_DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)


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


# --- verification at the TLS handshake -------------------------------------------------------


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


class _VerifyingStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, verify: _Verify) -> None:
        self._inner = inner
        self._verify = verify

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
        try:
            self._verify(stream.get_extra_info("ssl_object"))
        except BaseException:
            stream.close()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _VerifyingBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, verify: _Verify) -> None:
        self._inner = inner
        self._verify = verify

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _VerifyingStream(stream, self._verify)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _VerifyingStream(stream, self._verify)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncVerifyingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, verify: _Verify) -> None:
        self._inner = inner
        self._verify = verify

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
        try:
            self._verify(stream.get_extra_info("ssl_object"))
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncVerifyingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, verify: _Verify) -> None:
        self._inner = inner
        self._verify = verify

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncVerifyingStream(stream, self._verify)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncVerifyingStream(stream, self._verify)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


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


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for kind in type(exc).__mro__:
            target = _ERRORS.get(kind)
            if target is not None:
                raise target(str(exc)) from exc
        raise


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
        with _httpx_errors():
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            with _httpx_errors():
                close()


class _AsyncCoreStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            with _httpx_errors():
                await aclose()


def _response(
    core: httpcore.Response,
    stream: httpx.SyncByteStream | httpx.AsyncByteStream,
    identity: str | None,
) -> httpx.Response:
    extensions = dict(core.extensions)
    if identity is not None:
        extensions[SERVER_IDENTITY_KEY] = identity
    return httpx.Response(
        status_code=core.status, headers=core.headers, stream=stream, extensions=extensions
    )


# --- the shared core -------------------------------------------------------------------------


class _ConnectionCore:
    __slots__ = (
        "credentials",
        "http2",
        "limits",
        "lock",
        "server_ids",
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
        clock: Callable[[], float],
        reload_interval: float,
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
        self.lock = threading.Lock()
        self.credentials = (
            None if paths is None else _Credentials(paths, clock, float(reload_interval))
        )

    def route(self, request: httpx.Request) -> tuple[CallPlan, ClientTLSSettings] | None:
        """``None`` for calls the plain transport sends; else the plan and TLS settings."""
        plan = plan_of(request)
        if plan.destination is None:
            return None
        if request.url.scheme != "https":
            # A plaintext mesh call (tls mode DISABLE): the layers above left the attempt's
            # bounds to this innermost layer, so they are set here too.
            prepare_attempt(request, plan)
            return None
        tls = request.extensions.get(TLS_KEY)
        if not isinstance(tls, ClientTLSSettings):
            tls = _DEFAULT_TLS
        if self.credentials is None:
            raise ConfigurationError(
                f"a TLS call to {plan.destination} needs the service's certificate; this "
                "transport has none (plaintext mode): pass cert_dir, or use tls mode DISABLE",
                field="cert_dir",
            )
        self.credentials.maybe_reload()
        prepare_attempt(request, plan)
        return plan, tls

    def expected(self, destination: str, tls: ClientTLSSettings) -> frozenset[str]:
        if tls.subject_alt_names:
            return frozenset(tls.subject_alt_names)
        override = self.server_ids.get(destination)
        if override is not None:
            return override
        workload = self.workload
        name, namespace, _ = workload.service_of(destination)
        return frozenset({f"spiffe://{workload.trust_domain}/ns/{namespace}/sa/{name}"})

    @staticmethod
    def identity_of(verify: _Verify, response: httpcore.Response) -> str | None:
        if len(verify.expected) == 1:
            return verify.shown[0]  # every connection of this pool was checked against it
        stream = response.extensions.get("network_stream")
        ssl_object = None if stream is None else stream.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        try:
            return verify(ssl_object)
        except WrongServerIdentity:
            return None


class ConnectionTransport(AttemptStamper, httpx.BaseTransport):
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
            :class:`httpx.HTTPTransport` with ``limits`` and ``http2`` when ``None``.
        clock: the monotonic clock that paces the certificate-file checks.
        reload_interval: seconds between checks of the certificate files (default 1).

    Raises:
        ConfigurationError: at construction, for unreadable credentials or bad arguments;
            per call, for a TLS mesh call in plaintext mode.
        WrongServerIdentity: per call, when the server is not the service meant.
    """

    def __init__(
        self,
        *,
        workload: WorkloadInfo,
        cert_dir: str | os.PathLike[str] | None = None,
        paths: ServicePaths | None = None,
        server_ids: Mapping[str, str | Iterable[str]] | None = None,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        http2: bool = False,
        passthrough: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = 1.0,
    ) -> None:
        self._core = _ConnectionCore(
            workload, cert_dir, paths, server_ids, limits, http2, clock, reload_interval
        )
        self._passthrough = (
            passthrough
            if passthrough is not None
            else httpx.HTTPTransport(limits=limits, http2=http2)
        )
        self._pools: dict[
            tuple[str, frozenset[str], bool], tuple[httpcore.ConnectionPool, _Verify]
        ] = {}

    @property
    def plaintext(self) -> bool:
        """Whether the transport has no certificate (plaintext mode)."""
        return self._core.credentials is None

    @property
    def reloads(self) -> int:
        """How many times changed certificate files were reloaded."""
        credentials = self._core.credentials
        return 0 if credentials is None else credentials.reloads

    def _pool(
        self, destination: str, tls: ClientTLSSettings
    ) -> tuple[httpcore.ConnectionPool, _Verify]:
        core = self._core
        expected = core.expected(destination, tls)
        mutual = tls.presents_certificate
        key = (destination, expected, mutual)
        entry = self._pools.get(key)
        if entry is None:
            with core.lock:
                entry = self._pools.get(key)
                if entry is None:
                    credentials = cast(_Credentials, core.credentials)  # checked by route()
                    verify = _Verify(destination, expected, credentials.verifier)
                    limits = core.limits
                    pool = httpcore.ConnectionPool(
                        ssl_context=credentials.context(tls),
                        max_connections=limits.max_connections,
                        max_keepalive_connections=limits.max_keepalive_connections,
                        keepalive_expiry=limits.keepalive_expiry,
                        http1=True,
                        http2=core.http2,
                        network_backend=_VerifyingBackend(httpcore.SyncBackend(), verify),
                    )
                    entry = self._pools[key] = (pool, verify)
        return entry

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: over a verified mTLS connection for a mesh TLS call, else through
        the plain transport."""
        routed = self._core.route(request)
        if routed is None:
            return self._passthrough.handle_request(request)
        plan, tls = routed
        pool, verify = self._pool(plan.destination or "", tls)
        try:
            with _httpx_errors():
                core_response = pool.handle_request(_core_request(request))
        except WrongServerIdentity as exc:
            exc.request = request
            raise
        stream = _CoreStream(cast(Iterable[bytes], core_response.stream))
        return _response(core_response, stream, self._core.identity_of(verify, core_response))

    def close(self) -> None:
        """Close every pool and the plain transport."""
        with self._core.lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool, _ in pools:
            pool.close()
        self._passthrough.close()


class AsyncConnectionTransport(AttemptStamper, httpx.AsyncBaseTransport):
    """The async twin of :class:`ConnectionTransport`, with the same arguments
    (``passthrough`` is an :class:`httpx.AsyncHTTPTransport` by default)."""

    def __init__(
        self,
        *,
        workload: WorkloadInfo,
        cert_dir: str | os.PathLike[str] | None = None,
        paths: ServicePaths | None = None,
        server_ids: Mapping[str, str | Iterable[str]] | None = None,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        http2: bool = False,
        passthrough: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = 1.0,
    ) -> None:
        self._core = _ConnectionCore(
            workload, cert_dir, paths, server_ids, limits, http2, clock, reload_interval
        )
        self._passthrough = (
            passthrough
            if passthrough is not None
            else httpx.AsyncHTTPTransport(limits=limits, http2=http2)
        )
        self._pools: dict[
            tuple[str, frozenset[str], bool], tuple[httpcore.AsyncConnectionPool, _Verify]
        ] = {}

    @property
    def plaintext(self) -> bool:
        """Whether the transport has no certificate (plaintext mode)."""
        return self._core.credentials is None

    @property
    def reloads(self) -> int:
        """How many times changed certificate files were reloaded."""
        credentials = self._core.credentials
        return 0 if credentials is None else credentials.reloads

    def _pool(
        self, destination: str, tls: ClientTLSSettings
    ) -> tuple[httpcore.AsyncConnectionPool, _Verify]:
        core = self._core
        expected = core.expected(destination, tls)
        mutual = tls.presents_certificate
        key = (destination, expected, mutual)
        entry = self._pools.get(key)
        if entry is None:
            with core.lock:
                entry = self._pools.get(key)
                if entry is None:
                    credentials = cast(_Credentials, core.credentials)  # checked by route()
                    verify = _Verify(destination, expected, credentials.verifier)
                    limits = core.limits
                    pool = httpcore.AsyncConnectionPool(
                        ssl_context=credentials.context(tls),
                        max_connections=limits.max_connections,
                        max_keepalive_connections=limits.max_keepalive_connections,
                        keepalive_expiry=limits.keepalive_expiry,
                        http1=True,
                        http2=core.http2,
                        network_backend=_AsyncVerifyingBackend(httpcore.AnyIOBackend(), verify),
                    )
                    entry = self._pools[key] = (pool, verify)
        return entry

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: over a verified mTLS connection for a mesh TLS call, else through
        the plain transport."""
        routed = self._core.route(request)
        if routed is None:
            return await self._passthrough.handle_async_request(request)
        plan, tls = routed
        pool, verify = self._pool(plan.destination or "", tls)
        try:
            with _httpx_errors():
                core_response = await pool.handle_async_request(_core_request(request))
        except WrongServerIdentity as exc:
            exc.request = request
            raise
        stream = _AsyncCoreStream(core_response.stream)
        return _response(core_response, stream, self._core.identity_of(verify, core_response))

    async def aclose(self) -> None:
        """Close every pool and the plain transport."""
        with self._core.lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool, _ in pools:
            await pool.aclose()
        await self._passthrough.aclose()
