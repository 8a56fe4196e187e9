"""``python -m sample_services.shop``: the sample mesh, end to end.

Issues certificates, starts every service under ``meshware serve`` (STRICT mTLS, a health
port each), waits for readiness, starts the dashboard, drives traffic from an edge client,
shows the deliberate misuse being refused, and prints what the services' own ``/metrics``
and access logs say. Everything it starts is listed in ``.meshware/shop/pids.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import shutil
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from meshware.config import load_config
from meshware.identity.ca import LocalCA, ServicePaths
from meshware.outbound.call import CALL_KEY
from meshware.outbound.client import OutboundConfig, mesh_client
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.retry import RetryPolicy
from meshware.telemetry.metrics import MeshMetrics
from sample_services.shop import observe
from sample_services.shop.mesh import ADMIN_ISSUER, MESH_FILE, NAMESPACE
from sample_services.shop.processes import (
    RUN_DIR,
    Instance,
    serve_command,
    start,
    stop_all,
    wait_ready,
)

SERVICES = ("users", "catalog", "orders", "payments", "shipping")
IDENTITIES = (*SERVICES, "frontend", "dashboard")
SHOPPERS = ("alice", "bob", "chen", "dana")
SKUS = ("sku-1", "sku-2", "sku-3", "sku-4")
PAYMENTS_FAILURE_RATE = 0.1
EDGE_TIMEOUT = "3S"  # the deadline the edge gives every request (x-meshware-timeout)

APPS = {
    "users": ("sample_services.shop.users:app", "FastAPI"),
    "catalog-v1": ("sample_services.shop.catalog:app", "Flask"),
    "catalog-v2": ("sample_services.shop.catalog:app", "Flask"),
    "orders": ("sample_services.shop.orders:app", "FastAPI"),
    "payments": ("sample_services.shop.payments.wsgi:application", "Django"),
    "shipping": ("sample_services.shop.shipping:app", "Flask"),
}


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def plan_instances() -> list[Instance]:
    ports = iter(free_ports(2 * len(APPS)))
    instances = []
    for name, (app, framework) in APPS.items():
        service, _, version = name.partition("-")
        instances.append(
            Instance(
                name=name,
                service=service,
                app=app,
                framework=framework,
                port=next(ports),
                health_port=next(ports),
                version=version or None,
            )
        )
    return instances


def admin_key(run_dir: Path) -> tuple[Path, str]:
    """A fresh RSA signing key: its JWKS file for users, and an admin token signed with it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="shop-admin-1", alg="RS256", use="sig")
    jwks = run_dir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}))
    now = int(time.time())
    token = jwt.encode(
        {"iss": ADMIN_ISSUER, "sub": "ops-admin", "iat": now, "exp": now + 3600},
        key,
        algorithm="RS256",
        headers={"kid": "shop-admin-1"},
    )
    return jwks, token


def registry_data(instances: list[Instance]) -> dict[str, list[dict[str, Any]]]:
    services: dict[str, list[dict[str, Any]]] = {}
    for instance in instances:
        endpoint: dict[str, Any] = {"address": "127.0.0.1", "port": instance.port}
        endpoint["labels"] = {"version": instance.version or "v1"}
        services.setdefault(instance.service, []).append(endpoint)
    return services


def start_mesh(run_dir: Path, instances: list[Instance], jwks: Path) -> dict[str, Any]:
    cert_dir = run_dir / "certs"
    services = json.dumps(registry_data(instances))
    procs = {}
    for instance in instances:
        env = {
            "MESHWARE_CERT_DIR": str(cert_dir),
            "MESHWARE_SERVICES": services,
            "MESHWARE_VERSION": instance.version or "v1",
            "MESHWARE_EXPLAIN_DENIALS": "true",  # a development mesh: 403s name their rule
            "SHOP_DATA_DIR": str(run_dir / "data" / instance.name),
            "SHOP_JWKS_FILE": str(jwks),
            "SHOP_PAYMENTS_FAILURE_RATE": str(PAYMENTS_FAILURE_RATE),
        }
        cmd = serve_command(instance, cert_dir)
        procs[instance.name] = start(cmd, name=instance.name, run_dir=run_dir, env=env)
    return procs


def start_dashboard(run_dir: Path) -> tuple[int, Any]:
    (port,) = free_ports(1)
    cmd = [
        sys.executable, "-m", "sample_services.shop.dashboard",
        "--run-dir", str(run_dir), "--port", str(port),
    ]  # fmt: skip
    proc = start(cmd, name="dashboard", run_dir=run_dir, env={})
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the dashboard exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    return port, proc
            time.sleep(0.1)
    raise TimeoutError("the dashboard did not start")


# --------------------------------------------------------------------------------- the edge


class Edge:
    """The shop's front end: a mesh client with the ``frontend`` identity, and what it saw."""

    def __init__(self, cert_dir: Path, instances: list[Instance]) -> None:
        config = load_config(MESH_FILE, service="frontend", namespace=NAMESPACE)
        registry = StaticRegistry.from_mapping(
            {"services": {k: {"endpoints": v} for k, v in registry_data(instances).items()}}
        )
        self.metrics = MeshMetrics()
        self.client = mesh_client(
            OutboundConfig(
                service="frontend",
                cert_dir=cert_dir,
                resolver=registry,
                routes=config.routes,
                destinations=config.destination_rules,
                retry=RetryPolicy.from_mapping(
                    {"attempts": 2, "perTryTimeout": "2s", "retryOn": "5xx,reset,connect-failure"}
                ),
                metrics=self.metrics,
            ),
            headers={"x-meshware-timeout": EDGE_TIMEOUT},
        )
        self.orders: Counter[str] = Counter()  # outcome -> count
        self.order_failures: list[str] = []
        self.browse: Counter[str] = Counter()  # status -> count
        self.canary: Counter[str] = Counter()  # subset chosen by weight (no header)
        self.test_user: Counter[str] = Counter()  # subset chosen for x-test-user: true
        self._keys = itertools.count(1)

    async def place_order(self, rng: random.Random) -> None:
        body = {"user": rng.choice(SHOPPERS), "sku": rng.choice(SKUS), "qty": rng.randint(1, 4)}
        key = f"edge-{next(self._keys)}-{rng.getrandbits(32):08x}"
        try:
            response = await self.client.post(
                "http://orders/api/orders", json=body, headers={"idempotency-key": key}
            )
        except httpx.HTTPError as exc:
            self.orders["error"] += 1
            self.order_failures.append(f"{type(exc).__name__}: {exc}")
            return
        if response.status_code == 201:
            self.orders["placed"] += 1
        else:
            self.orders[str(response.status_code)] += 1
            self.order_failures.append(f"{response.status_code}: {response.text[:200]}")

    async def browse_catalog(self, rng: random.Random, shopper: str, test_user: bool) -> None:
        headers = {"x-shop-user": shopper}
        if test_user:
            headers["x-test-user"] = "true"
        path = rng.choice(("/api/products", *(f"/api/products/{sku}" for sku in SKUS)))
        request = self.client.build_request("GET", f"http://catalog{path}", headers=headers)
        try:
            response = await self.client.send(request)
        except httpx.HTTPError:
            self.browse["error"] += 1
            return
        self.browse[str(response.status_code)] += 1
        plan = request.extensions.get(CALL_KEY)
        if plan is not None and plan.subset is not None:
            (self.test_user if test_user else self.canary)[plan.subset] += 1


async def drive(edge: Edge, duration: float, progress: bool) -> None:
    """Traffic for ``duration`` seconds: orders from shoppers, browsing, a tester, a crawler."""
    stop_at = time.monotonic() + duration
    rng = random.Random(7)

    async def orders_loop(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop_at:
            await edge.place_order(local)

    async def browse_loop(seed: int, shopper: str, test_user: bool, pause: float) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop_at:
            await edge.browse_catalog(local, shopper, test_user)
            if pause:
                await asyncio.sleep(pause * local.random() * 2)

    async def show_progress() -> None:
        started = time.monotonic()
        while time.monotonic() < stop_at:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            print(
                f"  [{elapsed:4.0f}s/{duration:.0f}s] orders placed {edge.orders['placed']:5d}"
                f"  catalog reads {sum(edge.browse.values()):6d}"
                f"  (429: {edge.browse['429']})",
                flush=True,
            )

    tasks = [orders_loop(rng.randrange(1 << 30)) for _ in range(6)]
    tasks += [browse_loop(rng.randrange(1 << 30), s, False, 0.02) for s in SHOPPERS for _ in (0, 1)]
    tasks += [browse_loop(rng.randrange(1 << 30), "tester", True, 0.05)]
    tasks += [browse_loop(rng.randrange(1 << 30), "crawler", False, 0.0) for _ in range(6)]
    if progress:
        tasks.append(show_progress())
    await asyncio.gather(*tasks)


# ----------------------------------------------------------------------------- the misuse


def client_for(cert_dir: Path, identity: str | None) -> httpx.Client:
    bundle = cert_dir / "bundle.pem"
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    if identity is not None:
        paths = ServicePaths.under(cert_dir, identity, NAMESPACE)
        ctx.load_cert_chain(paths.cert, paths.key)
    return httpx.Client(verify=ctx, timeout=10)


def misuse(cert_dir: Path, ports: dict[str, int], token: str) -> dict[str, Any]:
    """The calls the mesh must refuse, and one it must let through."""
    found: dict[str, Any] = {}
    with client_for(cert_dir, None) as anonymous:
        try:
            anonymous.get(f"https://127.0.0.1:{ports['payments']}/api/charges/x")
            found["no_certificate"] = {"refused": False, "error": None}
        except httpx.TransportError as exc:
            found["no_certificate"] = {"refused": True, "error": type(exc).__name__}
    with client_for(cert_dir, "frontend") as frontend:
        response = frontend.post(f"https://127.0.0.1:{ports['shipping']}/api/debug/try-charge")
        answer = response.json()
        found["shipping_charge"] = {
            "status": answer["status"],
            "denied": answer["status"] == 403,
            "policy": answer["body"].get("policy"),
            "reason": answer["body"].get("reason"),
            "body": answer["body"],
        }
        admin = f"https://127.0.0.1:{ports['users']}/admin/users"
        without = frontend.get(admin)
        with_token = frontend.get(admin, headers={"authorization": f"Bearer {token}"})
        found["admin_jwt"] = {
            "without_token": without.status_code,
            "with_token": with_token.status_code,
            "users": with_token.json().get("users") if with_token.status_code == 200 else None,
        }
    return found


# ------------------------------------------------------------------------------ the summary


def denial_reasons(run_dir: Path) -> dict[str, str]:
    """The ``authz_reason`` of each denying policy, from the services' JSON access logs."""
    reasons: dict[str, str] = {}
    for log in sorted((run_dir / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"authz":"deny"' not in line.replace(" ", ""):
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line[line.index("{") :])
                policy = entry.get("authz_policy") or "(no ALLOW policy matched)"
                reasons.setdefault(policy, str(entry.get("authz_reason")))
    return reasons


def summarize(
    view: observe.MeshView,
    edge: Edge,
    found: dict[str, Any],
    run_dir: Path,
    instances: list[Instance],
) -> dict[str, Any]:
    canary_total = sum(edge.canary.values())
    reasons = denial_reasons(run_dir)
    shadow = 0
    with client_for(run_dir / "certs", "frontend") as frontend:
        for instance in instances:
            if instance.service == "catalog":
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    url = f"https://127.0.0.1:{instance.port}/api/shadow"
                    shadow += int(frontend.get(url).json()["shadow_requests"])
    return {
        "services": {name: view.services[name].as_dict() for name in sorted(view.services)},
        "edges": {
            f"{source}->{destination}": signals.as_dict()
            for (source, destination), signals in sorted(view.edges.items())
        },
        "reached": sorted(s for s in SERVICES if view.services.get(s, observe.Signals()).requests),
        "versions": {k: {v: int(n) for v, n in vs.items()} for k, vs in view.versions.items()},
        "canary": {
            "calls": canary_total,
            "subsets": dict(edge.canary),
            "v2_share": edge.canary["v2"] / canary_total if canary_total else None,
            "test_user": dict(edge.test_user),
        },
        "mirrored_to_v2": shadow,
        "retries": {k: int(v) for k, v in view.retries.items()},
        "denials": {
            policy: {"count": int(count), "reason": reasons.get(policy)}
            for policy, count in view.denials.items()
        },
        "rate_limited": {k: int(v) for k, v in view.rate_limited.items()},
        "edge": {
            "orders": dict(edge.orders),
            "orders_failed": sum(n for k, n in edge.orders.items() if k != "placed"),
            "order_failures": edge.order_failures[:10],
            "catalog_reads": dict(edge.browse),
        },
        "misuse": found,
    }


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def _ms(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.1f}"


def print_summary(summary: dict[str, Any]) -> None:
    print("\n== per service (as each service counted what it received) ==")
    print(f"{'service':<10} {'requests':>8} {'success':>7} {'p50 ms':>7} {'p99 ms':>7}  403  429")
    for name, s in summary["services"].items():
        print(
            f"{name:<10} {s['requests']:>8} {_pct(s['success_rate']):>7} {_ms(s['p50_ms']):>7}"
            f" {_ms(s['p99_ms']):>7} {s['denied']:>4} {s['rate_limited']:>4}"
        )
    print("\n== per edge (source -> destination) ==")
    for name, s in summary["edges"].items():
        print(
            f"{name:<22} {s['requests']:>7} req  success {_pct(s['success_rate'])}"
            f"  p50 {_ms(s['p50_ms'])} ms  p99 {_ms(s['p99_ms'])} ms"
            f"  403 {s['denied']}  429 {s['rate_limited']}"
        )
    canary = summary["canary"]
    print("\n== catalog canary ==")
    share = canary["v2_share"]
    print(
        f"weighted calls {canary['calls']}: v1 {canary['subsets'].get('v1', 0)}, "
        f"v2 {canary['subsets'].get('v2', 0)} -> v2 share {_pct(share).strip()} (configured 10%)"
    )
    print(f"x-test-user: true -> {canary['test_user']} (all v2 by header match)")
    print(f"received by version (catalog's own metrics): {summary['versions'].get('catalog')}")
    print(f"mirrored copies received by v2 (Host: catalog-shadow): {summary['mirrored_to_v2']}")
    print("\n== resilience ==")
    for destination, count in sorted(summary["retries"].items()):
        print(f"retries absorbed calling {destination}: {count}")
    edge = summary["edge"]
    print(
        f"edge orders: {edge['orders'].get('placed', 0)} placed, "
        f"{edge['orders_failed']} failed (payments fails {PAYMENTS_FAILURE_RATE:.0%} of charges)"
    )
    print("\n== policy ==")
    for policy, denial in sorted(summary["denials"].items()):
        print(f"denied {denial['count']:>4} by {policy}: {denial['reason']}")
    for rule, count in sorted(summary["rate_limited"].items()):
        print(f"rate limited {count:>4} by rule {rule}")
    found = summary["misuse"]
    nocert = found["no_certificate"]
    print("\n== deliberate misuse ==")
    print(
        "no certificate -> payments: "
        + (f"refused ({nocert['error']})" if nocert["refused"] else "ANSWERED (unexpected)")
    )
    charge = found["shipping_charge"]
    print(
        f"shipping -> POST payments/api/charge: {charge['status']} "
        f"policy={charge['policy']} reason={charge['reason']}"
    )
    admin = found["admin_jwt"]
    print(
        f"frontend -> users/admin/users: without a JWT {admin['without_token']}, "
        f"with the admin JWT {admin['with_token']}"
    )


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sample_services.shop",
        description="Run the sample shop mesh, drive traffic, print what the mesh saw.",
    )
    parser.add_argument("command", nargs="?", choices=("run", "stop"), default="run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    parser.add_argument("--quick", action="store_true", help="10 s of traffic (for tests)")
    parser.add_argument("--keep-running", action="store_true", help="stay up until Ctrl-C")
    parser.add_argument("--summary-json", type=Path, help="also write the summary here")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def stopping(run_dir: Path, keep: bool) -> Iterator[None]:
    try:
        yield
        if keep:
            print("\nservices and dashboard keep running; Ctrl-C (or `make demo-stop`) stops them")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    finally:
        stopped = stop_all(run_dir)
        if stopped:
            print(f"\nstopped {len(stopped)} processes: {', '.join(stopped)}")


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    stop_all(run_dir)  # a previous run left running
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    cert_dir = run_dir / "certs"
    ca = LocalCA.init(cert_dir, force=True)
    for identity in IDENTITIES:
        ca.issue(identity)
    print(f"local CA for {ca.trust_domain}, certificates for {', '.join(IDENTITIES)}")
    jwks, token = admin_key(run_dir)
    instances = plan_instances()
    state: dict[str, Any] = {
        "instances": [i.as_dict() for i in instances],
        "cert_dir": str(cert_dir),
    }
    (run_dir / "state.json").write_text(json.dumps(state, indent=2))
    duration = 10.0 if args.quick else args.duration
    with stopping(run_dir, args.keep_running):
        procs = start_mesh(run_dir, instances, jwks)
        for i in instances:
            label = f"{i.name} ({i.framework})"
            print(
                f"  {label:<22} https://127.0.0.1:{i.port}  STRICT mTLS"
                f"  health http://127.0.0.1:{i.health_port}/readyz"
            )
        wait_ready(instances, procs)
        print("all services ready")
        dash_port, _ = start_dashboard(run_dir)
        print(f"dashboard: http://127.0.0.1:{dash_port}/")
        edge = Edge(cert_dir, instances)
        print(f"driving traffic for {duration:.0f}s ...")

        async def traffic() -> None:
            try:
                await drive(edge, duration, progress=True)
            finally:
                await edge.client.aclose()

        asyncio.run(traffic())
        ports = {i.name: i.port for i in instances}
        found = misuse(cert_dir, ports, token)
        time.sleep(0.3)  # let the last access-log lines reach the files
        with observe.scrape_client(cert_dir, "dashboard") as scraper:
            view = observe.scrape(scraper, state["instances"])
        summary = summarize(view, edge, found, run_dir, instances)
        summary["dashboard"] = f"http://127.0.0.1:{dash_port}/"
        print_summary(summary)
        if args.summary_json:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` (the default) or ``stop``."""
    args = parse_args(argv)
    if args.command == "stop":
        stopped = stop_all(args.run_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
