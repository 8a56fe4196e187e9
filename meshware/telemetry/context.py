"""The request id of the inbound request being served, for the outbound calls it makes.

The inbound telemetry shells (ASGI and WSGI) set it around the application call; the outbound
telemetry transport (:mod:`meshware.outbound.transport_telemetry`) copies it into the
``x-request-id`` header of every call made while serving the request, so one id ties the
access-log lines of every hop together, as Envoy's ``x-request-id`` does.

The value lives in a :class:`contextvars.ContextVar`: asyncio tasks and threads started with
:func:`asyncio.to_thread` (or asgiref's ``sync_to_async``) copy it; a plain
:class:`threading.Thread` starts without it unless run through
:func:`contextvars.copy_context`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

__all__ = [
    "current_request_id",
    "request_id_scope",
    "reset_request_id",
    "set_request_id",
]

_request_id: ContextVar[str | None] = ContextVar("meshware_request_id", default=None)


def current_request_id() -> str | None:
    """The ``x-request-id`` of the inbound request being served in this context, or ``None``."""
    return _request_id.get()


def set_request_id(request_id: str | None) -> Token[str | None]:
    """Make ``request_id`` the current request id; returns the token for
    :func:`reset_request_id`.

    Args:
        request_id: the inbound request's id, or ``None`` to clear it.
    """
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Restore the request id that was current before the matching :func:`set_request_id`."""
    _request_id.reset(token)


@contextmanager
def request_id_scope(request_id: str | None) -> Iterator[str | None]:
    """Make ``request_id`` current inside the ``with`` block, then restore the previous one.

    Useful in tests and in workers that serve requests outside the inbound shells.

    Args:
        request_id: the id to set, or ``None`` to run the block without one.

    Yields:
        The id that was set.
    """
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        _request_id.reset(token)
