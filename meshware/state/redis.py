"""``redis://``: rate-limit buckets in Redis, shared by every replica of a service.

Each decision is exactly one round trip: a Lua script (loaded once, then called by its SHA1
with EVALSHA) charges every bucket of the request atomically on the server. The script
reads the time from the Redis server (``TIME``), so replicas whose clocks disagree still
agree on every bucket, and it stores each bucket with an expiry (``SET ... PX``) at the moment
the bucket would be full again, so idle buckets vanish from Redis by themselves.

Errors (refused connections, timeouts, a read-only replica, ...) surface as
:class:`~meshware.state.base.BackendUnavailable`; ``RateLimiter`` applies its failure mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from meshware.exceptions import ConfigurationError
from meshware.policy.ratelimit import GcraResult, Rate, check_cost
from meshware.state.base import Acquisition, BackendUnavailable

__all__ = ["DEFAULT_TIMEOUT", "GCRA_SCRIPT", "RedisBackend"]

DEFAULT_TIMEOUT = 0.05
"""Default connect and read timeout, in seconds (``?timeout=`` in the URL)."""

EPOCH = 1704067200
"""Bucket times in Redis are seconds since this Unix time (2024-01-01T00:00:00Z): small
numbers keep sub-microsecond precision in the script's doubles."""

GCRA_SCRIPT = """
-- meshware GCRA, the same arithmetic as meshware.policy.ratelimit.gcra.
-- KEYS[i]: a bucket. ARGV[3i-2], ARGV[3i-1], ARGV[3i]: its emission interval (seconds),
-- burst and cost. Returns five values per bucket: allowed (1/0), TAT, remaining,
-- reset_after and retry_after (floats as strings: Lua numbers would be truncated).
local EPOCH = 1704067200
local TOLERANCE = 1e-4
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = (tonumber(t[1]) - EPOCH) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local j = 3 * (i - 1)
  local interval = tonumber(ARGV[j + 1])
  local burst = tonumber(ARGV[j + 2])
  local cost = tonumber(ARGV[j + 3])
  local tat = tonumber(redis.call('GET', key))
  local base = now
  if tat and tat > now then base = tat end
  local backlog = (base - now) / interval
  if backlog + cost <= burst + TOLERANCE then
    local new_tat = base + cost * interval
    redis.call('SET', key, string.format('%.17g', new_tat),
               'PX', math.ceil((new_tat - now) * 1000))
    out[#out + 1] = 1
    out[#out + 1] = string.format('%.17g', new_tat)
    out[#out + 1] = math.floor(burst - backlog - cost + TOLERANCE)
    out[#out + 1] = string.format('%.17g', new_tat - now)
    out[#out + 1] = '0'
  else
    local remaining = math.floor(burst - backlog + TOLERANCE)
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = 0
    out[#out + 1] = string.format('%.17g', base)
    out[#out + 1] = remaining
    out[#out + 1] = string.format('%.17g', base - now)
    out[#out + 1] = string.format('%.17g', (backlog + cost - burst) * interval)
  end
end
return out
"""

GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode("utf-8")).hexdigest()

# redis-py URL options passed through; "timeout" is ours.
_PASS_THROUGH = frozenset(
    {
        "db",
        "max_connections",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
_SCHEMES = frozenset({"redis", "rediss", "unix"})
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def _public_url(parts: SplitResult) -> str:
    """The URL without credentials or query, for messages and logs."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def _results(raw: Sequence[Any]) -> list[GcraResult]:
    return [
        GcraResult(
            raw[i] == 1,
            float(raw[i + 1]),
            int(raw[i + 2]),
            float(raw[i + 3]),
            float(raw[i + 4]),
        )
        for i in range(0, len(raw), 5)
    ]


class RedisBackend:
    """Buckets in Redis, shared by every process that uses the same URL and key prefix.

    A sync client serves :meth:`acquire` / :meth:`acquire_many` (WSGI threads share its
    connection pool) and an asyncio client serves the ``*_async`` methods; each connects on
    first use. A broken connection is retried once at once on a fresh one (so a Redis that
    restarted is used again by the next request); timeouts are never retried, so a slow or
    absent Redis costs at most one timeout per decision and the limiter's failure mode
    decides.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/to/redis.sock``. Query options: ``timeout`` (seconds, for connect
            and for each reply; default 0.05) and redis-py's ``db``, ``max_connections``,
            ``client_name``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_ca_path``,
            ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``.
        timeout: the default timeout when the URL has none.

    Raises:
        ConfigurationError: the URL is malformed or has an unknown option; ``field`` is
            ``"backend"``.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid Redis URL: {exc}", field="backend", value=url
            ) from exc
        if parts.scheme not in _SCHEMES:
            raise ConfigurationError(
                "expected a redis://, rediss:// or unix:// URL", field="backend", value=url
            )
        if parts.scheme != "unix" and parts.path not in ("", "/"):
            db = parts.path[1:]
            if not (db.isascii() and db.isdigit() and len(db) <= 5):
                raise ConfigurationError(
                    f"expected a database number after the host ('/0'), got {parts.path!r}",
                    field="backend",
                    value=url,
                )
        query = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "timeout":
                timeout = self._timeout(value, url)
            elif name in _PASS_THROUGH:
                query.append((name, value))
            else:
                raise ConfigurationError(
                    f"unknown Redis URL option {name!r}; expected timeout or one of "
                    + ", ".join(sorted(_PASS_THROUGH)),
                    field="backend",
                    value=url,
                )
        self._timeout(timeout, url)
        self.url = _public_url(parts)
        """The URL without credentials or options (used in messages)."""
        self.timeout = float(timeout)
        """The connect and reply timeout, in seconds."""
        # Not urlunsplit: it turns "unix:///path" into "unix:/path".
        base = url.split("?", 1)[0].split("#", 1)[0]
        self._client_url = f"{base}?{urlencode(query)}" if query else base
        self._options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": 0,
        }
        try:
            self._sync: redis.Redis = redis.Redis.from_url(
                self._client_url,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                **self._options,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid Redis URL: {exc}", field="backend", value=url
            ) from exc
        self._async: redis.asyncio.Redis | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _timeout(value: object, url: str) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 < seconds <= 60:
            raise ConfigurationError(
                f"expected a timeout of more than 0 and at most 60 seconds, got {value!r}",
                field="backend",
                value=url,
            )
        return seconds

    def _arguments(self, requests: Sequence[Acquisition]) -> list[Any]:
        keys: list[Any] = []
        args: list[Any] = []
        for key, rate, cost in requests:
            if cost < 1 or cost > rate.burst:
                check_cost(rate, cost)
            keys.append(key)
            args.append(rate.emission_interval)
            args.append(rate.burst)
            args.append(cost)
        return [len(keys), *keys, *args]

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        detail = str(exc) or type(exc).__name__
        return BackendUnavailable(f"{type(exc).__name__}: {detail}", backend=self.url)

    def acquire(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """Charge one bucket; ``now`` is ignored (the Redis server's clock decides)."""
        return self.acquire_many(((key, rate, cost),), now)[0]

    async def acquire_async(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """The awaitable twin of :meth:`acquire`."""
        return (await self.acquire_many_async(((key, rate, cost),), now))[0]

    def acquire_many(self, requests: Sequence[Acquisition], now: float) -> list[GcraResult]:
        """Charge several buckets in one round trip; ``now`` is ignored.

        Raises:
            BackendUnavailable: Redis could not be reached, timed out or returned an error.
        """
        arguments = self._arguments(requests)
        client = self._sync
        try:
            try:
                raw = client.evalsha(GCRA_SHA, *arguments)
            except NoScriptError:
                # Redis restarted or its script cache was flushed: EVAL runs and re-caches.
                raw = client.eval(GCRA_SCRIPT, *arguments)
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc
        return _results(raw)

    async def acquire_many_async(
        self, requests: Sequence[Acquisition], now: float
    ) -> list[GcraResult]:
        """The awaitable twin of :meth:`acquire_many`."""
        arguments = self._arguments(requests)
        client = self._async_client()
        try:
            try:
                raw = await client.evalsha(GCRA_SHA, *arguments)
            except NoScriptError:
                raw = await client.eval(GCRA_SCRIPT, *arguments)
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc
        return _results(raw)

    def _async_client(self) -> redis.asyncio.Redis:
        # asyncio connections belong to the loop that opened them.
        loop = asyncio.get_running_loop()
        client = self._async
        if client is None or self._async_loop is not loop:
            client = redis.asyncio.Redis.from_url(
                self._client_url,
                retry=redis.asyncio.retry.Retry(
                    NoBackoff(), 1, supported_errors=(RedisConnectionError,)
                ),
                **self._options,
            )
            self._async = client
            self._async_loop = loop
        return client

    def close(self) -> None:
        """Close the sync client's connections (the asyncio client needs :meth:`aclose`)."""
        self._sync.close()

    async def aclose(self) -> None:
        """Close both clients' connections; call it from the loop that used the backend."""
        client, self._async, self._async_loop = self._async, None, None
        if client is not None:
            await client.aclose()
        self._sync.close()
