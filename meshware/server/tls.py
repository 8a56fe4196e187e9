"""Server-side TLS: mTLS modes, SSL contexts, and certificate rotation without a restart.

``MtlsMode`` follows Istio's PeerAuthentication:

- ``STRICT``: TLS with a client certificate, or the handshake is refused;
- ``PERMISSIVE``: the same port accepts mTLS *and* plaintext (the first byte of a connection
  tells them apart, as Istio's protocol sniffing does); plaintext callers have no identity;
- ``DISABLE``: plaintext only.

Rotation: :class:`ReloadingServerTLS` watches the service's key, certificate and trust bundle
(their modification times, checked at most once per ``check_interval`` seconds, during
handshakes). When they change it builds a fresh context and new handshakes use it through the
context's SNI callback (OpenSSL lets a handshake switch contexts there, and calls it with or
without SNI). Connections already open keep their session, so no request in flight is cut. A
half-written or mismatched pair (key and certificate from different issues) is not applied: the
old context stays in force and the next check tries again.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import TrustBundles

logger = logging.getLogger("meshware.server")

TLS_HANDSHAKE_FIRST_BYTE = 0x16


class MtlsMode(str, enum.Enum):
    """Istio PeerAuthentication modes."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    DISABLE = "disable"

    @classmethod
    def parse(cls, value: str) -> MtlsMode:
        text = value.strip().lower()
        if text == "off":
            text = "disable"
        try:
            return cls(text)
        except ValueError:
            raise ConfigurationError(
                "expected one of strict, permissive, disable (or off)", field="mtls", value=value
            ) from None


class SniffingSSLContext(ssl.SSLContext):
    """An SSL context that lets plaintext connections through in PERMISSIVE mode.

    Used by socket-based servers (gunicorn): ``wrap_socket`` peeks at the first byte and
    returns the plain socket when it is not a TLS handshake.
    """

    allow_plaintext: bool = False
    plaintext_port: int | None = None
    peek_timeout: float = 10.0

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.plaintext_port is not None and sock.getsockname()[1] == self.plaintext_port:
            return sock  # the health port: plaintext, health paths only
        if self.allow_plaintext and not starts_with_tls(sock, self.peek_timeout):
            return sock
        return super().wrap_socket(sock, *args, **kwargs)


def starts_with_tls(sock: socket.socket, timeout: float) -> bool:
    """Peek (without consuming) whether a blocking socket's first byte opens a TLS handshake."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    finally:
        sock.settimeout(previous)
    return bool(first) and first[0] == TLS_HANDSHAKE_FIRST_BYTE


def _mtimes(paths: tuple[Path, ...]) -> tuple[int, ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(-1)
        else:
            out.append(st.st_mtime_ns ^ st.st_size ^ st.st_ino)
    return tuple(out)


def _read_pem(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigurationError(
            f"{what} {path} does not exist", field=what, value=str(path)
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {what} {path}: {exc.strerror}", field=what, value=str(path)
        ) from exc
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{what} {path} is not PEM text", field=what, value=str(path)
        ) from None


class ReloadingServerTLS:
    """The server's TLS material, reloaded from disk when it changes.

    Args:
        cert_file: the service's certificate (PEM).
        key_file: the service's private key (PEM).
        bundle_file: the trust bundle (PEM) clients' certificates are verified against.
        mode: the mTLS mode (STRICT requires client certificates).
        plaintext_port: a listening port whose connections stay plaintext (the health port);
            only for socket-based servers (gunicorn).
        check_interval: seconds between checks of the files' modification times.
        clock: monotonic time source.

    Raises:
        ConfigurationError: a file is missing, unreadable, not PEM, or the key does not match
            the certificate — at startup, so the operator sees it before any traffic.
    """

    def __init__(
        self,
        *,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        bundle_file: str | os.PathLike[str],
        mode: MtlsMode = MtlsMode.STRICT,
        plaintext_port: int | None = None,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.bundle_file = Path(bundle_file)
        self.mode = mode
        self.plaintext_port = plaintext_port
        self.check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._paths = (self.cert_file, self.key_file, self.bundle_file)
        self._stamp = _mtimes(self._paths)
        self._next_check = clock() + check_interval
        self.reloads = 0
        self.reload_failures = 0
        self._context, self.server_cert_pem, self._bundles = self._build()
        # The entry context: every handshake starts here, and its SNI callback moves the
        # connection to the freshest context.
        self.entry_context = self._context
        self.entry_context.sni_callback = self._on_handshake

    @property
    def bundles(self) -> TrustBundles:
        """The trust bundles currently in force (for the peer verifier)."""
        self.maybe_reload()
        return self._bundles

    @property
    def context(self) -> ssl.SSLContext:
        """The freshest server context (checks the files first)."""
        self.maybe_reload()
        return self._context

    def _build(self) -> tuple[SniffingSSLContext, str, TrustBundles]:
        cert_pem = _read_pem(self.cert_file, "cert_file")
        _read_pem(self.key_file, "key_file")
        bundle_pem = _read_pem(self.bundle_file, "bundle_file")
        bundles = TrustBundles.from_pem(bundle_pem.encode())
        ctx = SniffingSSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"cannot load key {self.key_file} with certificate {self.cert_file}: "
                f"{exc.reason or exc}",
                field="key_file",
                value=str(self.key_file),
            ) from exc
        ctx.load_verify_locations(cadata=bundle_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mode is MtlsMode.STRICT else ssl.CERT_OPTIONAL
        ctx.allow_plaintext = self.mode is MtlsMode.PERMISSIVE
        ctx.plaintext_port = self.plaintext_port
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx, cert_pem, bundles

    def maybe_reload(self) -> bool:
        """Rebuild the context if the files changed; return whether a new one took effect."""
        now = self._clock()
        if now < self._next_check:
            return False
        with self._lock:
            if now < self._next_check:
                return False
            self._next_check = now + self.check_interval
            stamp = _mtimes(self._paths)
            if stamp == self._stamp:
                return False
            try:
                context, cert_pem, bundles = self._build()
            except ConfigurationError as exc:
                # Likely caught between two file writes; keep serving with the old material.
                self.reload_failures += 1
                logger.warning("certificate reload deferred: %s", exc)
                return False
            self._stamp = stamp
            context.sni_callback = self._on_handshake
            self._context, self.server_cert_pem, self._bundles = context, cert_pem, bundles
            self.reloads += 1
        logger.info("reloaded TLS certificate %s", self.cert_file)
        return True

    def _on_handshake(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self.context
        if sslobj.context is not current:
            sslobj.context = current
