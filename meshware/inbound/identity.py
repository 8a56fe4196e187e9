"""What the identity shells share: turning a resolution into a response or a record."""

from __future__ import annotations

from meshware.exceptions import InvalidXfcc
from meshware.identity.resolve import Resolution
from meshware.inbound.responses import json_body


def refusal(resolution: Resolution) -> tuple[int, bytes] | None:
    """The (status, body) to answer with when the resolution refuses the request."""
    error = resolution.error
    if error is None:
        return None
    if isinstance(error, InvalidXfcc):
        return 400, json_body(400, "bad_request", str(error), reason=error.reason)
    return 403, json_body(403, "forbidden", f"peer identity refused: {error}", reason=error.reason)


def missing_identity_body() -> bytes:
    return json_body(403, "forbidden", "a verified peer identity (mTLS) is required")
