"""Redis-backed state tests run against a real redis-server (see tests/redis_server.py)."""

from tests.redis_server import redis_control, redis_server, redis_url

__all__ = ["redis_control", "redis_server", "redis_url"]
