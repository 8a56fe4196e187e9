"""System checks: ``manage.py check`` names every meshware misconfiguration, with a stable id.

=================  ===========================================================================
id                 problem
=================  ===========================================================================
``meshware.E001``  no service name (``MESHWARE["SERVICE"]`` or ``MESHWARE_SERVICE``)
``meshware.E002``  ``MeshwareMiddleware`` is not in ``MIDDLEWARE``
``meshware.E003``  ``MeshwareMiddleware`` is not the first entry of ``MIDDLEWARE``
``meshware.E004``  an invalid authorization policy (``POLICIES``)
``meshware.E005``  an invalid rate limit (``RATE_LIMIT``)
``meshware.E006``  an unknown setting (a typo in a ``MESHWARE`` key or ``MESHWARE_*`` variable)
``meshware.E007``  the certificate directory or trust bundle is missing (``CERT_DIR``,
                   ``BUNDLE``)
``meshware.E008``  any other invalid setting value
``meshware.E009``  ``MESHWARE`` is not a dict
``meshware.E010``  a view's ``@authorize`` / ``@rate_limit`` declarations cannot join the
                   service-wide ones
=================  ===========================================================================

Every message names the setting as its source spells it (``MESHWARE["RATE_LIMIT"]``,
``MESHWARE_RATE_LIMIT``) and the source.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from django.conf import settings  # type: ignore[import-untyped]
from django.core.checks import CheckMessage, Error  # type: ignore[import-untyped]

from meshware.exceptions import ConfigurationError
from meshware.settings import InvalidSetting
from meshware.settings import check_settings as _check
from meshware_django.conf import MIDDLEWARE_PATH, SETTING, DjangoMesh, settings_source

__all__ = [
    "E001",
    "E002",
    "E003",
    "E004",
    "E005",
    "E006",
    "E007",
    "E008",
    "E009",
    "E010",
    "check_middleware",
    "check_settings",
    "check_views",
]

E001: Final = "meshware.E001"
E002: Final = "meshware.E002"
E003: Final = "meshware.E003"
E004: Final = "meshware.E004"
E005: Final = "meshware.E005"
E006: Final = "meshware.E006"
E007: Final = "meshware.E007"
E008: Final = "meshware.E008"
E009: Final = "meshware.E009"
E010: Final = "meshware.E010"

_HINTS: Final = {
    E001: 'Set MESHWARE["SERVICE"] (or the MESHWARE_SERVICE environment variable).',
    E004: "Policies follow Istio's AuthorizationPolicy: name, action, rules[].from/to/when.",
    E005: "Give a rate such as '100/second burst 20', or a mapping with rules (see "
    "docs/settings.md).",
    E006: "See docs/settings.md for the settings meshware knows.",
    E007: "Create it with 'meshware ca init' and 'meshware cert issue <service>'.",
}
_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _id(problem: InvalidSetting) -> str:
    if problem.problem == "missing":
        return E001
    if problem.problem == "unknown":
        return E006
    return {
        "policies": E004,
        "rate_limit": E005,
        "cert_dir": E007,
        "bundle": E007,
    }.get(problem.key or "", E008)


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """``MESHWARE``, the ``MESHWARE_*`` variables and the config file, merged: one error per
    problem (E001, E004 to E009)."""
    raw = getattr(settings, SETTING, None)
    if raw is not None and not isinstance(raw, Mapping):
        return [
            Error(
                f"MESHWARE must be a dict of settings, not {type(raw).__name__}.",
                hint='Write MESHWARE = {"SERVICE": "orders", ...}.',
                obj=SETTING,
                id=E009,
            )
        ]
    try:
        problems = _check(framework=settings_source())
    except InvalidSetting as exc:  # pragma: no cover - settings_source() only fails on non-dicts
        problems = [exc]
    messages: list[CheckMessage] = []
    for problem in problems:
        check_id = _id(problem)
        messages.append(Error(str(problem), hint=_HINTS.get(check_id), obj=SETTING, id=check_id))
    return messages


def check_middleware(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """``MeshwareMiddleware`` is in ``MIDDLEWARE`` (E002), first (E003)."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    if MIDDLEWARE_PATH not in middleware:
        return [
            Error(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: no view policy or rate limit is applied.",
                hint=f"Add {MIDDLEWARE_PATH!r} as the first entry of MIDDLEWARE.",
                obj="MIDDLEWARE",
                id=E002,
            )
        ]
    index = middleware.index(MIDDLEWARE_PATH)
    if index != 0:
        before = ", ".join(middleware[:index])
        return [
            Error(
                f"{MIDDLEWARE_PATH} must be the first entry of MIDDLEWARE; it comes after "
                f"{before}, which would run before the caller is authorized and measured.",
                hint=f"Move {MIDDLEWARE_PATH!r} to the top of MIDDLEWARE.",
                obj="MIDDLEWARE",
                id=E003,
            )
        ]
    return []


def _views(patterns: Sequence[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    from django.urls import URLPattern, URLResolver  # type: ignore[import-untyped]

    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _views(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def check_views(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Every view's declarations join the service-wide policies (E010). Skipped while the
    settings themselves are invalid (``check_settings`` reports that)."""
    from django.urls import get_resolver

    from meshware.settings import load_settings

    try:
        mesh = DjangoMesh(load_settings(framework=settings_source()))
    except ConfigurationError:
        return []
    messages: list[CheckMessage] = []
    for route, view in _views(get_resolver().url_patterns, "/"):
        for method in _METHODS:
            try:
                mesh.view_plan(view, method)
            except ConfigurationError as exc:
                messages.append(
                    Error(
                        f"the view of {route!r} ({method}): {exc}",
                        hint="Name the view's @authorize policies apart from the "
                        "service-wide POLICIES.",
                        obj=view,
                        id=E010,
                    )
                )
                break
    return messages
