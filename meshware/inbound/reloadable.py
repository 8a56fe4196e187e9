"""An inbound stack that a new configuration can replace while it serves.

::

    from meshware.inbound.reloadable import ReloadableStack

    stack = ReloadableStack(app, watcher.config.inbound_config())
    watcher.subscribe(lambda config: stack.prepare(config.inbound_config()))

:class:`ReloadableStack` (ASGI) and :class:`ReloadableWsgiStack` (WSGI) hold the current
:class:`~meshware.inbound.asgi.stack.MeshStack` and build a new one for each new
:class:`~meshware.inbound.stack.InboundConfig`. The swap is one assignment: a request in flight
finishes on the stack it started on, the next request takes the new one. The long-lived parts
carry over from stack to stack, so a reload changes policies and limits but not what the
service has learned:

- the same :class:`~meshware.telemetry.metrics.MeshMetrics` (counters keep counting);
- the same :class:`~meshware.inbound.health.HealthChecks` (readiness, draining and registered
  checks are kept);
- the same rate-limit backend while the backend URL stays the same (buckets keep their
  levels; a changed URL gets a new backend);
- the same tracer provider.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from meshware.exceptions import ConfigurationError
from meshware.inbound.asgi.stack import MeshStack as AsgiMeshStack
from meshware.inbound.asgi.stack import build_asgi_stack
from meshware.inbound.stack import InboundConfig
from meshware.inbound.wsgi.stack import MeshStack as WsgiMeshStack
from meshware.inbound.wsgi.stack import build_wsgi_stack
from meshware.policy.ratelimit import RateLimitPolicy

if TYPE_CHECKING:
    from meshware.inbound.health import HealthChecks
    from meshware.policy.ratelimit import RateLimiter
    from meshware.state.base import RateLimitBackend
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.types import ASGIApp, Environ, Receive, Scope, Send, StartResponse, WSGIApp

__all__ = ["ReloadableStack", "ReloadableWsgiStack"]

_S = TypeVar("_S", AsgiMeshStack, WsgiMeshStack)

_DEFAULT_BACKEND = RateLimitPolicy().backend


class _Reloadable(Generic[_S]):
    """What the ASGI and WSGI holders share: building, carrying parts over, swapping."""

    __meshware_stack__: ClassVar[bool] = True

    def __init__(self, app: Any, config: InboundConfig) -> None:
        if not isinstance(config, InboundConfig):
            raise ConfigurationError(
                f"expected an InboundConfig, got {type(config).__name__}",
                field="config",
                value=config,
            )
        self.app = app
        self._lock = threading.Lock()
        self._backends: dict[str, RateLimitBackend] = {}
        self.metrics: MeshMetrics | None = config.metrics
        self.health: HealthChecks | None = config.health
        self._tracer_provider: Any = None
        self.generation = 0
        self._current: _S = self._build(config)
        self.generation = 1
        self._tracer_provider = self._current.tracer_provider

    # -- what the served stack exposes (the current one's) --------------------------------

    @property
    def current(self) -> _S:
        """The stack new requests go to."""
        return self._current

    @property
    def config(self) -> InboundConfig:
        """The configuration of the current stack."""
        return self._current.config

    @property
    def resolver(self) -> Any:
        """The current stack's identity resolver, or ``None``."""
        return self._current.resolver

    @property
    def limiter(self) -> RateLimiter | None:
        """The current stack's rate limiter, or ``None``."""
        return self._current.limiter

    @property
    def layers(self) -> tuple[Any, ...]:
        """The current stack's middleware instances, outermost first."""
        return self._current.layers

    @property
    def backends(self) -> dict[str, RateLimitBackend]:
        """The rate-limit backends created so far, by URL (shared by every stack)."""
        return dict(self._backends)

    # -- changing the configuration -------------------------------------------------------

    def prepare(self, config: InboundConfig) -> Callable[[], None]:
        """Build the stack of ``config`` without serving it yet.

        ``config.metrics`` and ``config.health`` are replaced by this holder's (the first
        configuration's), so counters and readiness carry over.

        Args:
            config: the new inbound configuration.

        Returns:
            A callable that makes the new stack the current one (one assignment). A
            :class:`~meshware.config.reload.ConfigWatcher` subscriber returns it.

        Raises:
            ConfigurationError: ``config`` is not an
                :class:`~meshware.inbound.stack.InboundConfig`, or its stack cannot be built
                (the current stack stays).
        """
        if not isinstance(config, InboundConfig):
            raise ConfigurationError(
                f"expected an InboundConfig, got {type(config).__name__}",
                field="config",
                value=config,
            )
        if config.metrics is not self.metrics or config.health is not self.health:
            config = dataclasses.replace(config, metrics=self.metrics, health=self.health)
        stack = self._build(config)

        def commit() -> None:
            with self._lock:
                self._current = stack
                self.generation += 1

        return commit

    def swap(self, config: InboundConfig) -> _S:
        """Build the stack of ``config`` and make it the current one (see :meth:`prepare`).

        Returns:
            The new stack.

        Raises:
            ConfigurationError: as :meth:`prepare`; the current stack stays.
        """
        self.prepare(config)()
        return self._current

    def _backend(self, config: InboundConfig) -> RateLimitBackend | None:
        if "ratelimit" not in config.layers():
            return None
        url = config.rate_limit.backend if config.rate_limit is not None else _DEFAULT_BACKEND
        with self._lock:
            backend = self._backends.get(url)
            if backend is None:
                from meshware.state import backend_from_url

                backend = self._backends[url] = backend_from_url(url)
        return backend

    def _build(self, config: InboundConfig) -> _S:
        raise NotImplementedError

    def _owned_backends(self) -> Iterable[RateLimitBackend]:
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        return backends

    def __repr__(self) -> str:
        return f"<{type(self).__name__} generation {self.generation}: {self._current!r}>"


class ReloadableStack(_Reloadable[AsgiMeshStack]):
    """An ASGI application serving the current inbound stack of a changing configuration.

    Serve it as you would a :class:`~meshware.inbound.asgi.stack.MeshStack`; call
    :meth:`swap` (or subscribe :meth:`prepare` to a
    :class:`~meshware.config.reload.ConfigWatcher`) to change the configuration.

    Args:
        app: the user's ASGI application, innermost.
        config: the first configuration. Its ``metrics`` and ``health`` (and the tracer
            provider built from its ``tracing``) are kept by every later stack.

    Attributes:
        app: the user's application.
        metrics: the metrics every stack records into, or ``None``.
        health: the health checks every stack serves, or ``None``.
        generation: 1 for the first stack, one more per swap.

    Raises:
        ConfigurationError: ``config`` is not an
            :class:`~meshware.inbound.stack.InboundConfig`, or its stack cannot be built.
    """

    def __init__(self, app: ASGIApp, config: InboundConfig) -> None:
        super().__init__(app, config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One read of the attribute: the whole request runs on that stack.
        await self._current(scope, receive, send)

    def _build(self, config: InboundConfig) -> AsgiMeshStack:
        return build_asgi_stack(
            self.app,
            config,
            rate_limit_backend=self._backend(config),
            tracer_provider=self._tracer_provider,
        )

    async def aclose(self) -> None:
        """Release the rate-limit backends and the tracer provider (flushing its spans)."""
        await self._current.aclose()
        for backend in self._owned_backends():
            await backend.aclose()


class ReloadableWsgiStack(_Reloadable[WsgiMeshStack]):
    """A WSGI application serving the current inbound stack of a changing configuration;
    the twin of :class:`ReloadableStack`.

    Args:
        app: the user's WSGI application, innermost.
        config: the first configuration (see :class:`ReloadableStack`).

    Attributes:
        app: the user's application.
        metrics: the metrics every stack records into, or ``None``.
        health: the health checks every stack serves, or ``None``.
        generation: 1 for the first stack, one more per swap.

    Raises:
        ConfigurationError: as :class:`ReloadableStack`.
    """

    def __init__(self, app: WSGIApp, config: InboundConfig) -> None:
        super().__init__(app, config)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self._current(environ, start_response)

    def _build(self, config: InboundConfig) -> WsgiMeshStack:
        return build_wsgi_stack(
            self.app,
            config,
            rate_limit_backend=self._backend(config),
            tracer_provider=self._tracer_provider,
        )

    def close(self) -> None:
        """Release the rate-limit backends and the tracer provider (flushing its spans)."""
        self._current.close()
        for backend in self._owned_backends():
            backend.close()
