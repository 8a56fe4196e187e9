"""Server integration tests share the real redis-server fixture (see tests/redis_server.py)."""

from tests.redis_server import redis_server, redis_url

__all__ = ["redis_server", "redis_url"]
