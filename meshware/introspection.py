"""``/meshz``: what the mesh inside this process is doing right now, as JSON.

::

    from meshware.introspection import Introspection, MeshzApp

    meshz = Introspection(watcher=watcher)
    meshz.add_outbound(outbound_state_of(client), resolver=registry)
    meshz.add_rate_limiter(lambda: stack.limiter)
    meshz.add_tls(tls)
    admin = MeshzApp(meshz)        # serve on a loopback-only admin port

The document has one section per registered source (Envoy's ``/config_dump`` and
``/clusters`` in one page):

- ``config``: the effective configuration's summary, its files, digest and load time, and
  the last reload's outcome and error (from a :class:`~meshware.config.reload.ConfigWatcher`);
- ``outbound``: per destination and subset, the resolved endpoints with their health
  (ejected or not, until when), the circuit breaker's state, and the retry budget's level;
- ``ratelimit``: the rules in force, the backend, and the bucket count of a ``memory://``
  backend;
- ``tls``: this service's certificate subject, SPIFFE id, ``not_after`` and the seconds left.

The responders answer ``GET /meshz`` only, and only to loopback callers unless told otherwise:
the document shows policies and endpoints, so it belongs on an admin port that only the host
can reach (``meshware serve --admin-port``), never on the public one.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from meshware.config.reload import ConfigWatcher, problems_of
from meshware.exceptions import ConfigurationError
from meshware.outbound.transports import OutboundState
from meshware.policy.ratelimit import RateLimiter

if TYPE_CHECKING:
    from meshware.outbound.discovery import Resolver
    from meshware.outbound.transports import Cluster
    from meshware.server.tls import ReloadingServerTLS
    from meshware.types import Environ, Receive, Scope, Send, StartResponse

__all__ = [
    "MESHZ_PATH",
    "Introspection",
    "MeshzApp",
    "MeshzWsgiApp",
    "default_introspection",
    "outbound_state_of",
]

MESHZ_PATH = "/meshz"
"""The path the responders answer."""

_JSON = "application/json"


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat()


def outbound_state_of(client_or_transport: Any) -> OutboundState | None:
    """The :class:`~meshware.outbound.transports.OutboundState` inside a mesh client (or
    its transport), found by walking the transport stack; ``None`` when there is none.

    Args:
        client_or_transport: a client from ``mesh_client``/``mesh_sync_client``, or a
            transport from ``mesh_transport``/``mesh_sync_transport``.
    """
    node: Any = getattr(client_or_transport, "_transport", client_or_transport)
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        core = getattr(node, "_core", None)
        for holder in (core, node):
            for name in ("state", "_state"):
                state = getattr(holder, name, None)
                if isinstance(state, OutboundState):
                    return state
        nxt = getattr(node, "_transport", None)
        node = nxt if nxt is not None else getattr(node, "_inner", None)
    return None


class Introspection:
    """Gathers the state of the objects registered with it into the ``/meshz`` document.

    Nothing is copied at registration: every :meth:`snapshot` reads the objects as they are
    then. Registering is thread-safe.

    Args:
        watcher: the :class:`~meshware.config.reload.ConfigWatcher` of the service's
            configuration, or ``None``.
        service: the service's name, shown when there is no watcher.
        clock: the monotonic clock of the outbound state (to turn ejection deadlines into
            seconds left); each state's own clock is used when it has one.
        wall_clock: the clock of the timestamps shown (Unix seconds).
    """

    def __init__(
        self,
        *,
        watcher: ConfigWatcher | None = None,
        service: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if watcher is not None and not isinstance(watcher, ConfigWatcher):
            raise ConfigurationError(
                "expected a ConfigWatcher or None", field="watcher", value=watcher
            )
        self.watcher = watcher
        self.service = service
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._outbound: list[tuple[str, OutboundState, Resolver | None]] = []
        self._limiters: list[Callable[[], RateLimiter | None]] = []
        self._tls: list[ReloadingServerTLS] = []
        self._cert_cache: tuple[str, dict[str, Any]] | None = None

    # -- registering ----------------------------------------------------------------------

    def add_outbound(
        self, state: OutboundState, *, name: str = "default", resolver: Resolver | None = None
    ) -> None:
        """Show the clusters of ``state`` (one per mesh client; ``name`` tells them apart).

        Args:
            state: the client's outbound state (see :func:`outbound_state_of`).
            name: the client's name in the document.
            resolver: the client's resolver: when given, each destination's endpoints are
                resolved afresh for the document; otherwise the endpoints the cluster saw
                last are shown.

        Raises:
            ConfigurationError: ``state`` is not an ``OutboundState``.
        """
        if not isinstance(state, OutboundState):
            raise ConfigurationError("expected an OutboundState", field="state", value=state)
        with self._lock:
            self._outbound.append((name, state, resolver))

    def add_rate_limiter(self, limiter: RateLimiter | Callable[[], RateLimiter | None]) -> None:
        """Show a rate limiter's rules: the limiter itself, or a callable returning the one
        in force (``lambda: stack.limiter`` for a reloadable stack)."""
        if isinstance(limiter, RateLimiter):
            fixed = limiter

            def getter() -> RateLimiter | None:
                return fixed

        elif callable(limiter):
            getter = limiter
        else:
            raise ConfigurationError(
                "expected a RateLimiter or a callable returning one", field="limiter", value=limiter
            )
        with self._lock:
            self._limiters.append(getter)

    def add_tls(self, tls: ReloadingServerTLS) -> None:
        """Show the certificate ``tls`` serves (re-read after each rotation)."""
        if not hasattr(tls, "server_cert_pem"):
            raise ConfigurationError("expected a ReloadingServerTLS", field="tls", value=tls)
        with self._lock:
            self._tls.append(tls)

    # -- the document ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``/meshz`` document as plain data (JSON-ready)."""
        now = self._wall_clock()
        with self._lock:
            outbound = list(self._outbound)
            limiters = list(self._limiters)
            tls = list(self._tls)
        document: dict[str, Any] = {
            "service": self._service_name(),
            "pid": os.getpid(),
            "time": _iso(now),
            "config": self._config(),
            "outbound": [self._outbound_section(n, s, r, now) for n, s, r in outbound],
            "ratelimit": [
                section
                for section in (self._ratelimit(get()) for get in limiters)
                if section is not None
            ],
            "tls": [self._certificate(item, now) for item in tls],
        }
        return document

    def render(self) -> bytes:
        """The ``/meshz`` document as JSON bytes."""
        return json.dumps(self.snapshot(), indent=2, default=str).encode()

    def _service_name(self) -> str | None:
        if self.watcher is not None and self.watcher.config.service is not None:
            return self.watcher.config.service
        return self.service

    def _config(self) -> dict[str, Any] | None:
        watcher = self.watcher
        if watcher is None:
            return None
        config = watcher.config
        source = config.source
        return {
            "service": config.service,
            "namespace": config.namespace,
            "generation": watcher.generation,
            "digest": source.digest,
            "loaded_at": _iso(watcher.loaded_at),
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in source.files],
            "summary": {
                "mtls_mode": None if config.mtls_mode is None else config.mtls_mode.name,
                "authorization_policies": [
                    {"name": p.name, "action": p.action, "dry_run": p.dry_run}
                    for p in config.policies
                ],
                "jwt_issuers": [rule.issuer for rule in config.jwt_rules],
                "rate_limit_rules": (
                    []
                    if config.rate_limit is None
                    else [rule.name for rule in config.rate_limit.rules]
                ),
                "virtual_services": [
                    {"name": vs.name, "hosts": list(vs.hosts)}
                    for vs in config.routes.virtual_services
                ],
                "destination_rules": [
                    {"host": rule.host, "subsets": sorted(rule.subset_names)}
                    for rule in config.destination_rules
                ],
                "registry_services": (
                    [] if config.registry is None else sorted(config.registry.services)
                ),
                "warnings": len(config.warnings) + len(config.scope_warnings),
            },
            "last_reload": {
                "outcome": watcher.last_outcome,
                "error": None if watcher.last_error is None else str(watcher.last_error),
                "problems": problems_of(watcher.last_error),
                "at": _iso(watcher.last_error_at),
            },
            "reloads": dict(watcher.reloads),
        }

    def _outbound_section(
        self, name: str, state: OutboundState, resolver: Resolver | None, now: float
    ) -> dict[str, Any]:
        mono = state.clock()
        clusters = []
        destinations: set[str] = set()
        for cluster in state.clusters:
            destinations.add(cluster.destination)
            clusters.append(self._cluster(cluster, resolver, mono, now))
        return {
            "name": name,
            "clusters": clusters,
            "retry_budgets": {
                destination: state.budget(destination).level()
                for destination in sorted(destinations)
            },
        }

    def _cluster(
        self, cluster: Cluster, resolver: Resolver | None, mono: float, now: float
    ) -> dict[str, Any]:
        endpoints: Iterable[Any]
        if resolver is not None:
            resolved = resolver.resolve(cluster.destination)
            endpoints = cluster.select(resolved) if resolved else ()
        else:
            endpoints = cluster.last_selected
        detector = cluster.detector
        ejected_until = {} if detector is None else detector.ejected_until(mono)
        shown = []
        for endpoint in endpoints:
            until = ejected_until.get(endpoint)
            shown.append(
                {
                    "address": f"{endpoint.address}:{endpoint.port}",
                    "labels": dict(endpoint.labels),
                    "healthy": until is None,
                    "ejected_until": None if until is None else _iso(now + (until - mono)),
                    "ejected_seconds_left": None if until is None else round(until - mono, 3),
                }
            )
        breaker = cluster.breaker
        return {
            "destination": cluster.destination,
            "subset": cluster.subset,
            "endpoints": shown,
            "breaker": None if breaker is None else breaker.state.value,
            "outlier_detection": detector is not None,
            "load_balancer": type(cluster.balancer).__name__,
        }

    def _ratelimit(self, limiter: RateLimiter | None) -> dict[str, Any] | None:
        if limiter is None:
            return None
        policy = limiter.policy
        backend = limiter.backend
        from meshware.state.memory import MemoryBackend

        return {
            "backend": policy.backend,
            "failure_mode": policy.failure_mode,
            "rules": [
                {
                    "name": rule.name,
                    "rate": str(rule.rate),
                    "key": rule.key if isinstance(rule.key, str) else repr(rule.key),
                    "shadow": rule.shadow,
                }
                for rule in policy.rules
            ],
            "buckets": len(backend) if isinstance(backend, MemoryBackend) else None,
            "backend_errors": limiter.backend_errors,
        }

    def _certificate(self, tls: ReloadingServerTLS, now: float) -> dict[str, Any]:
        pem = tls.server_cert_pem
        cached = self._cert_cache
        if cached is None or cached[0] is not pem:
            cached = (pem, _describe_certificate(pem))
            self._cert_cache = cached
        info = dict(cached[1])
        not_after = info.pop("_not_after")
        info["seconds_left"] = None if not_after is None else int(not_after - now)
        info["mode"] = tls.mode.value
        info["rotations"] = tls.reloads
        return info


_DEFAULT: Introspection | None = None
_DEFAULT_LOCK = threading.Lock()


def default_introspection() -> Introspection:
    """The process-wide :class:`Introspection` that ``meshware serve --admin-port`` serves.

    Register the application's own parts with it (its mesh clients:
    ``default_introspection().add_outbound(outbound_state_of(client))``) to see them on
    ``/meshz``.
    """
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Introspection()
        return _DEFAULT


def _describe_certificate(pem: str) -> dict[str, Any]:
    from cryptography import x509

    from meshware.identity.bundle import spiffe_id_of

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        return {"error": f"cannot read the certificate: {exc}", "_not_after": None}
    try:
        spiffe_id: str | None = str(spiffe_id_of(cert))
    except Exception:  # a certificate without a SPIFFE id is shown without one
        spiffe_id = None
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "spiffe_id": spiffe_id,
        "serial": format(cert.serial_number, "x"),
        "not_after": not_after.isoformat(),
        "_not_after": not_after.timestamp(),
    }


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


_NOT_FOUND = b'{"status":404,"error":"not_found","detail":"only /meshz is served here"}'
_NOT_ALLOWED = b'{"status":405,"error":"method_not_allowed","detail":"use GET"}'
_FORBIDDEN = b'{"status":403,"error":"forbidden","detail":"/meshz answers loopback callers only"}'


class _Responder:
    __slots__ = ("allow_remote", "introspection", "path")

    def __init__(self, introspection: Introspection, *, path: str, allow_remote: bool) -> None:
        if not isinstance(introspection, Introspection):
            raise ConfigurationError(
                "expected an Introspection", field="introspection", value=introspection
            )
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError('expected a path starting with "/"', field="path", value=path)
        self.introspection = introspection
        self.path = path
        self.allow_remote = allow_remote

    def answer(self, method: str, path: str, client: str | None) -> tuple[int, bytes]:
        if path != self.path:
            return 404, _NOT_FOUND
        if not self.allow_remote and not _loopback(client):
            return 403, _FORBIDDEN
        if method not in ("GET", "HEAD"):
            return 405, _NOT_ALLOWED
        return 200, self.introspection.render()


class MeshzApp(_Responder):
    """The ASGI responder of ``/meshz``: ``GET`` returns the document as JSON; other paths
    are 404, other methods 405, callers that are not on a loopback address 403.

    Args:
        introspection: what to show.
        path: the path to answer (default ``/meshz``).
        allow_remote: answer callers that are not on a loopback address too.
    """

    __slots__ = ()

    def __init__(
        self, introspection: Introspection, *, path: str = MESHZ_PATH, allow_remote: bool = False
    ) -> None:
        super().__init__(introspection, path=path, allow_remote=allow_remote)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        client = scope.get("client")
        status, body = self.answer(scope["method"], scope["path"], client[0] if client else None)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", _JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


_REASONS = {200: "OK", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


class MeshzWsgiApp(_Responder):
    """The WSGI responder of ``/meshz``; the twin of :class:`MeshzApp`.

    Args:
        introspection: what to show.
        path: the path to answer (default ``/meshz``).
        allow_remote: answer callers that are not on a loopback address too.
    """

    __slots__ = ()

    def __init__(
        self, introspection: Introspection, *, path: str = MESHZ_PATH, allow_remote: bool = False
    ) -> None:
        super().__init__(introspection, path=path, allow_remote=allow_remote)

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        status, body = self.answer(
            method, environ.get("PATH_INFO", "/"), environ.get("REMOTE_ADDR")
        )
        start_response(
            f"{status} {_REASONS[status]}",
            [
                ("Content-Type", _JSON),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b"" if method == "HEAD" else body]
