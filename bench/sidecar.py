"""Service-to-service comparison: no mesh vs meshware vs an HAProxy sidecar pair vs peer
libraries, on the same machine in the same run.

    python -m bench.sidecar [--quick] [--rounds 5] [--rate 100] [--seconds 20]
                            [--wrk-seconds 10] [--connections 16] [--profile-seconds 10]
                            [--json PATH] [--write] [--keep-work]

A client service A answers ``GET /call`` by calling a server service B once; B answers a small
JSON body (:mod:`bench.sidecar_apps`). Four setups run side by side:

1. **plain** — A calls B over plain HTTP with ``httpx.AsyncClient``; B is bare Starlette;
2. **meshware** — B under ``meshware serve`` (STRICT mTLS, identity, an authorization policy
   allowing A, Istio metrics, 1% tracing, access log); A calls through meshware's mesh client
   (mTLS with its own certificate, retries, breaker, client metrics, 1% tracing);
3. **haproxy** — A and B as in (1), each behind an HAProxy sidecar (:mod:`bench.haproxy`):
   A's plaintext call goes to its local HAProxy, which originates mTLS to B's HAProxy, which
   verifies A's certificate, checks A's identity and forwards plaintext to B;
4. **peer** — the same features hand-assembled from peer libraries, over mTLS with uvicorn's
   own TLS options.

Per setup and round: a **fixed-rate** run (an open-loop load generator in its own process,
latency measured from each request's scheduled send time, so a stall is not hidden by the
generator waiting for it — no coordinated omission) with the CPU time of every process of the
setup read from ``/proc`` before and after; and a **closed-loop** run with wrk for the maximum
throughput. Rounds are interleaved over the setups (the order rotates each round); medians and
ranges are reported, and latency added over (1) is taken per round (paired) before the median.
Resident memory is read at the end. Placement on two cores: B and B's sidecar on core 0; A,
A's sidecar and the load generators on core 1.

The load generator runs as ``python -m bench.sidecar loadgen URL --rate R --seconds S``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.haproxy import (
    HAProxy,
    ProxySettings,
    combined_pem,
    haproxy_binary,
    haproxy_version,
    inbound_config,
    outbound_config,
)
from bench.harness import (
    ROOT,
    free_port,
    machine_summary,
    pinned,
    python,
    replace_section,
    stop_group,
    wait_listening,
    wrk,
)
from bench.resources import CpuMeter, cpu_ms_per_1000, rss_bytes
from bench.sidecar_apps import CLIENT, SERVER
from meshware.exceptions import ConfigurationError

SERVER_CORE = 0
CLIENT_CORE = 1
PLACEMENT = (
    "core 0: B and B's sidecar; core 1: A, A's sidecar, the load generator and wrk "
    "(each process pinned with taskset)"
)

SETUPS: dict[str, str] = {
    "plain": "plain HTTP, no mesh",
    "meshware": "meshware on both sides",
    "haproxy": "HAProxy sidecar pair",
    "peer": "peer libraries",
}
"""The setups, in report order; ``plain`` is the baseline the others are compared with."""

ROLES = ("A", "B", "A's sidecar", "B's sidecar")
UVICORN = [
    "--host", "127.0.0.1", "--http", "httptools", "--loop", "auto",
    "--no-access-log", "--no-server-header", "--log-level", "warning",
]  # fmt: skip
"""uvicorn settings of every Python service (``meshware serve`` runs uvicorn the same way:
httptools, the default loop, no uvicorn access log, no server header, default keep-alive)."""

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0)


# --- the load generator (its own process) ----------------------------------------------------


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter, float]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values) / 100.0 - 1e-9)))
    return sorted_values[rank - 1]


async def _generate(
    url: str, *, rate: float, seconds: float, connections: int, timeout: float
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: meshware-bench-loadgen\r\n"
        "Accept: */*\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection(host, port)
        idle.append((reader, writer, loop.time()))
    opened = connections
    latencies: list[float] = []
    service: list[float] = []
    lags: list[float] = []
    statuses: dict[str, int] = {}
    failures: dict[str, int] = {}

    async def take() -> _Conn:
        nonlocal opened
        now = loop.time()
        while idle:
            conn = idle.pop()
            # The server closes keep-alive connections idle for 5 s; never reuse one near it.
            if now - conn[2] < 2.0:
                return conn
            conn[1].close()
        reader, writer = await asyncio.open_connection(host, port)
        opened += 1
        return reader, writer, now

    async def one(scheduled: float) -> None:
        sent = loop.time()
        lags.append(sent - scheduled)
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer, _ = await take()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12].decode()
            lower = head.lower()
            marker = lower.find(b"\r\ncontent-length:")
            if marker < 0:
                raise ValueError("response without content-length")
            end = lower.index(b"\r\n", marker + 2)
            await reader.readexactly(int(lower[marker + 17 : end]))
        except asyncio.CancelledError:
            failures["timeout"] = failures.get("timeout", 0) + 1
            if writer is not None:
                writer.close()
            raise
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            if writer is not None:
                writer.close()
            return
        done = loop.time()
        latencies.append(done - scheduled)
        service.append(done - sent)
        statuses[status] = statuses.get(status, 0) + 1
        if b"\r\nconnection: close" in lower:
            writer.close()
        else:
            idle.append((reader, writer, done))

    total = max(1, round(rate * seconds))
    interval = 1.0 / rate
    pending: set[asyncio.Future[None]] = set()
    start = loop.time() + 0.05
    for index in range(total):
        scheduled = start + index * interval
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(asyncio.wait_for(one(scheduled), timeout))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    elapsed = loop.time() - start
    for _, writer, _ in idle:
        writer.close()
    latencies.sort()
    service.sort()
    lags.sort()
    ok = statuses.get("200", 0)
    return {
        "url": url,
        "rate": rate,
        "requests": total,
        "completed": len(latencies),
        "ok": ok,
        "errors": total - ok,
        "statuses": statuses,
        "failures": failures,
        "duration_s": elapsed,
        "achieved_rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "connections_opened": opened,
        "percentiles_ms": [[q, _percentile(latencies, q) * 1000] for q in PERCENTILES],
        "service_p50_ms": _percentile(service, 50) * 1000,
        "service_p99_ms": _percentile(service, 99) * 1000,
        "lag_p50_ms": _percentile(lags, 50) * 1000,
        "lag_p99_ms": _percentile(lags, 99) * 1000,
    }


def loadgen_main(argv: Sequence[str]) -> int:
    """``python -m bench.sidecar loadgen URL --rate R --seconds S``: one open-loop run; prints
    its result as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m bench.sidecar loadgen")
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=4, help="opened before the run")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    result = asyncio.run(
        _generate(
            args.url,
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
            timeout=args.timeout,
        )
    )
    print(json.dumps(result))
    return 0


@dataclass
class FixedRateRun:
    """One fixed-rate run of one setup.

    Attributes:
        p50_ms, p90_ms, p99_ms, p999_ms, max_ms: latency from the scheduled send time.
        requests: requests sent; errors: those without a ``200`` answer.
        achieved_rate: answers per second.
        lag_p99_ms: how late the generator sent (its own health; included in latency).
        cpu_ms_per_1000: CPU milliseconds per 1000 requests of each process, by role.
        percentiles_ms: ``[percentile, ms]`` pairs of the latency distribution.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    requests: int
    errors: int
    achieved_rate: float
    lag_p99_ms: float
    cpu_ms_per_1000: dict[str, float]
    percentiles_ms: list[list[float]]
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_total(self) -> float:
        """CPU milliseconds per 1000 requests of all the setup's processes together."""
        return sum(self.cpu_ms_per_1000.values())


def fixed_rate(
    url: str, *, rate: float, seconds: float, pids: Mapping[str, int], core: int = CLIENT_CORE
) -> FixedRateRun:
    """One fixed-rate run: the load generator drives ``url`` from its own process.

    Args:
        url: A's ``/call``.
        rate: requests per second.
        seconds: how long to send.
        pids: the processes whose CPU time the run accounts, by role.
        core: the core the load generator is pinned to.

    Raises:
        RuntimeError: the load generator failed.
    """
    cmd = [
        python(), "-m", "bench.sidecar", "loadgen", url,
        "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
    ]  # fmt: skip
    meter = CpuMeter(pids)
    out = subprocess.run(
        pinned(cmd, core),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    cpu = meter.stop()
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr}")
    data = json.loads(out.stdout)
    pct = {q: v for q, v in data["percentiles_ms"]}
    return FixedRateRun(
        p50_ms=pct[50.0],
        p90_ms=pct[90.0],
        p99_ms=pct[99.0],
        p999_ms=pct[99.9],
        max_ms=pct[100.0],
        requests=data["requests"],
        errors=data["errors"],
        achieved_rate=data["achieved_rate"],
        lag_p99_ms=data["lag_p99_ms"],
        cpu_ms_per_1000={
            role: cpu_ms_per_1000(seconds_used, data["requests"])
            for role, seconds_used in cpu.items()
        },
        percentiles_ms=data["percentiles_ms"],
        failures=data["failures"],
    )


@dataclass
class ClosedLoopRun:
    """One wrk run against A: the maximum throughput of the setup."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


# --- the services ------------------------------------------------------------------------------


class Service:
    """A Python service in its own process, pinned to a core, its output in a log file."""

    def __init__(
        self, name: str, cmd: Sequence[str], *, port: int, core: int, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.port = port
        self.core = core
        self.env = dict(env)
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (for :mod:`bench.resources`)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def start(self, log_dir: Path) -> None:
        """Start the process, its output going to ``<log_dir>/<name>.log``."""
        self.log_path = log_dir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            # Output goes to a file, never a pipe nobody reads (the access log would fill it).
            self._proc = subprocess.Popen(
                pinned(self.cmd, self.core),
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_listening(self, timeout: float = 60.0) -> None:
        """Return once the service accepts connections on its port.

        Raises:
            RuntimeError: the process exited (its log's tail is in the message).
            TimeoutError: it did not listen within ``timeout`` seconds.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not started")

        def tail() -> str:
            return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

        wait_listening(self.name, self.port, proc, tail, timeout=timeout)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 15 seconds)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout=15.0)


def _uvicorn(app: str, port: int, *extra: str) -> list[str]:
    return [
        python(),
        "-m",
        "uvicorn",
        f"bench.sidecar_apps:{app}",
        "--port",
        str(port),
        *UVICORN,
        *extra,
    ]


@dataclass
class Certs:
    """The mesh CA and the certificates of A (``orders``), B (``catalog``) and a third
    service that B must refuse (``intruder``), plus HAProxy's combined PEM files."""

    directory: Path
    bundle: Path
    pems: dict[str, Path]

    @classmethod
    def create(cls, directory: Path) -> Certs:
        """Create the CA in ``directory`` and issue the three services' certificates."""
        from meshware.identity.ca import LocalCA

        ca = LocalCA.init(directory)
        pems = {}
        for service in (CLIENT, SERVER, "intruder"):
            pems[service] = combined_pem(ca.issue(service), directory / "haproxy")
        return cls(directory=directory, bundle=directory / "bundle.pem", pems=pems)

    def files(self, service: str) -> tuple[Path, Path]:
        """The certificate and key files of ``service``."""
        base = self.directory / "services" / "default" / service
        return base / "cert.pem", base / "key.pem"


@dataclass
class Deployment:
    """The processes of one setup and where to reach them."""

    setup: str
    entry_url: str
    services: dict[str, Service] = field(default_factory=dict)
    proxies: dict[str, HAProxy] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        """The pid of each running process, by role (A, B, A's sidecar, B's sidecar)."""
        pids = {role: s.pid for role, s in self.services.items()}
        pids.update({role: p.pid for role, p in self.proxies.items()})
        return {role: pids[role] for role in ROLES if role in pids}

    def logs(self) -> dict[str, Path]:
        """The log file of each process, by role."""
        logs = {role: s.log_path for role, s in self.services.items() if s.log_path}
        logs.update({role: p.log_path for role, p in self.proxies.items()})
        return logs


def _deployments(setups: Sequence[str], certs: Certs) -> dict[str, Deployment]:
    env = {"BENCH_CERT_DIR": str(certs.directory)}
    made: dict[str, Deployment] = {}
    for setup in setups:
        a_port, b_port = free_port(), free_port()
        entry = f"http://127.0.0.1:{a_port}/call"
        d = Deployment(setup=setup, entry_url=entry, ports={"A": a_port, "B": b_port})
        if setup == "plain":
            upstream = {"BENCH_UPSTREAM": f"http://127.0.0.1:{b_port}/data"}
            d.services["B"] = Service(
                "plain-B", _uvicorn("server_bare", b_port), port=b_port, core=SERVER_CORE, env=env
            )
            d.services["A"] = Service(
                "plain-A",
                _uvicorn("client_plain", a_port),
                port=a_port,
                core=CLIENT_CORE,
                env={**env, **upstream},
            )
        elif setup == "meshware":
            serve = [
                python(), "-m", "meshware.cli", "serve", "bench.sidecar_apps:server_meshware",
                "--service", SERVER, "--dir", str(certs.directory), "--port", str(b_port),
                "--mtls", "strict", "--log-level", "warning", "--app-dir", str(ROOT),
            ]  # fmt: skip
            d.services["B"] = Service("meshware-B", serve, port=b_port, core=SERVER_CORE, env=env)
            resolver = {"MESHWARE_SERVICE_CATALOG": f"127.0.0.1:{b_port}"}
            d.services["A"] = Service(
                "meshware-A",
                _uvicorn("client_meshware", a_port),
                port=a_port,
                core=CLIENT_CORE,
                env={**env, **resolver},
            )
        elif setup == "haproxy":
            in_port, out_port = free_port(), free_port()
            in_stats, out_stats = free_port(), free_port()
            d.ports.update(
                {
                    "B's sidecar": in_port,
                    "A's sidecar": out_port,
                    "B's sidecar stats": in_stats,
                    "A's sidecar stats": out_stats,
                }
            )
            d.services["B"] = Service(
                "haproxy-B",
                _uvicorn("server_bare", b_port),
                port=b_port,
                core=SERVER_CORE,
                env=env,
            )
            d.services["A"] = Service(
                "haproxy-A",
                _uvicorn("client_plain", a_port),
                port=a_port,
                core=CLIENT_CORE,
                env={**env, "BENCH_UPSTREAM": f"http://127.0.0.1:{out_port}/data"},
            )
            settings = ProxySettings()
            proxy_dir = certs.directory / "haproxy"
            d.proxies["B's sidecar"] = HAProxy(
                inbound_config(
                    listen_port=in_port,
                    app_port=b_port,
                    server_pem=certs.pems[SERVER],
                    ca_file=certs.bundle,
                    allowed_callers=[CLIENT],
                    stats_port=in_stats,
                    settings=settings,
                ),
                name="haproxy-inbound",
                port=in_port,
                core=SERVER_CORE,
                directory=proxy_dir,
            )
            d.proxies["A's sidecar"] = HAProxy(
                outbound_config(
                    listen_port=out_port,
                    upstream_port=in_port,
                    upstream_name=SERVER,
                    client_pem=certs.pems[CLIENT],
                    ca_file=certs.bundle,
                    stats_port=out_stats,
                    settings=settings,
                ),
                name="haproxy-outbound",
                port=out_port,
                core=CLIENT_CORE,
                directory=proxy_dir,
            )
        elif setup == "peer":
            cert, key = certs.files(SERVER)
            tls = [
                "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                "--ssl-ca-certs", str(certs.bundle), "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED)),
            ]  # fmt: skip
            d.services["B"] = Service(
                "peer-B",
                _uvicorn("server_peer", b_port, *tls),
                port=b_port,
                core=SERVER_CORE,
                env=env,
            )
            d.services["A"] = Service(
                "peer-A",
                _uvicorn("client_peer", a_port),
                port=a_port,
                core=CLIENT_CORE,
                env={**env, "BENCH_UPSTREAM": f"https://127.0.0.1:{b_port}/data"},
            )
        else:
            raise ValueError(f"unknown setup {setup!r}; expected one of {', '.join(SETUPS)}")
        made[setup] = d
    return made


@contextlib.contextmanager
def running(setups: Sequence[str], certs: Certs, log_dir: Path) -> Iterator[dict[str, Deployment]]:
    """Start every process of ``setups`` (in parallel), wait until all listen, stop them at
    the end of the block."""
    deployments = _deployments(setups, certs)
    started: list[Service | HAProxy] = []
    try:
        for d in deployments.values():
            for service in d.services.values():
                service.start(log_dir)
                started.append(service)
        for d in deployments.values():
            for proxy in d.proxies.values():
                proxy.start()
                started.append(proxy)
            for service in d.services.values():
                service.wait_listening()
        yield deployments
    finally:
        for item in reversed(started):
            item.stop()


# --- what each setup really does ---------------------------------------------------------------


def _client(certs: Certs | None, service: str | None) -> Any:
    import httpx

    if certs is None:
        return httpx.Client(timeout=5.0)
    context = ssl.create_default_context(cafile=str(certs.bundle))
    if service is not None:
        cert, key = certs.files(service)
        context.load_cert_chain(str(cert), str(key))
    return httpx.Client(verify=context, timeout=5.0)


def _get(certs: Certs | None, service: str | None, url: str) -> tuple[int | None, str]:
    """Status and body of one GET, or ``(None, error)`` when the connection was refused."""
    import httpx

    with _client(certs, service) as client:
        try:
            response = client.get(url)
        except httpx.TransportError as exc:
            return None, type(exc).__name__
        return response.status_code, response.text


def feature_checks(d: Deployment, certs: Certs) -> dict[str, bool]:
    """Check, with real requests, what the setup enforces and records.

    Keys: ``no_cert_refused`` (B's mesh port refuses a caller without a certificate),
    ``other_identity_refused`` (it refuses a valid certificate of another service),
    ``caller_allowed`` (it answers A's certificate), ``server_metrics``, ``client_metrics``
    and ``access_log`` (the setup recorded the requests of the run). Absent keys do not apply
    (the plain setup has no mesh port).
    """
    checks: dict[str, bool] = {}
    if d.setup == "plain":
        return checks
    mesh_port = d.ports["B's sidecar"] if d.setup == "haproxy" else d.ports["B"]
    mesh_url = f"https://127.0.0.1:{mesh_port}/data"
    status, _ = _get(certs, None, mesh_url)
    checks["no_cert_refused"] = status is None
    status, _ = _get(certs, "intruder", mesh_url)
    checks["other_identity_refused"] = status == 403
    status, _ = _get(certs, CLIENT, mesh_url)
    checks["caller_allowed"] = status == 200
    if d.setup == "haproxy":
        bodies = [
            _get(None, None, f"http://127.0.0.1:{d.ports[role + ' stats']}/metrics")[1]
            for role in ("B's sidecar", "A's sidecar")
        ]
        checks["server_metrics"] = "haproxy_frontend_http_requests_total" in bodies[0]
        checks["client_metrics"] = "haproxy_backend_http_requests_total" in bodies[1]
        checks["access_log"] = all(
            path.exists() and path.stat().st_size > 0
            for role, path in d.logs().items()
            if "sidecar" in role
        )
        return checks
    metrics_url = mesh_url.replace("/data", "/metrics")
    _, server_metrics = _get(certs, CLIENT, metrics_url)
    _, client_metrics = _get(None, None, d.entry_url.replace("/call", "/stats"))
    if d.setup == "meshware":
        checks["server_metrics"] = "istio_requests_total{" in server_metrics
        checks["client_metrics"] = 'reporter="source"' in client_metrics
        log = d.logs().get("B")
        deadline = time.monotonic() + 3.0  # the access log file is flushed every second
        while not (found := bool(log and '"status":200' in log.read_text(errors="replace"))):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        checks["access_log"] = found
    else:
        checks["server_metrics"] = "http_requests_total" in server_metrics
        checks["client_metrics"] = "client_requests_total" in client_metrics
        checks["access_log"] = False  # uvicorn's access log is off for every setup
    return checks


# --- profiling -----------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    """py-spy (``$PY_SPY``, next to this Python, or on ``PATH``), or ``None``."""
    explicit = os.environ.get("PY_SPY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


# py-spy names files relative to their sys.path entry ("meshware/inbound/asgi/authz.py",
# "asyncio/base_events.py", "ssl.py"), so the needles carry no leading slash.
_CATEGORIES = (
    ("meshware/", "meshware"),
    ("bench/", "the app itself"),
    ("ssl.py", "TLS (ssl, asyncio sslproto)"),
    ("sslproto.py", "TLS (ssl, asyncio sslproto)"),
    ("httpcore/", "httpx + httpcore + anyio"),
    ("httpx/", "httpx + httpcore + anyio"),
    ("anyio/", "httpx + httpcore + anyio"),
    ("h11/", "httpx + httpcore + anyio"),
    ("importlib", "import machinery"),
    ("uvicorn/", "uvicorn + httptools"),
    ("httptools/", "uvicorn + httptools"),
    ("starlette/", "starlette"),
    ("opentelemetry/", "opentelemetry"),
    ("prometheus_client/", "prometheus-client"),
    ("logging/", "logging + json"),
    ("json/", "logging + json"),
    ("asyncio/", "asyncio event loop"),
)


def _category(frame: str) -> str:
    for needle, name in _CATEGORIES:
        if needle in frame:
            return name
    return "other"


def summarize_profile(raw: str, top: int = 12) -> dict[str, Any]:
    """Summarize py-spy's raw (collapsed-stack) output.

    Samples whose innermost frame is the event loop waiting in ``select`` are idle (py-spy
    cannot always tell when it does not stop the process); ``idle`` is their share of all
    samples. Of the other (busy) samples: the share whose innermost frame lies in each
    category (self time) and the top functions by self time. Lines that are not
    ``frame;frame;... count`` are ignored.

    Inclusive time is not given: under ``meshware serve`` every request runs inside a meshware
    frame (the wrapper that attaches the TLS extension), so it would say nothing.
    """
    total = idle = 0
    by_category: dict[str, int] = {}
    by_function: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not (count_text.isascii() and count_text.isdigit()):
            continue
        count = int(count_text)
        leaf = stack.rsplit(";", 1)[-1]
        total += count
        if "selectors.py" in leaf:
            idle += count
            continue
        category = _category(leaf)
        by_category[category] = by_category.get(category, 0) + count
        name, _, location = leaf.partition(" (")
        filename = location.rsplit(":", 1)[0].rsplit("/", 1)[-1]
        key = f"{name} ({filename})" if filename else name
        by_function[key] = by_function.get(key, 0) + count
    busy = total - idle
    result: dict[str, Any] = {
        "samples": total,
        "busy": busy,
        "idle": 100.0 * idle / total if total else 0.0,
        "categories": {},
        "functions": [],
    }
    if busy:
        result["categories"] = {
            name: 100.0 * n / busy
            for name, n in sorted(by_category.items(), key=lambda item: -item[1])
        }
        result["functions"] = [
            [name, 100.0 * n / busy]
            for name, n in sorted(by_function.items(), key=lambda item: -item[1])[:top]
        ]
    return result


def profile(
    d: Deployment, *, seconds: float, connections: int, out_dir: Path
) -> dict[str, Any] | None:
    """Profile A and B of ``d`` with py-spy (sampling, non-blocking) while wrk loads A."""
    binary = py_spy_binary()
    if binary is None:
        return None
    samplers = {}
    for role in ("A", "B"):
        target = out_dir / f"profile-{d.setup}-{role}.txt"
        cmd = [
            binary, "record", "--pid", str(d.services[role].pid), "--duration",
            str(max(1, round(seconds))), "--rate", "250", "--format", "raw", "--nonblocking",
            "--output", str(target),
        ]  # fmt: skip
        samplers[role] = (
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
            target,
        )
    time.sleep(0.5)  # py-spy attaches
    wrk(d.entry_url, seconds=seconds, connections=connections)
    summaries: dict[str, Any] = {}
    for role, (proc, target) in samplers.items():
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not target.exists():
            summaries[role] = {"error": err.decode(errors="replace")[-500:]}
            continue
        summaries[role] = summarize_profile(target.read_text())
    return {"setup": d.setup, "seconds": seconds, "summaries": summaries}


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What one run of the comparison does.

    Attributes:
        rounds: interleaved rounds over the setups.
        rate: the fixed request rate, requests per second (below every setup's saturation).
        seconds: the length of each fixed-rate run.
        wrk_seconds: the length of each closed-loop run.
        connections: wrk's connections in the closed-loop runs.
        warmup_seconds: an unrecorded fixed-rate run per setup first, and a closed-loop one
            when at least 1 second.
        profile_seconds: how long to profile the meshware services; 0 for no profile.
        setups: the setups to run (``plain`` always included).
    """

    rounds: int = 5
    rate: float = 100.0
    seconds: float = 20.0
    wrk_seconds: float = 10.0
    connections: int = 16
    warmup_seconds: float = 3.0
    profile_seconds: float = 10.0
    setups: tuple[str, ...] = tuple(SETUPS)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigurationError("expected at least 1", field="rounds", value=self.rounds)
        for name in ("rate", "seconds"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    "expected a positive number", field=name, value=getattr(self, name)
                )
        if self.wrk_seconds < 1:
            raise ConfigurationError(
                "expected at least 1 (wrk runs whole seconds)",
                field="wrk_seconds",
                value=self.wrk_seconds,
            )
        if self.connections < 1:
            raise ConfigurationError(
                "expected at least 1", field="connections", value=self.connections
            )
        if self.warmup_seconds <= 0 or self.profile_seconds < 0:
            raise ConfigurationError(
                "expected a positive warm-up and a profile of 0 seconds or more",
                field="warmup_seconds" if self.warmup_seconds <= 0 else "profile_seconds",
                value=self.warmup_seconds if self.warmup_seconds <= 0 else self.profile_seconds,
            )
        unknown = sorted(set(self.setups) - set(SETUPS))
        if unknown:
            raise ConfigurationError(
                f"expected setups from {', '.join(SETUPS)}", field="setups", value=unknown
            )

    def command(self) -> str:
        """The ``python -m bench.sidecar`` command line that runs these options."""
        return (
            f"python -m bench.sidecar --rounds {self.rounds} --rate {self.rate:g} "
            f"--seconds {self.seconds:g} --wrk-seconds {self.wrk_seconds:g} "
            f"--connections {self.connections}"
        )


QUICK = Options(
    rounds=1, rate=100.0, seconds=2.0, wrk_seconds=1.0, warmup_seconds=0.5, profile_seconds=1.0
)
"""A smoke run: every setup, every measurement, one short round (not a measurement)."""


def _median_range(values: Sequence[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


def missing_tools(setups: Sequence[str]) -> list[str]:
    """The programs and libraries the setups need that are not installed."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk (scripts/system-deps.sh)")
    if "haproxy" in setups and haproxy_binary() is None:
        missing.append("haproxy (scripts/system-deps.sh)")
    if "peer" in setups:
        import importlib.util

        for module in (
            "tenacity",
            "purgatory",
            "slowapi",
            "prometheus_fastapi_instrumentator",
            "opentelemetry.instrumentation.httpx",
        ):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                missing.append(f"{module} (pip install -e '.[bench]')")
    return missing


def run(options: Options, *, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the comparison; return its results as a JSON-ready dict (see :func:`render`).

    Args:
        options: what to run.
        work_dir: where certificates, logs and raw profiles go (kept); a temporary directory,
            removed at the end, when ``None``.

    Raises:
        RuntimeError: a program or library the setups need is missing, a service did not
            start, or the load generator failed.
    """
    if work_dir is not None:
        return _run(options, work_dir)
    work = Path(tempfile.mkdtemp(prefix="meshware-sidecar-"))
    try:
        return _run(options, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(options: Options, work: Path) -> dict[str, Any]:
    setups = ["plain", *[s for s in options.setups if s != "plain"]]
    missing = missing_tools(setups)
    if missing:
        raise RuntimeError("missing: " + "; ".join(missing))
    work.mkdir(parents=True, exist_ok=True)
    certs = Certs.create(work / "certs")
    started = dt.datetime.now(dt.timezone.utc)
    fixed: dict[str, list[FixedRateRun]] = {s: [] for s in setups}
    closed: dict[str, list[ClosedLoopRun]] = {s: [] for s in setups}
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_summary(),
        "haproxy": haproxy_version(),
        "command": options.command(),
        "options": asdict(options),
        "placement": PLACEMENT,
        "work_dir": str(work),
    }
    with running(setups, certs, work) as deployments:
        for setup in setups:
            d = deployments[setup]
            fixed_rate(
                d.entry_url, rate=options.rate, seconds=options.warmup_seconds, pids=d.pids()
            )
            if options.warmup_seconds >= 1:  # wrk runs whole seconds; a smoke run skips it
                wrk(d.entry_url, seconds=options.warmup_seconds, connections=options.connections)
        for round_no in range(options.rounds):
            shift = round_no % len(setups)
            for setup in setups[shift:] + setups[:shift]:
                d = deployments[setup]
                run_fixed = fixed_rate(
                    d.entry_url, rate=options.rate, seconds=options.seconds, pids=d.pids()
                )
                fixed[setup].append(run_fixed)
                w = wrk(d.entry_url, seconds=options.wrk_seconds, connections=options.connections)
                closed[setup].append(ClosedLoopRun(w.rps, w.p50_ms, w.p99_ms, w.errors))
                print(
                    f"round {round_no + 1}/{options.rounds} {setup:<9} "
                    f"{options.rate:g}/s: p50 {run_fixed.p50_ms:6.2f} ms p99 "
                    f"{run_fixed.p99_ms:6.2f} ms cpu {run_fixed.cpu_total:6.0f} ms/1000 "
                    f"errors {run_fixed.errors} | max {w.rps:7.0f} req/s errors {w.errors}",
                    flush=True,
                )
        rss = {
            setup: {role: rss_bytes(pid) / 2**20 for role, pid in d.pids().items()}
            for setup, d in deployments.items()
        }
        checks = {setup: feature_checks(d, certs) for setup, d in deployments.items()}
        profiles = []
        if options.profile_seconds > 0 and "meshware" in deployments:
            result = profile(
                deployments["meshware"],
                seconds=options.profile_seconds,
                connections=options.connections,
                out_dir=work,
            )
            if result is not None:
                profiles.append(result)
    results["setups"] = {
        setup: {
            "description": SETUPS[setup],
            "fixed_rate": [asdict(r) for r in fixed[setup]],
            "closed_loop": [asdict(r) for r in closed[setup]],
            "rss_mb": rss[setup],
            "checks": checks[setup],
        }
        for setup in setups
    }
    results["profiles"] = profiles
    results["summary"] = summarize(results)
    return results


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Medians and ranges per setup, the paired added latency over plain, and the targets."""
    setups = results["setups"]
    base = setups["plain"]
    summary: dict[str, Any] = {}
    for setup, data in setups.items():
        runs = data["fixed_rate"]
        rounds = len(runs)
        row: dict[str, Any] = {
            "p50_ms": _median_range([r["p50_ms"] for r in runs]),
            "p99_ms": _median_range([r["p99_ms"] for r in runs]),
            "added_p50_ms": _median_range(
                [runs[i]["p50_ms"] - base["fixed_rate"][i]["p50_ms"] for i in range(rounds)]
            ),
            "added_p99_ms": _median_range(
                [runs[i]["p99_ms"] - base["fixed_rate"][i]["p99_ms"] for i in range(rounds)]
            ),
            "max_rps": _median_range([r["rps"] for r in data["closed_loop"]]),
            "cpu_ms_per_1000": {
                role: _median_range([r["cpu_ms_per_1000"][role] for r in runs])
                for role in runs[0]["cpu_ms_per_1000"]
            },
            "cpu_total": _median_range([sum(r["cpu_ms_per_1000"].values()) for r in runs]),
            "errors": sum(r["errors"] for r in runs)
            + sum(r["errors"] for r in data["closed_loop"]),
            "rss_mb": data["rss_mb"],
            "rss_added_mb": {
                role: mb - base["rss_mb"].get(role, 0.0) for role, mb in data["rss_mb"].items()
            },
        }
        summary[setup] = row
    for row in summary.values():
        row["added_cpu_total"] = row["cpu_total"][0] - summary["plain"]["cpu_total"][0]
        row["utilization"] = results["options"]["rate"] / row["max_rps"][0]
    targets: dict[str, Any] = {}
    if "meshware" in summary and "haproxy" in summary:
        mesh, pair = summary["meshware"], summary["haproxy"]
        met = []
        for q in ("p50", "p99"):
            ours, theirs = mesh[f"added_{q}_ms"][0], pair[f"added_{q}_ms"][0]
            # A pair that added nothing measurable leaves no ratio; then only adding nothing
            # meets the target.
            targets[f"latency_ratio_{q}"] = ours / theirs if theirs > 0 else None
            met.append(ours <= 0.5 * theirs if theirs > 0 else ours <= 0)
        targets["latency_met"] = all(met)
    if "meshware" in summary:
        added = summary["meshware"]["rss_added_mb"]
        targets["memory_added_mb"] = {role: added[role] for role in ("A", "B")}
        targets["memory_met"] = all(v <= 15.0 for v in targets["memory_added_mb"].values())
    summary["targets"] = targets
    return summary


# --- the report ----------------------------------------------------------------------------------


def _mr(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    median, lo, hi = values
    return f"{fmt.format(median)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _signed(values: Sequence[float]) -> str:
    median, lo, hi = values
    return f"{median:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _ratio(value: float | None) -> str:
    if value is None:
        return "no ratio: the pair added nothing measurable in this run"
    return f"ratio {value:.2f}"


_CHECK_NAMES = {
    "no_cert_refused": "caller without a certificate refused",
    "other_identity_refused": "another service's valid certificate refused (403)",
    "caller_allowed": "A's certificate allowed",
    "server_metrics": "B-side metrics recorded",
    "client_metrics": "A-side (client) metrics recorded",
    "access_log": "access log written",
}


def render(results: Mapping[str, Any]) -> dict[str, str]:
    """The Markdown sections of docs/benchmarks.md this run fills: ``sidecar`` (the tables)
    and ``sidecar-profile`` (where meshware's time goes)."""
    summary = results["summary"]
    opts = results["options"]
    setups = list(results["setups"])
    lines = [
        f"Run of **{results['date']}**. Machine: {results['machine']}; {results['haproxy']}.",
        "",
        f"Command: `{results['command']}` — {opts['rounds']} interleaved rounds (the order "
        f"rotates each round), medians with [min, max] ranges. Fixed-rate runs: "
        f"{opts['rate']:g} requests/s for {opts['seconds']:g} s from the open-loop generator; "
        f"closed-loop runs: wrk, {opts['connections']} connections, {opts['wrk_seconds']:g} s. "
        f"Placement: {results['placement']}.",
        "",
        f"**Latency at {opts['rate']:g} requests/s** (from the scheduled send time; added = "
        "this setup minus plain in the same round, then the median):",
        "",
        "| setup | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for setup in setups:
        row = summary[setup]
        lines.append(
            f"| {SETUPS[setup]} | {_mr(row['p50_ms'])} | {_mr(row['p99_ms'])} | "
            f"{_signed(row['added_p50_ms'])} | {_signed(row['added_p99_ms'])} | {row['errors']} |"
        )
    lines += [
        "",
        "**Maximum throughput** (wrk, closed loop, against A's `/call`; each request is one "
        "call from A to B):",
        "",
        f"| setup | req/s | x plain | load at {opts['rate']:g}/s |",
        "|---|---|---|---|",
    ]
    plain_rps = summary["plain"]["max_rps"][0]
    for setup in setups:
        row = summary[setup]
        lines.append(
            f"| {SETUPS[setup]} | {_mr(row['max_rps'], '{:.0f}')} | "
            f"{row['max_rps'][0] / plain_rps:.2f} | {100 * row['utilization']:.0f}% |"
        )
    busy = [SETUPS[s] for s in setups if summary[s]["utilization"] > 0.5]
    if busy:
        lines += [
            "",
            f"Warning: {opts['rate']:g} requests/s is more than half the maximum throughput of "
            f"{', '.join(busy)}; queueing inflates its fixed-rate latency. Lower `--rate`.",
        ]
    lines += [
        "",
        "**CPU per 1000 requests** (ms of CPU, user + system from `/proc/<pid>/stat`, over the "
        "fixed-rate runs; Istio reports its sidecar at 0.35 vCPU per 1000 requests/s, i.e. "
        "350 ms per 1000 requests per proxy):",
        "",
        "| setup | A | B | A's sidecar | B's sidecar | total | added over plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        row = summary[setup]
        cells = [
            _mr(row["cpu_ms_per_1000"][role], "{:.0f}") if role in row["cpu_ms_per_1000"] else "—"
            for role in ROLES
        ]
        lines.append(
            f"| {SETUPS[setup]} | {' | '.join(cells)} | {_mr(row['cpu_total'], '{:.0f}')} | "
            f"{row['added_cpu_total']:+.0f} |"
        )
    lines += [
        "",
        "**Resident memory** (`VmRSS` of `/proc/<pid>/status` after the runs, MB; added = "
        "over the plain service in the same role, plus the service's sidecar):",
        "",
        "| setup | A | B | A's sidecar | B's sidecar | added to A | added to B |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup in setups:
        row = summary[setup]
        rss = row["rss_mb"]
        cells = [f"{rss[role]:.1f}" if role in rss else "—" for role in ROLES]
        added = row["rss_added_mb"]
        if setup == "haproxy":
            add_a = added["A"] + rss.get("A's sidecar", 0.0)
            add_b = added["B"] + rss.get("B's sidecar", 0.0)
        else:
            add_a, add_b = added["A"], added["B"]
        lines.append(f"| {SETUPS[setup]} | {' | '.join(cells)} | {add_a:+.1f} | {add_b:+.1f} |")
    lines += ["", "**What each setup enforced and recorded**, checked with real requests after "
              "the runs (✔ yes, ✘ no):", ""]  # fmt: skip
    checked = [s for s in setups if results["setups"][s]["checks"]]
    lines.append("| check | " + " | ".join(SETUPS[s] for s in checked) + " |")
    lines.append("|---|" + "---|" * len(checked))
    for key, name in _CHECK_NAMES.items():
        cells = []
        for setup in checked:
            value = results["setups"][setup]["checks"].get(key)
            cells.append("—" if value is None else ("✔" if value else "✘"))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    targets = summary["targets"]
    lines += ["", "**Targets**:", ""]
    if "latency_ratio_p50" in targets:
        mesh, pair = summary["meshware"], summary["haproxy"]
        verdict = "met" if targets["latency_met"] else "**missed**"
        lines.append(
            f"- meshware's added latency ≤ 0.5 x the HAProxy pair's: {verdict} — p50 "
            f"{mesh['added_p50_ms'][0]:+.2f} ms vs {pair['added_p50_ms'][0]:+.2f} ms "
            f"({_ratio(targets['latency_ratio_p50'])}), p99 {mesh['added_p99_ms'][0]:+.2f} ms "
            f"vs {pair['added_p99_ms'][0]:+.2f} ms ({_ratio(targets['latency_ratio_p99'])})."
        )
    if "memory_added_mb" in targets:
        verdict = "met" if targets["memory_met"] else "**missed**"
        mem = targets["memory_added_mb"]
        lines.append(
            f"- meshware's added memory per service ≤ 15 MB: {verdict} — A {mem['A']:+.1f} MB, "
            f"B {mem['B']:+.1f} MB."
        )
    sections = {"sidecar": "\n".join(lines)}
    sections["sidecar-profile"] = _render_profiles(results.get("profiles") or [])
    return sections


def _render_profiles(profiles: Sequence[Mapping[str, Any]]) -> str:
    if not profiles:
        return "(no profile: py-spy is not installed)"
    out: list[str] = []
    for prof in profiles:
        for role, data in prof["summaries"].items():
            name = "A (the mesh client)" if role == "A" else "B (meshware serve)"
            if "error" in data:
                out += [f"{name}: py-spy failed: `{data['error'].strip()}`", ""]
                continue
            out += [
                f"**{name}**: {data['samples']} samples over {prof['seconds']:g} s under wrk "
                f"(closed loop), {data['idle']:.0f}% of them idle (waiting in `select`); "
                f"shares of the {data['busy']} busy ones:",
                "",
                "| where the innermost frame is | share of busy samples |",
                "|---|---|",
            ]
            out += [f"| {cat} | {share:.1f}% |" for cat, share in data["categories"].items()]
            out += ["", "| top functions (self time) | share |", "|---|---|"]
            out += [f"| `{fn}` | {share:.1f}% |" for fn, share in data["functions"]]
            out.append("")
    return "\n".join(out)


def write(results: Mapping[str, Any], path: Path | None = None) -> None:
    """Write this run's sections into docs/benchmarks.md."""
    target = path or ROOT / "docs" / "benchmarks.md"
    for name, body in render(results).items():
        replace_section(target, name, body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.sidecar``: run the comparison and print its tables (see the module
    docs); ``python -m bench.sidecar loadgen ...`` runs the load generator instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--rate", type=float, help="fixed request rate, per second")
    parser.add_argument("--seconds", type=float, help="length of each fixed-rate run")
    parser.add_argument("--wrk-seconds", type=float, help="length of each closed-loop run")
    parser.add_argument("--connections", type=int, help="wrk connections")
    parser.add_argument("--profile-seconds", type=float, help="0: no profile")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--keep-work", action="store_true", help="keep logs and profiles")
    args = parser.parse_args(argv)
    options = QUICK if args.quick else Options()
    overrides = {
        name: getattr(args, name)
        for name in ("rounds", "rate", "seconds", "wrk_seconds", "connections", "profile_seconds")
        if getattr(args, name) is not None
    }
    if overrides:
        options = Options(**{**asdict(options), **overrides})
    work = Path(tempfile.mkdtemp(prefix="meshware-sidecar-"))
    try:
        results = run(options, work_dir=work)
    finally:
        if args.keep_work:
            print(f"logs and profiles kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sections = render(results)
    print()
    print(sections["sidecar"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.write:
        write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
