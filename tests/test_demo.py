"""``make demo`` end to end: the mini mesh starts, calls go both ways with verified identities."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.integration


def test_mini_mesh_demo_shows_verified_callers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sample_services.mini_mesh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "frontend -> orders  orders saw verified caller cluster.local/ns/default/sa/frontend" in out
    )
    assert (
        "frontend -> users   users saw verified caller cluster.local/ns/default/sa/frontend" in out
    )
    assert (
        "orders   -> users   server proved spiffe://cluster.local/ns/default/sa/users; "
        "it saw verified caller cluster.local/ns/default/sa/orders"
    ) in out
    assert (
        "users    -> orders  server proved spiffe://cluster.local/ns/default/sa/orders; "
        "it saw verified caller cluster.local/ns/default/sa/users"
    ) in out
    assert "no cert  -> orders  refused:" in out
    assert "both services stopped." in out
