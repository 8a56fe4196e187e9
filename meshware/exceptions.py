"""Every error meshware raises, in one hierarchy.

::

    MeshwareError
    ├── ConfigurationError              a bad setting, policy, file or argument (operator's mistake)
    │   ├── InvalidSpiffeId             a SPIFFE id that breaks a rule of the SPIFFE-ID spec
    │   └── MeshConfigError             every problem found in mesh configuration files (meshware.config)
    ├── IdentityError                   a peer identity could not be established
    │   ├── CertificateRejected         a peer certificate failed verification
    │   ├── InvalidXfcc                 a malformed x-forwarded-client-cert header
    │   └── InvalidToken                a JWT that is present but invalid (meshware.policy.jwt)
    ├── InvalidPath                     a request path refused by normalization (meshware.policy.paths)
    ├── InvalidTimeoutHeader            a malformed x-meshware-timeout header (meshware.outbound.deadline)
    ├── BackendUnavailable              a state backend (Redis) did not answer (meshware.state)
    └── OutboundError                   also an httpx.TransportError (meshware.outbound.errors)
        ├── NoHealthyEndpoint           no endpoint to send to
        ├── CircuitOpen                 the destination's breaker is open
        ├── RetryBudgetExhausted        no retry budget left
        ├── DeadlineExceeded            also an httpx.TimeoutException
        └── PoolOverloaded              connection-pool limits shed the call

Errors carry the facts a person needs to fix the problem: which field, which value,
what was expected. They are raised with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations


class MeshwareError(Exception):
    """Base class of every error meshware raises."""


class ConfigurationError(MeshwareError, ValueError):
    """A setting, policy, file or argument is invalid.

    ``field`` names the setting (a dotted path where nested) and ``value`` the offending
    value, so that the message and programs that catch the error can both point at it.
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        self.field = field
        self.value = value
        self.explanation = message
        """The message without the field's name."""
        if field is not None:
            message = f"{field}: {message}"
        super().__init__(message)

    def moved(self, field: str, value: object = None) -> ConfigurationError:
        """The same problem, said of another field (the setting a user wrote, where this
        error came from a value built from it)."""
        return ConfigurationError(self.explanation, field=field, value=value)


class InvalidSpiffeId(ConfigurationError):
    """A SPIFFE id string breaks a rule of the SPIFFE-ID specification.

    ``rule`` is a short stable name of the broken rule (for example ``"trust-domain-chars"``).
    """

    def __init__(self, value: str, rule: str, detail: str) -> None:
        self.rule = rule
        shown = value if len(value) <= 120 else value[:117] + "..."
        super().__init__(f"invalid SPIFFE id {shown!r}: {detail} [{rule}]", value=value)


class IdentityError(MeshwareError):
    """A peer identity could not be established."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class CertificateRejected(IdentityError):
    """A peer certificate failed verification. ``reason`` is a stable short code."""


class InvalidXfcc(IdentityError):
    """An ``x-forwarded-client-cert`` header is malformed or too large."""
