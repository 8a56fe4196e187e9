"""meshware for Flask: one line turns the mesh on, both ways.

::

    from flask import Flask
    from meshware_flask import Meshware, authorize, current_identity, rate_limit

    app = Flask(__name__)
    Meshware(app, service="payments")

Flask is imported when the extension is first used, so that importing this package never
requires it. See ``docs/flask.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meshware.policy.authz import authorize
from meshware.policy.ratelimit import rate_limit

if TYPE_CHECKING:
    from meshware_flask.extension import (
        EXTENSION_KEY,
        Meshware,
        MeshwareState,
        client,
        current_identity,
    )

__all__ = [
    "EXTENSION_KEY",
    "Meshware",
    "MeshwareState",
    "authorize",
    "client",
    "current_identity",
    "rate_limit",
]

_LAZY = frozenset({"EXTENSION_KEY", "Meshware", "MeshwareState", "client", "current_identity"})


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'meshware_flask' has no attribute {name!r}")
    value = getattr(importlib.import_module("meshware_flask.extension"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
