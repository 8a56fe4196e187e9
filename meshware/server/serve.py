"""``meshware serve``: run an ASGI app on uvicorn or a WSGI app on gunicorn with mesh TLS.

Both servers get the service's certificate from the certificate directory, apply the mTLS mode,
reload rotated certificates for new connections, and wrap the app in ``IdentityMiddleware`` so
every request carries the caller's verified identity.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import PeerVerifier
from meshware.identity.ca import ServicePaths
from meshware.identity.resolve import IdentityResolver, TrustedProxies
from meshware.server.tls import MtlsMode, ReloadingServerTLS

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

    def __post_init__(self) -> None:
        if ":" not in self.app:
            raise ConfigurationError("expected MODULE:ATTRIBUTE", field="app", value=self.app)
        if not 0 <= self.port <= 65535:
            raise ConfigurationError("expected a port 0-65535", field="port", value=self.port)
        if self.workers < 1:
            raise ConfigurationError("must be at least 1", field="workers", value=self.workers)
        if self.threads < 1:
            raise ConfigurationError("must be at least 1", field="threads", value=self.threads)


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


def _tls(options: ServeOptions) -> ReloadingServerTLS | None:
    if options.mtls is MtlsMode.DISABLE:
        return None
    paths = ServicePaths.under(options.cert_dir, options.service, options.namespace)
    return ReloadingServerTLS(
        cert_file=paths.cert, key_file=paths.key, bundle_file=paths.bundle, mode=options.mtls
    )


def _resolver(tls: ReloadingServerTLS | None, options: ServeOptions) -> IdentityResolver | None:
    if tls is None:
        return None
    return IdentityResolver(
        PeerVerifier(lambda: tls.bundles),
        trusted_proxies=TrustedProxies.parse(options.trusted_proxies),
    )


def _plaintext_scheme(app: Any) -> Any:
    """gunicorn marks every request https once TLS is configured; correct plaintext ones."""

    def app_with_scheme(environ: dict[str, Any], start_response: Any) -> Any:
        if not isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket):
            environ["wsgi.url_scheme"] = "http"
        return app(environ, start_response)

    return app_with_scheme


def serve(options: ServeOptions) -> None:
    """Serve until interrupted. Configuration errors surface before any socket is opened."""
    for path in options.extra_paths:
        sys.path.insert(0, path)
    app = import_app(options.app)
    interface = detect_interface(app) if options.interface == "auto" else options.interface
    tls = _tls(options)
    resolver = _resolver(tls, options)
    if interface == "asgi":
        _serve_asgi(app, tls, resolver, options)
    else:
        _serve_wsgi(app, tls, resolver, options)


def _serve_asgi(
    app: Any,
    tls: ReloadingServerTLS | None,
    resolver: IdentityResolver | None,
    options: ServeOptions,
) -> None:
    import uvicorn

    from meshware.inbound.asgi.identity import IdentityMiddleware
    from meshware.server.asgi_server import mesh_protocol_class

    wrapped = IdentityMiddleware(app, resolver=resolver) if resolver is not None else app
    config = uvicorn.Config(
        wrapped,
        host=options.host,
        port=options.port,
        http=mesh_protocol_class(tls, options.mtls),
        lifespan="auto",
        log_level=options.log_level,
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()


def _serve_wsgi(
    app: Any,
    tls: ReloadingServerTLS | None,
    resolver: IdentityResolver | None,
    options: ServeOptions,
) -> None:
    from gunicorn.app.base import BaseApplication

    from meshware.inbound.wsgi.identity import IdentityMiddleware

    wrapped = IdentityMiddleware(app, resolver=resolver) if resolver is not None else app
    settings: dict[str, Any] = {
        "bind": f"{options.host}:{options.port}",
        "workers": options.workers,
        "worker_class": "gthread",
        "threads": options.threads,
        "loglevel": options.log_level,
        "accesslog": None,
        "graceful_timeout": 10,
    }
    if tls is not None:
        paths = ServicePaths.under(options.cert_dir, options.service, options.namespace)
        settings.update(
            certfile=str(paths.cert),
            keyfile=str(paths.key),
            ca_certs=str(paths.bundle),
            ssl_context=lambda conf, default_factory: tls.context,
            # The handshake happens inside wrap_socket, which also lets PERMISSIVE mode hand
            # back a plain socket for a plaintext connection.
            do_handshake_on_connect=True,
        )
        if options.mtls is MtlsMode.PERMISSIVE:
            wrapped = _plaintext_scheme(wrapped)

    class MeshGunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return wrapped

    MeshGunicorn().run()
