"""HAProxy as a sidecar pair standing in for Envoy: configuration files and process control.

A *sidecar pair* is two HAProxy processes, one beside each service:

- the **outbound** sidecar of the client listens in plaintext on loopback, where the client
  sends its calls, and originates mTLS to the server's sidecar with the client's certificate,
  verifying the server's certificate against the mesh CA and its DNS name
  (``verify required``, ``ca-file``, ``verifyhost``); it retries failed connections and
  ``503`` answers (``retry-on``), as Envoy's default retry policy does;
- the **inbound** sidecar of the server terminates mTLS, requires and verifies the client
  certificate against the mesh CA (``verify required``, ``ca-file``), refuses (``403``) every
  caller whose certificate subject is not an allowed service (an ACL on the subject's common
  name: HAProxy 2.6 has no sample fetch for the SAN), describes the caller in an
  ``x-forwarded-client-cert`` header as Envoy does, and forwards plaintext HTTP to the server
  on loopback.

Both keep connections alive on both sides, log every request (HAProxy's HTTP log format, to
standard output), and expose their counters on a stats listener (HAProxy's Prometheus
exporter at ``/metrics``). Neither traces (HAProxy 2.6's OpenTracing filter needs a tracer
plugin that Debian does not ship).

::

    with HAProxy(inbound_config(...), name="inbound", core=0) as proxy:
        ...  # proxy.pid for CPU and memory accounting
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench.harness import pinned, stop_group, wait_listening
from meshware.exceptions import ConfigurationError
from meshware.identity.ca import ServicePaths

__all__ = [
    "HAProxy",
    "ProxySettings",
    "combined_pem",
    "haproxy_binary",
    "haproxy_version",
    "inbound_config",
    "outbound_config",
]


def haproxy_binary() -> str | None:
    """The ``haproxy`` executable (``$HAPROXY`` or the one on ``PATH``), or ``None``."""
    explicit = os.environ.get("HAPROXY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )


def haproxy_version() -> str:
    """HAProxy's version line (``"HAProxy version 2.6.12-1+deb12u4 ..."``), or ``"absent"``."""
    binary = haproxy_binary()
    if binary is None:
        return "absent"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout
    first = out.strip().splitlines()[0] if out.strip() else "unknown"
    return " ".join(first.split()[:3])


def combined_pem(paths: ServicePaths, directory: Path) -> Path:
    """Write the service's certificate and key into one PEM file, as HAProxy's ``crt`` wants.

    Args:
        paths: the service's files (:meth:`meshware.identity.ca.ServicePaths.under`).
        directory: where to write ``<service>.pem`` (mode 0600: it holds the key).

    Returns:
        the path written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{paths.cert.parent.name}.pem"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(paths.cert.read_bytes())
        out.write(paths.key.read_bytes())
    return target


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """What both sidecars of a pair share, so that each setting is made once.

    Attributes:
        threads: HAProxy threads per process (``nbthread``); Istio's sidecars run 2 workers
            by default, one here as each sidecar has one core.
        maxconn: the most concurrent connections per process.
        access_log: log every request to standard output (HAProxy's ``option httplog``).
        connect_timeout: seconds to connect to the next hop.
        idle_timeout: seconds a client or server connection may stay idle.
    """

    threads: int = 1
    maxconn: int = 4096
    access_log: bool = True
    connect_timeout: float = 5.0
    idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("threads", "maxconn"):
            if getattr(self, name) < 1:
                raise ConfigurationError(
                    "expected at least 1", field=name, value=getattr(self, name)
                )
        for name in ("connect_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    "expected a positive number of seconds", field=name, value=getattr(self, name)
                )


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _common(settings: ProxySettings, stats_port: int) -> list[str]:
    lines = [
        "global",
        f"    nbthread {settings.threads}",
        f"    maxconn {settings.maxconn}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "    ssl-default-server-options ssl-min-ver TLSv1.2",
    ]
    if settings.access_log:
        lines.append("    log stdout format raw local0 info")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    http-reuse safe",
        f"    timeout connect {_ms(settings.connect_timeout)}",
        f"    timeout client {_ms(settings.idle_timeout)}",
        f"    timeout server {_ms(settings.idle_timeout)}",
        f"    timeout http-keep-alive {_ms(settings.idle_timeout)}",
    ]
    if settings.access_log:
        lines += ["    log global", "    option httplog"]
    lines += [
        "",
        "frontend stats",
        f"    bind 127.0.0.1:{stats_port}",
        "    no log",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "",
    ]
    return lines


def outbound_config(
    *,
    listen_port: int,
    upstream_port: int,
    upstream_name: str,
    client_pem: Path,
    ca_file: Path,
    stats_port: int,
    settings: ProxySettings = ProxySettings(),
    retries: int = 2,
) -> str:
    """The client's sidecar: plaintext in on ``listen_port``, mTLS out to ``upstream_port``.

    Args:
        listen_port: the loopback port the client sends its calls to.
        upstream_port: the server's inbound sidecar.
        upstream_name: the server's service name; its certificate must carry it as a DNS
            name (``verifyhost``) and it is sent as SNI.
        client_pem: the client's certificate and key in one file (:func:`combined_pem`).
        ca_file: the mesh trust bundle that verifies the server.
        stats_port: the loopback port of the stats and Prometheus listener.
        settings: what both sidecars share.
        retries: retries of a failed connection or a ``503`` (Envoy's default is 2).

    Returns:
        the configuration file's text.
    """
    return "\n".join(
        [
            *_common(settings, stats_port),
            "frontend outbound",
            f"    bind 127.0.0.1:{listen_port}",
            f"    default_backend {upstream_name}",
            "",
            f"backend {upstream_name}",
            f"    retries {retries}",
            "    retry-on conn-failure empty-response 503",
            f"    server {upstream_name}-1 127.0.0.1:{upstream_port} ssl crt {client_pem} "
            f"ca-file {ca_file} verify required verifyhost {upstream_name} "
            f"sni str({upstream_name}) alpn http/1.1",
            "",
        ]
    )


def inbound_config(
    *,
    listen_port: int,
    app_port: int,
    server_pem: Path,
    ca_file: Path,
    allowed_callers: Sequence[str],
    stats_port: int,
    settings: ProxySettings = ProxySettings(),
) -> str:
    """The server's sidecar: mTLS in on ``listen_port``, plaintext to the app on ``app_port``.

    Args:
        listen_port: the port callers reach the service on.
        app_port: the service's own loopback port.
        server_pem: the server's certificate and key in one file (:func:`combined_pem`).
        ca_file: the mesh trust bundle that verifies callers (``verify required``).
        allowed_callers: the service names allowed to call: the common name of the caller's
            certificate subject must be one of them, else ``403``.
        stats_port: the loopback port of the stats and Prometheus listener.
        settings: what both sidecars share.

    Returns:
        the configuration file's text.
    """
    if isinstance(allowed_callers, str) or not allowed_callers:
        raise ConfigurationError(
            "expected a list of at least one service name",
            field="allowed_callers",
            value=allowed_callers,
        )
    callers = " ".join(allowed_callers)
    return "\n".join(
        [
            *_common(settings, stats_port),
            "frontend inbound",
            f"    bind 127.0.0.1:{listen_port} ssl crt {server_pem} ca-file {ca_file} "
            "verify required alpn http/1.1",
            f"    acl allowed_caller ssl_c_s_dn(CN) -m str {callers}",
            "    http-request deny deny_status 403 unless allowed_caller",
            "    http-request set-header x-forwarded-client-cert "
            '"Hash=%[ssl_c_sha1,hex];Subject=\\"%[ssl_c_s_dn]\\""',
            "    default_backend app",
            "",
            "backend app",
            f"    server app-1 127.0.0.1:{app_port}",
            "",
        ]
    )


class HAProxy:
    """One HAProxy process in the foreground, pinned to a core, for the length of a block.

    Args:
        config: the configuration text (:func:`inbound_config`, :func:`outbound_config`).
        name: a name for its files (``<directory>/<name>.cfg`` and ``<name>.log``).
        port: a port it listens on; the block starts once it accepts connections there.
        core: the CPU core to pin it to (when the machine has two or more).
        directory: where to write its configuration and log; a temporary directory when
            ``None``.

    Raises:
        RuntimeError: on entering, HAProxy is not installed, refuses the configuration or
            exits.
        TimeoutError: on entering, it did not listen within 20 seconds.
    """

    def __init__(
        self, config: str, *, name: str, port: int, core: int, directory: Path | None = None
    ) -> None:
        self.config = config
        self.name = name
        self.port = port
        self.core = core
        self.directory = directory or Path(tempfile.mkdtemp(prefix="meshware-haproxy-"))
        self.config_path = self.directory / f"{name}.cfg"
        self.log_path = self.directory / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (for :mod:`bench.resources`)."""
        if self._proc is None:
            raise RuntimeError(f"haproxy {self.name} is not running")
        return self._proc.pid

    def start(self) -> None:
        """Check the configuration, start HAProxy and wait until it listens."""
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (scripts/system-deps.sh installs it)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {self.config_path}:\n{check.stderr}")
        with self.log_path.open("wb") as log:
            # -db: stay in the foreground, one process (no master-worker), so its pid is the
            # process whose CPU and memory are measured.
            self._proc = subprocess.Popen(
                pinned([binary, "-db", "-f", str(self.config_path)], self.core),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log_path = self.log_path
        wait_listening(
            "haproxy",
            self.port,
            self._proc,
            lambda: log_path.read_text(errors="replace"),
            timeout=20.0,
        )

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, then SIGKILL after 10 seconds)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout=10.0)

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
