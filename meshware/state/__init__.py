"""State backends: where rate-limit buckets live.

``backend_from_url`` picks one by URL:

- ``memory://`` (optionally ``memory://?max_keys=100000``): this process only;
  :class:`~meshware.state.memory.MemoryBackend`.
- ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path``: shared by every
  replica; :class:`~meshware.state.redis.RedisBackend`.

Every backend implements :class:`~meshware.state.base.RateLimitBackend` and raises
:class:`~meshware.state.base.BackendUnavailable` when it cannot answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from meshware.exceptions import ConfigurationError
from meshware.state.base import Acquisition, BackendUnavailable, RateLimitBackend

if TYPE_CHECKING:
    from meshware.state.memory import MemoryBackend
    from meshware.state.redis import RedisBackend

__all__ = [
    "Acquisition",
    "BackendUnavailable",
    "MemoryBackend",
    "RateLimitBackend",
    "RedisBackend",
    "backend_from_url",
]


def backend_from_url(url: str) -> RateLimitBackend:
    """Create the backend a URL names.

    Args:
        url: ``memory://`` (``?max_keys=N`` bounds the buckets kept), or a Redis URL:
            ``redis://host:port/db``, ``rediss://host:port/db``, ``unix:///path``, with
            ``?timeout=<seconds>`` for the socket timeouts (default 0.05).

    Returns:
        A new backend; nothing is connected until the first request.

    Raises:
        ConfigurationError: the scheme is unknown or an option is invalid; ``field`` is
            ``"backend"``.
    """
    if not isinstance(url, str):
        raise ConfigurationError("expected a backend URL string", field="backend", value=url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"invalid URL: {exc}", field="backend", value=url) from exc
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from meshware.state.memory import MemoryBackend

        if parts.netloc or parts.path:
            raise ConfigurationError(
                "expected 'memory://' with nothing but an optional '?max_keys=N'",
                field="backend",
                value=url,
            )
        options: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if not (
                name == "max_keys"
                and value.isascii()
                and value.isdigit()
                and len(value) <= 12
                and int(value) > 0
            ):
                raise ConfigurationError(
                    "expected 'memory://' with nothing but an optional '?max_keys=N' "
                    "(N a positive integer)",
                    field="backend",
                    value=url,
                )
            options["max_keys"] = int(value)
        return MemoryBackend(**options)
    if scheme in ("redis", "rediss", "unix"):
        from meshware.state.redis import RedisBackend

        return RedisBackend(url)
    raise ConfigurationError(
        "expected a backend URL 'memory://', 'redis://host:port/db', 'rediss://host:port/db' "
        "or 'unix:///path'",
        field="backend",
        value=url,
    )


def __getattr__(name: str) -> Any:
    # The backends load on demand: importing redis costs time that memory:// users need not pay.
    if name == "MemoryBackend":
        from meshware.state.memory import MemoryBackend

        return MemoryBackend
    if name == "RedisBackend":
        from meshware.state.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
