"""A middleware that is sync only, as many third-party ones are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SyncOnlyMiddleware:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        response["x-sync-only"] = "seen"
        return response
