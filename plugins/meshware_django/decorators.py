"""``authorize`` and ``rate_limit`` for Django views, ``method_decorator`` included.

They are :func:`meshware.policy.authz.authorize` and :func:`meshware.policy.ratelimit.rate_limit`,
and work on function views, class-based views and their methods the same way. One thing is
added: each declaration is also kept under an attribute of its own. Django's
``method_decorator`` hands a decorator a stand-in function and copies the stand-in's
attributes onto the method with ``dict.update``, so of several declarations given that way
(stacked, or in a list) only the last would otherwise survive.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Final, ParamSpec, TypeVar

from meshware.policy.authz import authorize as _authorize
from meshware.policy.authz import route_policies
from meshware.policy.ratelimit import rate_limit as _rate_limit
from meshware.policy.ratelimit import route_rate_limits

__all__ = ["KEPT_PREFIX", "authorize", "kept_declarations", "rate_limit"]

KEPT_PREFIX: Final = "__meshware_kept_"
"""The prefix of the attributes each declaration is also kept under."""

_P = ParamSpec("_P")
_T = TypeVar("_T")
_serial = itertools.count()


def _keeping(
    core: Callable[_P, Callable[[Any], Any]], read: Callable[[object], tuple[Any, ...]]
) -> Callable[_P, Callable[[_T], _T]]:
    def decorator(*args: _P.args, **kwargs: _P.kwargs) -> Callable[[_T], _T]:
        attach = core(*args, **kwargs)

        def keep(obj: _T) -> _T:
            attach(obj)
            # The core decorators put the newest declaration first.
            setattr(obj, f"{KEPT_PREFIX}{next(_serial)}__", read(obj)[0])
            return obj

        return keep

    decorator.__doc__ = core.__doc__
    decorator.__name__ = core.__name__
    decorator.__qualname__ = core.__qualname__
    return decorator


authorize = _keeping(_authorize, route_policies)
""":func:`meshware.policy.authz.authorize`, surviving ``method_decorator``."""

rate_limit = _keeping(_rate_limit, route_rate_limits)
""":func:`meshware.policy.ratelimit.rate_limit`, surviving ``method_decorator``."""


def kept_declarations(obj: object) -> list[Any]:
    """The declarations kept on ``obj`` by this module's decorators, oldest first."""
    attributes = getattr(obj, "__dict__", None)
    if not attributes:
        return []
    kept = [(name, value) for name, value in attributes.items() if name.startswith(KEPT_PREFIX)]
    kept.sort(key=lambda item: int(item[0][len(KEPT_PREFIX) : -2]))
    return [value for _, value in kept]
