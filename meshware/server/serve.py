"""``meshware serve``: run an ASGI app on uvicorn or a WSGI app on gunicorn with mesh TLS.

Both servers get the service's certificate from the certificate directory, apply the mTLS mode,
reload rotated certificates for new connections, and wrap the app in ``IdentityMiddleware`` so
every request carries the caller's verified identity.

With ``--config`` the inbound stack is built from mesh configuration files (authorization
policies, JWT rules, rate limits, PeerAuthentication mode) and follows their changes without
a restart (:class:`~meshware.config.reload.ConfigWatcher`). ``--admin-port`` serves ``/meshz``
(:mod:`meshware.introspection`) in plaintext on a loopback-only listener.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import ServicePaths
from meshware.identity.resolve import IdentityResolver, TrustedProxies
from meshware.server.tls import MtlsMode, ReloadingServerTLS

if TYPE_CHECKING:
    from meshware.config.loader import MeshConfig
    from meshware.config.reload import ConfigWatcher
    from meshware.introspection import Introspection

logger = logging.getLogger("meshware.server")

Interface = Literal["auto", "asgi", "wsgi"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """What ``meshware serve`` was asked to do (see ``meshware serve --help``)."""

    app: str
    service: str
    namespace: str = "default"
    cert_dir: Path = Path(".meshware/certs")
    host: str = "127.0.0.1"
    port: int = 8443
    mtls: MtlsMode = MtlsMode.STRICT
    interface: Interface = "auto"
    workers: int = 1
    threads: int = 8
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "warning"
    extra_paths: tuple[str, ...] = field(default=())
    health_port: int | None = None
    access_log: bool = True
    access_log_file: str | None = None
    trace_exporter: Literal["none", "console", "otlp"] = "none"
    trace_sample: float = 0.01
    otlp_endpoint: str | None = None
    drain_seconds: float = 0.0
    config_files: tuple[str, ...] = ()
    mtls_explicit: bool = True
    admin_port: int | None = None
    reload_interval: float = 1.0

    def __post_init__(self) -> None:
        if ":" not in self.app:
            raise ConfigurationError("expected MODULE:ATTRIBUTE", field="app", value=self.app)
        if not 0 <= self.port <= 65535:
            raise ConfigurationError("expected a port 0-65535", field="port", value=self.port)
        if self.workers < 1:
            raise ConfigurationError("must be at least 1", field="workers", value=self.workers)
        if self.threads < 1:
            raise ConfigurationError("must be at least 1", field="threads", value=self.threads)
        if self.health_port is not None and (
            not 0 < self.health_port <= 65535 or self.health_port == self.port
        ):
            raise ConfigurationError(
                "expected a port 1-65535 other than --port",
                field="health_port",
                value=self.health_port,
            )
        if self.admin_port is not None and (
            not 0 < self.admin_port <= 65535 or self.admin_port in (self.port, self.health_port)
        ):
            raise ConfigurationError(
                "expected a port 1-65535 other than --port and --health-port",
                field="admin_port",
                value=self.admin_port,
            )
        if not 0.05 <= self.reload_interval <= 3600.0:
            raise ConfigurationError(
                "expected seconds from 0.05 to 3600",
                field="reload_interval",
                value=self.reload_interval,
            )
        if not 0.0 <= self.drain_seconds <= 3600.0:
            raise ConfigurationError(
                "expected seconds from 0 to 3600", field="drain_seconds", value=self.drain_seconds
            )
        if not 0.0 <= self.trace_sample <= 1.0:
            raise ConfigurationError(
                "expected a ratio from 0 to 1", field="trace_sample", value=self.trace_sample
            )
        if self.access_log and self.access_log_file is not None:
            # Opened once here so that a bad path stops startup, before workers are forked.
            from meshware.telemetry.access_log import AccessLog, access_log_of

            log = access_log_of(True, self.access_log_file)
            if isinstance(log, AccessLog):
                log.close()


def import_app(reference: str) -> Any:
    """Import ``module:attribute`` (dots allowed in the attribute) with clear errors."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r}: {exc}", field="app", value=reference
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attr!r}", field="app", value=reference
            ) from None
    return obj


def detect_interface(app: Any) -> Literal["asgi", "wsgi"]:
    """ASGI when the app (or its ``__call__``) is a coroutine function, else WSGI."""
    if inspect.iscoroutinefunction(app):
        return "asgi"
    call = getattr(type(app), "__call__", None)  # noqa: B004 - the method itself, to inspect
    return "asgi" if inspect.iscoroutinefunction(call) else "wsgi"


HEALTH_PATHS = frozenset({"/livez", "/readyz"})


def _tls(options: ServeOptions) -> ReloadingServerTLS | None:
    if options.mtls is MtlsMode.DISABLE:
        return None
    paths = ServicePaths.under(options.cert_dir, options.service, options.namespace)
    return ReloadingServerTLS(
        cert_file=paths.cert,
        key_file=paths.key,
        bundle_file=paths.bundle,
        mode=options.mtls,
        plaintext_port=options.health_port,
    )


def _bundle_source(tls: ReloadingServerTLS | None, options: ServeOptions) -> Any:
    """Where the identity layer gets trust bundles: the server's reloading ones under TLS; the
    service's bundle file when TLS is off (callers can still be proven by a trusted proxy's
    XFCC); none when there is no bundle at all."""
    if tls is not None:
        return lambda: tls.bundles
    bundle = ServicePaths.under(options.cert_dir, options.service, options.namespace).bundle
    return str(bundle) if bundle.exists() else None


def _routes(app: Any) -> Any:
    """Route templates for metric labels and per-route policies, for the frameworks we know."""
    from meshware.inbound.routes import FlaskRoutes, StarletteRoutes

    with contextlib.suppress(ImportError):
        from starlette.applications import Starlette

        if isinstance(app, Starlette):
            return StarletteRoutes(app)
    with contextlib.suppress(ImportError):
        from flask import Flask

        if isinstance(app, Flask):
            return FlaskRoutes(app)
    return None


def inbound_app(
    app: Any,
    interface: Literal["asgi", "wsgi"],
    tls: ReloadingServerTLS | None,
    options: ServeOptions,
    watcher: ConfigWatcher | None = None,
) -> Any:
    """The app as served: the user's own mesh stack, or the default stack around a plain app.

    A plain app gets telemetry (Istio metrics at ``/metrics``, access log, tracing as asked),
    health (``/livez``, ``/readyz``), deadlines and identity. A stack the user built
    (``build_asgi_stack``) is served as it is; if it has no identity layer and the server does
    TLS, an identity layer is put outside it so its handlers still see the caller.

    With a ``watcher`` (``--config``), the plain app's stack also carries the configuration's
    authorization policies, JWT rules and rate limit, and is rebuilt on every reload
    (:class:`~meshware.inbound.reloadable.ReloadableStack`).
    """
    bundles = _bundle_source(tls, options)
    if getattr(app, "__meshware_stack__", False):
        if watcher is not None:
            raise ConfigurationError(
                "--config builds the inbound stack itself; serve the plain application, not a "
                "stack built in code",
                field="config_files",
                value=options.config_files,
            )
        if getattr(app, "resolver", None) is not None or bundles is None:
            return app
        resolver = IdentityResolver(
            PeerVerifier(bundles if callable(bundles) else TrustBundles.from_file(bundles)),
            trusted_proxies=TrustedProxies.parse(options.trusted_proxies),
        )
        if interface == "asgi":
            from meshware.inbound.asgi.identity import IdentityMiddleware as AsgiIdentity

            return AsgiIdentity(app, resolver=resolver)
        from meshware.inbound.wsgi.identity import IdentityMiddleware as WsgiIdentity

        return WsgiIdentity(app, resolver=resolver)

    from meshware.inbound.stack import InboundConfig
    from meshware.telemetry.access_log import access_log_of
    from meshware.telemetry.tracing import TracingConfig

    tracing = None
    if options.trace_exporter != "none":
        tracing = TracingConfig(
            service_name=options.service,
            sampler_ratio=options.trace_sample,
            exporter=options.trace_exporter,
            otlp_endpoint=options.otlp_endpoint,
        )
    fixed: dict[str, Any] = {
        "service": options.service,
        "namespace": options.namespace,
        "bundle": bundles,
        "trusted_proxies": options.trusted_proxies,
        "tracing": tracing,
        "access_log": access_log_of(options.access_log, options.access_log_file),
        "routes": _routes(app),
    }
    if watcher is not None:
        return _reloadable(app, interface, watcher, fixed, options)
    config = InboundConfig(**fixed)
    if interface == "asgi":
        from meshware.inbound.asgi.stack import build_asgi_stack

        return build_asgi_stack(app, config)
    from meshware.inbound.wsgi.stack import build_wsgi_stack

    return build_wsgi_stack(app, config)


def _reloadable(
    app: Any,
    interface: Literal["asgi", "wsgi"],
    watcher: ConfigWatcher,
    fixed: dict[str, Any],
    options: ServeOptions,
) -> Any:
    from meshware.inbound.reloadable import ReloadableStack, ReloadableWsgiStack

    # The server's mTLS mode is fixed at start-up; identities are required exactly when it
    # is STRICT (an explicit --mtls wins over the configuration's PeerAuthentication).
    fixed = {**fixed, "require_identity": options.mtls is MtlsMode.STRICT and bool(fixed["bundle"])}
    first = watcher.config.inbound_config(**fixed)
    stack: Any = (
        ReloadableStack(app, first) if interface == "asgi" else ReloadableWsgiStack(app, first)
    )
    started_mode = options.mtls

    def on_config(config: MeshConfig) -> Any:
        mode = config.mtls_mode
        if not options.mtls_explicit and mode is not None and mode is not started_mode:
            logger.warning(
                "the PeerAuthentication mode is now %s; the server keeps %s until it restarts",
                mode.name,
                started_mode.name,
            )
        return stack.prepare(config.inbound_config(**fixed))

    watcher.subscribe(on_config)
    return stack


def _admin(
    watcher: ConfigWatcher | None,
    tls: ReloadingServerTLS | None,
    served: Any,
    options: ServeOptions,
) -> Introspection:
    from meshware.introspection import default_introspection

    introspection = default_introspection()
    introspection.service = options.service
    if watcher is not None:
        introspection.watcher = watcher
    if tls is not None:
        introspection.add_tls(tls)
    stack = served
    while stack is not None and not hasattr(stack, "limiter"):
        stack = getattr(stack, "app", None)
    if stack is not None:
        introspection.add_rate_limiter(lambda: getattr(stack, "limiter", None))
    return introspection


class _AdminPlaintext:
    """What gunicorn's ``ssl_context`` hook returns: connections to the admin port stay
    plaintext, every other one goes through the server's TLS context."""

    __slots__ = ("_port", "_tls")

    def __init__(self, tls: ReloadingServerTLS, port: int) -> None:
        self._tls = tls
        self._port = port

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if sock.getsockname()[1] == self._port:
            return sock
        return self._tls.context.wrap_socket(sock, *args, **kwargs)


def _admin_port_wsgi(app: Any, port: int, admin_app: Any) -> Any:
    """On gunicorn's admin listener, answer with ``admin_app`` (``/meshz``) only."""

    def admin_port_app(environ: dict[str, Any], start_response: Any) -> Any:
        sock = environ.get("gunicorn.socket")
        local = sock.getsockname()[1] if sock is not None else None
        if local == port:
            return admin_app(environ, start_response)
        return app(environ, start_response)

    return admin_port_app


def _plaintext_scheme(app: Any) -> Any:
    """gunicorn marks every request https once TLS is configured; correct plaintext ones."""

    def app_with_scheme(environ: dict[str, Any], start_response: Any) -> Any:
        if not isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket):
            environ["wsgi.url_scheme"] = "http"
        return app(environ, start_response)

    return app_with_scheme


def _health_port_wsgi(app: Any, port: int) -> Any:
    """On gunicorn's plaintext health port, answer only the health paths."""
    body = b'{"status":404,"error":"not_found","detail":"only health paths are served here"}'
    port_text = str(port)

    def health_port_app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("SERVER_PORT") == port_text and environ.get("PATH_INFO") not in HEALTH_PATHS:
            start_response(
                "404 Not Found",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    return health_port_app


def _multiprocess_metrics(options: ServeOptions) -> str | None:
    """Several gunicorn workers share one /metrics through prometheus-client's multiprocess
    mode; the directory must be set before prometheus_client is first imported."""
    if options.workers < 2 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    directory = tempfile.mkdtemp(prefix=f"meshware-{options.service}-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def serve(options: ServeOptions) -> None:
    """Serve until interrupted. Configuration errors surface before any socket is opened."""
    for path in options.extra_paths:
        sys.path.insert(0, path)
    metrics_dir = _multiprocess_metrics(options)
    try:
        app = import_app(options.app)
        interface = detect_interface(app) if options.interface == "auto" else options.interface
        if interface == "asgi" and options.workers > 1:
            raise ConfigurationError(
                "ASGI apps are served by one uvicorn process; run several instances instead",
                field="workers",
                value=options.workers,
            )
        watcher = None
        if options.config_files:
            from meshware.config.reload import ConfigWatcher

            # A broken configuration at start-up stops here, before any socket is opened.
            watcher = ConfigWatcher(
                options.config_files,
                service=options.service,
                namespace=options.namespace,
                interval=options.reload_interval,
            )
            mode = watcher.config.mtls_mode
            if not options.mtls_explicit and mode is not None:
                options = replace(options, mtls=mode)
        tls = _tls(options)
        served = inbound_app(app, interface, tls, options, watcher)
        if watcher is not None:
            watcher.metrics = getattr(served, "metrics", None)
        introspection = (
            _admin(watcher, tls, served, options) if options.admin_port is not None else None
        )
        if interface == "asgi":
            if watcher is not None:
                watcher.start()
            _serve_asgi(served, tls, options, introspection)
        else:
            _serve_wsgi(served, tls, options, introspection, watcher)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # socket says it is TCP; without it small responses wait for Nagle + delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror}", field="port", value=port
        ) from exc
    sock.listen(2048)
    return sock


def _serve_asgi(
    app: Any,
    tls: ReloadingServerTLS | None,
    options: ServeOptions,
    introspection: Introspection | None = None,
) -> None:
    import uvicorn

    from meshware.server.asgi_server import health_only, mesh_protocol_class

    health_app = health_only(app, HEALTH_PATHS) if options.health_port is not None else None
    admin_app = None
    if introspection is not None:
        from meshware.introspection import MeshzApp

        admin_app = MeshzApp(introspection)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        http=mesh_protocol_class(
            tls,
            options.mtls,
            health_port=options.health_port,
            health_app=health_app,
            admin_port=options.admin_port if admin_app is not None else None,
            admin_app=admin_app,
        ),
        lifespan="auto",
        log_level=options.log_level,
        access_log=False,
        server_header=False,
    )
    sockets = [_listen(options.host, options.port)]
    if options.health_port is not None:
        sockets.append(_listen(options.host, options.health_port))
    if admin_app is not None and options.admin_port is not None:
        # Loopback only, whatever --host says: /meshz is never on a reachable address.
        sockets.append(_listen("127.0.0.1", options.admin_port))
    server = _draining_server_class(uvicorn.Server)(
        config, drain_seconds=options.drain_seconds, health=_health_of(app)
    )
    server.run(sockets=sockets)


def _health_of(app: Any) -> Any:
    """The HealthChecks of a served mesh stack (possibly wrapped in an identity layer)."""
    while app is not None:
        health = getattr(app, "health", None)
        if health is not None and hasattr(health, "mark_draining"):
            return health
        # A Flask app with the meshware extension keeps its state in app.extensions.
        extension = (getattr(app, "extensions", None) or {}).get("meshware")
        if extension is not None and getattr(extension, "health", None) is not None:
            return extension.health
        app = getattr(app, "app", None)
    return None


def _draining_server_class(base: type[Any]) -> type[Any]:
    class DrainingServer(base):  # type: ignore[misc]
        """On SIGTERM, turn readiness to 503 first and keep serving for ``drain_seconds`` (so
        load balancers and Kubernetes stop sending new requests), then shut down as usual:
        stop accepting, finish the requests in flight, run the lifespan shutdown."""

        def __init__(self, config: Any, *, drain_seconds: float, health: Any) -> None:
            super().__init__(config)
            self._drain_seconds = drain_seconds
            self._health = health
            self._draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and self._drain_seconds > 0 and not self._draining:
                self._draining = True
                if self._health is not None:
                    self._health.mark_draining()
                logger.info("draining for %.1fs before shutting down", self._drain_seconds)
                timer = threading.Timer(self._drain_seconds, super().handle_exit, (sig, frame))
                timer.daemon = True
                timer.start()
                return
            super().handle_exit(sig, frame)

    return DrainingServer


def _serve_wsgi(
    app: Any,
    tls: ReloadingServerTLS | None,
    options: ServeOptions,
    introspection: Introspection | None = None,
    watcher: ConfigWatcher | None = None,
) -> None:
    from gunicorn.app.base import BaseApplication

    binds = [f"{options.host}:{options.port}"]
    if options.health_port is not None:
        binds.append(f"{options.host}:{options.health_port}")
        app = _health_port_wsgi(app, options.health_port)
    if introspection is not None and options.admin_port is not None:
        from meshware.introspection import MeshzWsgiApp

        # Loopback only, whatever --host says: /meshz is never on a reachable address.
        binds.append(f"127.0.0.1:{options.admin_port}")
        app = _admin_port_wsgi(app, options.admin_port, MeshzWsgiApp(introspection))
    settings: dict[str, Any] = {
        "bind": binds,
        "workers": options.workers,
        "worker_class": "gthread",
        "threads": options.threads,
        "loglevel": options.log_level,
        "accesslog": None,
        "graceful_timeout": 10,
    }
    health = _health_of(app)
    if health is not None:
        from meshware.inbound.wsgi.health import gunicorn_hooks

        settings.update(gunicorn_hooks(health))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        settings["child_exit"] = _mark_worker_dead
    if tls is not None:
        paths = ServicePaths.under(options.cert_dir, options.service, options.namespace)
        settings.update(
            certfile=str(paths.cert),
            keyfile=str(paths.key),
            ca_certs=str(paths.bundle),
            ssl_context=(
                (lambda conf, default_factory: tls.context)
                if options.admin_port is None or introspection is None
                else (lambda conf, default_factory: _AdminPlaintext(tls, options.admin_port))
            ),
            # The handshake happens inside wrap_socket, which also lets PERMISSIVE mode and the
            # health port hand back a plain socket.
            do_handshake_on_connect=True,
        )
        if (
            options.mtls is MtlsMode.PERMISSIVE
            or options.health_port is not None
            or introspection is not None
        ):
            app = _plaintext_scheme(app)

    class MeshGunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Runs in each worker, after the fork: the watcher's thread must start here.
            if watcher is not None:
                watcher.start()
            return app

    MeshGunicorn().run()


def _mark_worker_dead(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
