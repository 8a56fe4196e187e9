"""The FastAPI (and Starlette) plugin: :func:`install`, its middleware and its state.

``install(app, service="orders")`` adds the inbound stack as the application's outermost
middleware (``app.add_middleware``) with :class:`~meshware.inbound.routes.StarletteRoutes`, so
per-route ``@authorize`` and ``@rate_limit`` declarations on endpoint functions are enforced,
and keeps one mesh client (an ``httpx.AsyncClient``) for the application's lifetime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from meshware.exceptions import ConfigurationError
from meshware.inbound.asgi.stack import MeshStack, build_asgi_stack
from meshware.inbound.routes import StarletteRoutes
from meshware.outbound.client import mesh_client as build_mesh_client
from meshware.settings import MeshSettings, load_settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from meshware.inbound.health import HealthChecks
    from meshware.inbound.stack import InboundConfig
    from meshware.outbound.client import OutboundConfig
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MeshwareMiddleware", "MeshwareState", "install", "state_of"]

_ENDED = frozenset(
    {"lifespan.startup.failed", "lifespan.shutdown.complete", "lifespan.shutdown.failed"}
)


class MeshwareState:
    """What :func:`install` set up for one application; also ``app.state.meshware``.

    Attributes:
        settings: the merged :class:`~meshware.settings.MeshSettings`.
        inbound: the :class:`~meshware.inbound.stack.InboundConfig` of the stack.
        stack: the :class:`~meshware.inbound.asgi.stack.MeshStack`, or ``None`` until
            Starlette builds its middleware (at the first lifespan event or request).
    """

    __slots__ = ("_client", "inbound", "settings", "stack")

    def __init__(self, settings: MeshSettings, inbound: InboundConfig) -> None:
        self.settings = settings
        self.inbound = inbound
        self.stack: MeshStack | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def health(self) -> HealthChecks | None:
        """The health checks behind ``/readyz``; register your own with ``health.add()``."""
        return self.inbound.health

    @property
    def metrics(self) -> MeshMetrics | None:
        """The Prometheus metrics of both directions (served at ``/metrics``)."""
        return self.inbound.metrics

    def outbound_config(self) -> OutboundConfig:
        """The client's :class:`~meshware.outbound.client.OutboundConfig`: the settings, with
        the inbound side's metrics and tracer provider, so one scrape and one trace cover
        both directions."""
        provider = self.stack.tracer_provider if self.stack is not None else None
        return self.settings.outbound_config(metrics=self.metrics, tracer_provider=provider)

    @property
    def client(self) -> httpx.AsyncClient:
        """The application's mesh client: an ``httpx.AsyncClient`` whose transport is the
        outbound stack. Created at startup and closed at shutdown; created on first use when
        the server runs no lifespan (then it is never closed)."""
        if self._client is None or self._client.is_closed:
            self._client = build_mesh_client(self.outbound_config())
        return self._client

    async def aclose(self) -> None:
        """Close the mesh client and release what the stack owns (rate-limit backend
        connections, the tracer provider). Called at shutdown."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        if self.stack is not None:
            await self.stack.aclose()

    def __repr__(self) -> str:
        return f"<MeshwareState {self.settings.service}: {self.stack!r}>"


class MeshwareMiddleware:
    """The inbound stack as one pure-ASGI middleware, plus the mesh client's lifecycle.

    Added by :func:`install` with ``app.add_middleware``; Starlette builds it with the
    application inside it. Requests go through the stack's layers in their documented order
    (telemetry, health, deadline, identity, JWT, authorization, rate limiting). The lifespan
    passes through the stack too, so readiness turns ``READY`` once the application's own
    startup has finished and ``DRAINING`` when shutdown begins; around it, the mesh client is
    created when the server starts the lifespan (before the application's startup, which may
    use it) and closed after the application's shutdown.

    Args:
        app: the ASGI application inside.
        state: the :class:`MeshwareState` :func:`install` made.

    Attributes:
        stack: the :class:`~meshware.inbound.asgi.stack.MeshStack` around ``app``.
    """

    __slots__ = ("_entry", "app", "stack", "state")

    def __init__(self, app: ASGIApp, *, state: MeshwareState) -> None:
        self.app = app
        self.state = state
        self.stack = state.stack = build_asgi_stack(app, state.inbound)
        # The outermost layer itself: one call less per request than going through the stack.
        self._entry: ASGIApp = self.stack.layers[0] if self.stack.layers else app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self._entry(scope, receive, send)
            return
        state = self.state
        ended = False

        async def receive_hook() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _ = state.client
            return message

        async def send_hook(message: Message) -> None:
            nonlocal ended
            if message["type"] in _ENDED and not ended:
                ended = True
                await state.aclose()
            await send(message)

        try:
            await self._entry(scope, receive_hook, send_hook)
        finally:
            if not ended:
                await state.aclose()


def install(
    app: Starlette,
    *,
    service: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **settings: Any,
) -> MeshwareState:
    """Turn the mesh on for a FastAPI or Starlette application, both ways.

    ::

        app = FastAPI()
        meshware_fastapi.install(app, service="orders")

    Adds :class:`MeshwareMiddleware` as the outermost middleware (call it before adding your
    own, which then run inside the mesh), stores the :class:`MeshwareState` in
    ``app.state.meshware`` and marks the application so that ``meshware serve`` serves it
    as it is instead of wrapping it in a second stack.

    Settings merge in one order (see ``docs/settings.md``): the arguments here, then the
    ``MESHWARE_*`` environment variables, then the config file, then the defaults.

    Args:
        app: the FastAPI or Starlette application, before it starts.
        service: this service's name; may come from ``MESHWARE_SERVICE`` instead.
        config_file: the YAML config file; by default ``MESHWARE_CONFIG_FILE``.
        environ: the environment to read ``MESHWARE_*`` variables from (``os.environ`` when
            ``None``).
        settings: any other setting by name (``cert_dir=...``, ``policies=[...]``,
            ``rate_limit="100/second burst 20"``).

    Returns:
        The application's :class:`MeshwareState`.

    Raises:
        InvalidSetting: a setting is unknown, missing or invalid (naming it and its source).
        ConfigurationError: the mesh is already installed on ``app``, or ``app`` is not a
            Starlette application.
    """
    if not hasattr(app, "add_middleware") or not hasattr(app, "state"):
        raise ConfigurationError(
            "expected a FastAPI or Starlette application", field="app", value=app
        )
    if getattr(app.state, "meshware", None) is not None:
        raise ConfigurationError(
            "the mesh is already installed on this application", field="app", value=app
        )
    code = dict(settings)
    if service is not None:
        code["service"] = service
    merged = load_settings(code, environ=environ, config_file=config_file)
    state = MeshwareState(merged, merged.inbound_config(routes=StarletteRoutes(app)))
    app.add_middleware(MeshwareMiddleware, state=state)
    app.state.meshware = state
    # `meshware serve` serves a marked application as it is: it already has its stack.
    setattr(app, "__meshware_stack__", True)  # noqa: B010 - a marker, not a method
    return state


def state_of(app: Any) -> MeshwareState:
    """The :class:`MeshwareState` of an application :func:`install` was called on.

    Raises:
        ConfigurationError: the mesh is not installed on ``app``.
    """
    state = getattr(getattr(app, "state", None), "meshware", None)
    if not isinstance(state, MeshwareState):
        raise ConfigurationError(
            "the mesh is not installed on this application; call "
            "meshware_fastapi.install(app, service=...) first",
            field="app",
            value=app,
        )
    return state
