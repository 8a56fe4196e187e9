"""Profile one inbound variant in-process, without a server: per-request cost and a cProfile.

    python -m bench.profile_inbound meshware [N] [--profile]

Calls the ASGI app directly with a prebuilt scope (the same request the wrk benchmark sends),
so the figure is the stack's own cost per request, free of HTTP parsing and sockets.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from typing import Any

import bench.inbound_apps as apps

_NAME, _VALUE = apps.XFCC.split(": ", 1)
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"wrk"),
    (_NAME.encode(), _VALUE.encode()),
]


async def _one(app: Any) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/api/items/1", "raw_path": b"/api/items/1",
        "query_string": b"", "root_path": "", "headers": list(HEADERS),
        "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"unexpected response {sent}")


async def _many(app: Any, n: int) -> None:
    for _ in range(n):
        await _one(app)


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "meshware"
    n = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 5000
    app = getattr(apps, which)
    asyncio.run(_many(app, 200))  # warm up
    start = time.perf_counter()
    asyncio.run(_many(app, n))
    elapsed = time.perf_counter() - start
    print(f"{which}: {elapsed / n * 1e6:.1f} us per request")
    if "--profile" in argv:
        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, _many(app, n))
        pstats.Stats(profiler).sort_stats("cumtime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
