"""meshware: an in-process service mesh for Python web services."""

from meshware.__about__ import __version__
from meshware.exceptions import (
    CertificateRejected,
    ConfigurationError,
    IdentityError,
    InvalidSpiffeId,
    InvalidXfcc,
    MeshwareError,
)

__all__ = [
    "CertificateRejected",
    "ConfigurationError",
    "IdentityError",
    "InvalidSpiffeId",
    "InvalidXfcc",
    "MeshwareError",
    "__version__",
]
