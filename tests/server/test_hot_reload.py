"""Live configuration changes on real servers, and /meshz on the admin port.

``meshware serve --config FILE`` on uvicorn and on gunicorn: a rewritten AuthorizationPolicy
takes effect without a restart; a broken file is refused (the last good configuration keeps
deciding, the error is on /meshz and in the log). A mesh client built with the reloadable
route table follows a VirtualService weight change to real servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshware.config.reload import ConfigWatcher
from meshware.exceptions import ConfigurationError
from meshware.introspection import Introspection, outbound_state_of
from meshware.outbound.client import mesh_sync_client
from meshware.outbound.reloadable import OutboundReloader, ReloadableRouteTable
from meshware.server.serve import ServeOptions
from tests.servers import MESHWARE, ROOT, client_context, free_port, issue_pki, meshware_serve

pytestmark = pytest.mark.integration

APPS = {
    "uvicorn": "tests.server.echo_apps:asgi_app",
    "gunicorn": "tests.server.echo_apps:wsgi_app",
}

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-callers}}
spec:
  selector:
    matchLabels: {{app: catalog}}
  rules:
  - from:
    - source: {{principals: [{principals}]}}
    to:
    - operation: {{paths: ["/api/*"]}}
"""
USERS = POLICY.format(principals='"cluster.local/ns/default/sa/users"')
USERS_AND_SHIPPING = POLICY.format(
    principals='"cluster.local/ns/default/sa/users", "cluster.local/ns/default/sa/shipping"'
)
BROKEN = USERS.replace("principals:", "principalz:")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "catalog", "users", "shipping")


def caller(pki: Path, service: str) -> httpx.Client:
    return httpx.Client(verify=client_context(pki, service), timeout=10)


def rewrite(path: Path, text: str) -> None:
    # Written aside and renamed into place, as operators (and kubelet) replace files; with a
    # later mtime than before even within one clock tick, so the change is always seen.
    before = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(text)
    stamp = max(before + 1_000_000_000, time.time_ns())
    os.utime(aside, ns=(stamp, stamp))
    os.replace(aside, path)


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for a real server to pick a change up (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the server did not pick the change up in time")
        time.sleep(0.05)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_policy_change_without_a_restart(pki: Path, server: str, tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    rewrite(mesh, USERS)
    log = tmp_path / "server.log"
    admin = free_port()
    args = ["--config", str(mesh), "--reload-interval", "0.1", "--admin-port", str(admin)]
    with (
        meshware_serve(APPS[server], service="catalog", cert_dir=pki, args=args, log=log) as port,
        caller(pki, "users") as users,
        caller(pki, "shipping") as shipping,
        httpx.Client(timeout=10) as plain,
    ):
        url = f"https://127.0.0.1:{port}/api/items/1"
        meshz_url = f"http://127.0.0.1:{admin}/meshz"
        assert users.get(url).status_code == 200
        assert users.get(url).text == "cluster.local/ns/default/sa/users https"
        denied = shipping.get(url)
        assert denied.status_code == 403
        assert denied.json()["detail"] == "RBAC: access denied"
        first = plain.get(meshz_url).json()
        assert first["service"] == "catalog"
        assert first["config"]["generation"] == 1
        assert first["config"]["files"][0]["path"] == str(mesh)
        [cert] = first["tls"]
        assert cert["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/catalog"
        assert cert["seconds_left"] > 0

        # Allow shipping too: the next requests from shipping succeed, no restart.
        rewrite(mesh, USERS_AND_SHIPPING)
        eventually(lambda: shipping.get(url).status_code == 200)
        assert shipping.get(url).text == "cluster.local/ns/default/sa/shipping https"
        assert users.get(url).status_code == 200
        after = plain.get(meshz_url).json()["config"]
        assert after["generation"] == 2
        assert after["last_reload"]["outcome"] == "ok"
        assert after["digest"] != first["config"]["digest"]

        # A broken file: refused; the last good configuration keeps deciding.
        rewrite(mesh, BROKEN)
        eventually(
            lambda: plain.get(meshz_url).json()["config"]["last_reload"]["outcome"] == "error"
        )
        assert shipping.get(url).status_code == 200
        assert users.get(url).status_code == 200
        assert users.get(f"https://127.0.0.1:{port}/other").status_code == 403
        broken = plain.get(meshz_url).json()["config"]
        assert broken["generation"] == 2
        assert broken["digest"] == after["digest"]
        [problem] = broken["last_reload"]["problems"]
        assert "spec.rules[0].from[0].source.principalz: unknown field" in problem
        assert broken["reloads"] == {"ok": 1, "error": 1}

        # The admin listener serves /meshz only, in plaintext, on loopback.
        assert plain.get(f"http://127.0.0.1:{admin}/api/items/1").status_code == 404
        assert users.get(f"https://127.0.0.1:{port}/meshz").status_code == 403
    text = log.read_text()
    assert "mesh configuration reload refused" in text
    assert "principalz: unknown field" in text


# -- outbound: a VirtualService weight change followed by a mesh client -------------------


class _Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def named_server(name: str) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


ROUTING = """\
apiVersion: meshware.dev/v1alpha1
kind: ServiceRegistry
metadata: {{name: endpoints}}
spec:
  services:
    inventory:
      endpoints:
      - {{address: 127.0.0.1, port: {v1}, labels: {{version: v1}}}}
      - {{address: 127.0.0.1, port: {v2}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: inventory}}
spec:
  host: inventory
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: inventory}}
spec:
  hosts: [inventory]
  http:
  - route:
    - destination: {{host: inventory, subset: v1}}
      weight: {w1}
    - destination: {{host: inventory, subset: v2}}
      weight: {w2}
"""


def test_weight_change_is_followed_by_a_mesh_client(tmp_path: Path) -> None:
    with named_server("v1") as v1, named_server("v2") as v2:
        mesh = tmp_path / "routing.yaml"
        rewrite(mesh, ROUTING.format(v1=v1, v2=v2, w1=100, w2=0))
        watcher = ConfigWatcher(mesh, service="catalog")
        routes = ReloadableRouteTable(watcher.config.routes)
        client = mesh_sync_client(watcher.config.outbound_config(routes=routes, breaker=None))
        state = outbound_state_of(client)
        assert state is not None
        watcher.subscribe(OutboundReloader(routes=routes, states=[state]).prepare)
        meshz = Introspection(watcher=watcher)
        meshz.add_outbound(state, name="catalog", resolver=watcher.config.registry)
        with client:
            assert {client.get("http://inventory/stock").text for _ in range(20)} == {"v1"}
            rewrite(mesh, ROUTING.format(v1=v1, v2=v2, w1=0, w2=100))
            assert watcher.reload_if_changed() == "ok"
            assert {client.get("http://inventory/stock").text for _ in range(20)} == {"v2"}
            document = json.loads(meshz.render())
        clusters = {c["subset"]: c for c in document["outbound"][0]["clusters"]}
        assert set(clusters) == {"v1", "v2"}
        assert [e["address"] for e in clusters["v2"]["endpoints"]] == [f"127.0.0.1:{v2}"]
        assert clusters["v2"]["endpoints"][0]["healthy"] is True
        assert document["config"]["summary"]["virtual_services"] == [
            {"name": "inventory", "hosts": ["inventory"]}
        ]


PERMISSIVE = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec:
  mtls: {mode: PERMISSIVE}
"""


def test_the_config_sets_the_mtls_mode_unless_mtls_is_given(pki: Path, tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    rewrite(mesh, PERMISSIVE)
    app = APPS["uvicorn"]
    with (
        meshware_serve(app, service="catalog", cert_dir=pki, args=["--config", str(mesh)]) as port,
        httpx.Client(timeout=10) as plain,
    ):
        response = plain.get(f"http://127.0.0.1:{port}/api/items/1")
    assert response.status_code == 200
    assert response.text == "anonymous http"
    args = ["--config", str(mesh), "--mtls", "strict"]
    with (
        meshware_serve(app, service="catalog", cert_dir=pki, args=args) as port,
        httpx.Client(timeout=10) as plain,
        pytest.raises(httpx.TransportError),
    ):
        plain.get(f"http://127.0.0.1:{port}/api/items/1")


def test_a_broken_config_stops_the_start(pki: Path, tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    rewrite(mesh, BROKEN)
    result = subprocess.run(
        [
            *MESHWARE,
            *("serve", APPS["uvicorn"], "--service", "catalog", "--dir", str(pki)),
            *("--port", str(free_port()), "--app-dir", str(ROOT), "--config", str(mesh)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"meshware: error: {mesh}: document 1 (AuthorizationPolicy")
    assert "principalz: unknown field" in result.stderr


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"admin_port": 8443}, "admin_port"),
        ({"admin_port": 9000, "health_port": 9000}, "admin_port"),
        ({"admin_port": 70000}, "admin_port"),
        ({"reload_interval": 0.0}, "reload_interval"),
    ],
)
def test_serve_options_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ServeOptions(app="m:app", service="catalog", **kwargs)
    assert info.value.field == field
