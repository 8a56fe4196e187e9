"""The Flask extension: ``Meshware(app)`` or ``Meshware().init_app(app)``."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from flask import Flask, current_app, g, request

from meshware.exceptions import ConfigurationError
from meshware.inbound.record import IDENTITY_KEY
from meshware.inbound.routes import FlaskRoutes
from meshware.inbound.wsgi.stack import MeshStack, build_wsgi_stack
from meshware.outbound.client import mesh_sync_client
from meshware.settings import MeshSettings, SettingsSource, load_settings

if TYPE_CHECKING:
    from meshware.identity.identity import Identity
    from meshware.inbound.health import HealthChecks
    from meshware.outbound.client import OutboundConfig
    from meshware.telemetry.metrics import MeshMetrics

__all__ = ["EXTENSION_KEY", "Meshware", "MeshwareState", "client", "current_identity"]

EXTENSION_KEY = "meshware"
"""The key of the :class:`MeshwareState` in ``app.extensions``."""


class MeshwareState:
    """What :meth:`Meshware.init_app` set up for one application:
    ``app.extensions["meshware"]``.

    Attributes:
        settings: the merged :class:`~meshware.settings.MeshSettings`.
        stack: the :class:`~meshware.inbound.wsgi.stack.MeshStack` now in ``app.wsgi_app``.
    """

    __slots__ = ("_client", "_lock", "settings", "stack")

    def __init__(self, settings: MeshSettings, stack: MeshStack) -> None:
        self.settings = settings
        self.stack = stack
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def health(self) -> HealthChecks | None:
        """The health checks behind ``/readyz``; register your own with ``health.add()``."""
        return self.stack.health

    @property
    def metrics(self) -> MeshMetrics | None:
        """The Prometheus metrics of both directions (served at ``/metrics``)."""
        return self.stack.metrics

    def outbound_config(self) -> OutboundConfig:
        """The client's :class:`~meshware.outbound.client.OutboundConfig`: the settings, with
        the inbound side's metrics and tracer provider."""
        return self.settings.outbound_config(
            metrics=self.metrics, tracer_provider=self.stack.tracer_provider
        )

    @property
    def client(self) -> httpx.Client:
        """The application's mesh client, an ``httpx.Client`` shared by all threads, built on
        first use. Calls made while serving a request carry its trace context, its
        ``x-request-id`` and its remaining deadline."""
        found = self._client
        if found is None or found.is_closed:
            with self._lock:
                found = self._client
                if found is None or found.is_closed:
                    found = self._client = mesh_sync_client(self.outbound_config())
        return found

    def close(self) -> None:
        """Close the mesh client and release what the stack owns (rate-limit backend
        connections, the tracer provider). Call it when the application stops."""
        with self._lock:
            found, self._client = self._client, None
        if found is not None:
            found.close()
        self.stack.close()

    def __repr__(self) -> str:
        return f"<MeshwareState {self.settings.service}: {self.stack!r}>"


def _note_identity() -> None:
    g.mesh_identity = request.environ.get(IDENTITY_KEY)


class Meshware:
    """The mesh for a Flask application, both ways: ``Meshware(app)``.

    ::

        app = Flask(__name__)
        app.config["MESHWARE_SERVICE"] = "payments"
        Meshware(app)

    :meth:`init_app` wraps ``app.wsgi_app`` in the inbound stack (with
    :class:`~meshware.inbound.routes.FlaskRoutes`, so ``@authorize`` and ``@rate_limit`` on
    view functions are enforced), puts the caller's identity on ``flask.g.mesh_identity``
    before each request, and keeps the state, with the mesh client, in
    ``app.extensions["meshware"]``. The application factory pattern works too::

        mesh = Meshware(cert_dir="/etc/certs")

        def create_app():
            app = Flask(__name__)
            mesh.init_app(app)
            return app

    Settings merge in one order (see ``docs/settings.md``): the arguments given here (to
    the constructor, then to :meth:`init_app`), then ``MESHWARE_*`` keys of ``app.config``,
    then ``MESHWARE_*`` environment variables, then the config file, then the defaults.

    Args:
        app: the application, or ``None`` to call :meth:`init_app` later.
        config_file: the YAML config file; by default ``MESHWARE_CONFIG_FILE``.
        environ: the environment to read ``MESHWARE_*`` variables from (``os.environ`` when
            ``None``).
        settings: any setting by name (``service="payments"``, ``cert_dir=...``).

    Raises:
        InvalidSetting: a setting is unknown, missing or invalid (naming it and its source).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self._settings = settings
        self._config_file = config_file
        self._environ = environ
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **settings: Any) -> MeshwareState:
        """Turn the mesh on for ``app``.

        Args:
            app: the Flask application; declare its routes before it serves requests.
            settings: settings for this application only, above the constructor's.

        Returns:
            The application's :class:`MeshwareState`.

        Raises:
            InvalidSetting: a setting is unknown, missing or invalid.
            ConfigurationError: the mesh is already on for ``app``.
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                "the mesh is already on for this application", field="app", value=app
            )
        merged = load_settings(
            {**self._settings, **settings},
            framework=SettingsSource.prefixed(app.config, name="app.config"),
            environ=self._environ,
            config_file=self._config_file,
        )
        stack = build_wsgi_stack(app.wsgi_app, merged.inbound_config(routes=FlaskRoutes(app)))
        app.wsgi_app = stack  # type: ignore[method-assign]
        state = MeshwareState(merged, stack)
        app.extensions[EXTENSION_KEY] = state
        app.before_request(_note_identity)
        # `meshware serve` serves a marked application as it is: it already has its stack.
        setattr(app, "__meshware_stack__", True)  # noqa: B010 - a marker, not a method
        return state

    @staticmethod
    def state(app: Flask | None = None) -> MeshwareState:
        """The :class:`MeshwareState` of ``app`` (the current application by default).

        Raises:
            ConfigurationError: the mesh is not on for the application.
        """
        target = app if app is not None else current_app
        found = target.extensions.get(EXTENSION_KEY)
        if not isinstance(found, MeshwareState):
            raise ConfigurationError(
                "the mesh is not on for this application; call Meshware(app) first",
                field="app",
                value=target,
            )
        return found


def current_identity() -> Identity | None:
    """The verified identity of the caller of the current request, or ``None``.

    Also on ``flask.g.mesh_identity``.
    """
    identity: Identity | None = request.environ.get(IDENTITY_KEY)
    return identity


def client() -> httpx.Client:
    """The current application's mesh client (``app.extensions["meshware"].client``).

    Raises:
        ConfigurationError: the mesh is not on for the current application.
    """
    return Meshware.state().client
