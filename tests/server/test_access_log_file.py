"""``meshware serve --access-log-file``: lines straight to a file, from every worker, whole."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from meshware.identity.ca import ServicePaths
from tests.servers import MESHWARE, ROOT, issue_pki, meshware_serve

pytestmark = pytest.mark.integration

APPS = {"uvicorn": "tests.server.echo_apps:asgi_app", "gunicorn": "tests.server.echo_apps:wsgi_app"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "orders", "users")


def lines_of(path: Path, count: int, timeout: float = 15.0) -> list[dict[str, object]]:
    """The file's JSON lines once there are ``count`` (the flusher writes them within a
    second), or what there is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in text.splitlines()]
        time.sleep(0.05)


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", "1"), ("gunicorn", "3")])
def test_every_request_reaches_the_file_once(
    pki: Path, tmp_path: Path, server: str, workers: str
) -> None:
    access = tmp_path / "access.log"
    serve_log = tmp_path / "serve.log"
    args = ["--access-log-file", str(access), "--workers", workers]
    ctx = ssl.create_default_context(cafile=str(pki / "bundle.pem"))
    users = ServicePaths.under(pki, "users", "default")
    ctx.load_cert_chain(users.cert, users.key)
    with meshware_serve(
        APPS[server], service="orders", cert_dir=pki, args=args, log=serve_log
    ) as port:
        sent = []
        with httpx.Client(verify=ctx, timeout=10) as client:
            for n in range(60):
                request_id = f"file-{server}-{n}"
                response = client.get(
                    f"https://127.0.0.1:{port}/item/{n}", headers={"x-request-id": request_id}
                )
                assert response.status_code == 200
                sent.append(request_id)
        lines = lines_of(access, len(sent))
    assert sorted(str(line["request_id"]) for line in lines) == sorted(sent)
    assert {line["source_principal"] for line in lines} == {"cluster.local/ns/default/sa/users"}
    # The lines went to the file, not to the server's output.
    assert "file-" not in serve_log.read_text()


def test_an_unwritable_file_stops_startup(pki: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    result = subprocess.run(
        [
            *MESHWARE, "serve", APPS["gunicorn"], "--service", "orders", "--dir", str(pki),
            "--app-dir", str(ROOT), "--port", "1", "--access-log-file", str(missing),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"access_log_file: cannot open {missing} for appending: No such file or directory"
        in result.stderr
    )
