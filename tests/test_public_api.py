"""The flat public API: every name in ``meshware.__all__`` resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import meshware


def test_every_public_name_resolves() -> None:
    for name in meshware.__all__:
        assert getattr(meshware, name) is not None, name


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        meshware.does_not_exist  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "does_not_exist" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_cheap() -> None:
    """``import meshware`` loads neither the telemetry stack nor the servers."""
    code = (
        "import sys, meshware; "
        "print(any(m.startswith(('opentelemetry', 'uvicorn', 'gunicorn', 'prometheus_client'))"
        " for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
