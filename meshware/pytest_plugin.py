"""pytest fixtures for testing services that run meshware.

Installed with meshware and registered automatically (a ``pytest11`` entry point named
``meshware.pytest_plugin``; disable it with ``-p no:meshware.pytest_plugin``). The fixtures:

- ``mesh_ca`` (session): the process-wide :class:`~meshware.testing.MeshTestCA`; give its
  ``bundle_path`` to the service under test as its trust bundle.
- ``mesh_peer``: a function that names a caller, ``mesh_peer("orders", namespace="shop")``,
  in ``mesh_ca``'s trust domain (see :func:`~meshware.testing.as_peer`).
- ``mesh_jwt`` (session): the process-wide :class:`~meshware.testing.JwtIssuer`; its
  ``rule`` goes into ``jwt_rules``, its ``token(claims)`` into requests.
- ``mesh_clock``: a fresh :class:`~meshware.testing.FakeClock` at 0.

This module imports nothing heavy until a fixture is used, so that it costs nothing in test
runs that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from meshware.identity.spiffe import SpiffeId
    from meshware.testing import FakeClock, JwtIssuer, MeshPeer, MeshTestCA

__all__ = ["mesh_ca", "mesh_clock", "mesh_jwt", "mesh_peer"]


@pytest.fixture(scope="session")
def mesh_ca() -> MeshTestCA:
    """The process-wide test CA (trust domain ``cluster.local``)."""
    from meshware.testing import default_ca

    return default_ca()


@pytest.fixture
def mesh_peer(mesh_ca: MeshTestCA) -> Callable[..., MeshPeer]:
    """A function ``(who, namespace="default") -> MeshPeer`` naming a caller in the test
    CA's trust domain."""
    from meshware.testing import as_peer

    def make(who: str | SpiffeId | MeshPeer, namespace: str = "default") -> MeshPeer:
        return as_peer(who, namespace=namespace, trust_domain=mesh_ca.trust_domain)

    return make


@pytest.fixture(scope="session")
def mesh_jwt() -> JwtIssuer:
    """The process-wide JWT issuer (``https://issuer.meshware.test``)."""
    from meshware.testing import default_issuer

    return default_issuer()


@pytest.fixture
def mesh_clock() -> FakeClock:
    """A new fake monotonic clock reading 0.0."""
    from meshware.testing import FakeClock

    return FakeClock()
