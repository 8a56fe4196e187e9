"""Security-minded request-path normalization, applied before any path rule is matched.

A path rule is only as good as the path it is matched against: ``DENY /admin*`` means
nothing if ``/public/../admin``, ``/%61dmin`` or ``/admin%2F..%2Fadmin`` reach the same
handler. Like Envoy's ``normalize_path``, ``merge_slashes`` and
``path_with_escaped_slashes_action`` (Istio's ``meshConfig.pathNormalization``), meshware
turns every spelling of a path into one canonical form, or rejects the request when a
spelling is ambiguous. The steps, in order:

1. Reject paths longer than ``max_length`` characters (``too-long``).
2. Reject control characters (``0x00``-``0x1F``, ``0x7F``), raw anywhere in the target
   (``control-character``).
3. Drop everything from the first ``?`` or ``#`` (query and fragment are not the path).
4. Percent-decoding, one pass: reject a ``%`` not followed by two hex digits
   (``invalid-percent-encoding``); decode escapes of unreserved characters
   (``A-Z a-z 0-9 - . _ ~``, RFC 3986 section 2.3); upper-case every other escape; apply
   the ``escaped_slashes`` setting to ``%2F`` and ``%5C``; reject escaped control
   characters such as ``%00`` (``control-character``); apply the ``backslash`` setting to
   a literal ``\\``; percent-encode (as UTF-8) any other character that may not appear
   in a path, such as a space or a non-ASCII character.
5. Reject escapes whose bytes are not valid UTF-8, overlong forms like ``%C0%AE``
   included (``invalid-utf8``).
6. With ``strip_params``, drop ``;params`` from every segment (``/a;v=1/b`` -> ``/a/b``);
   without it, reject a dot segment that carries parameters (``/..;/``), which servlet
   containers read as ``..`` and Python frameworks as a name (``ambiguous-dot-segment``).
7. Make the path start with ``/``.
8. With ``merge_slashes``, collapse runs of ``/`` into one.
9. Remove ``.`` and ``..`` segments (RFC 3986 section 5.2.4); ``..`` never climbs above
   the root.

Because step 4 runs before step 9, encoded dot segments are resolved too:
``/a/%2e%2e/admin`` becomes ``/admin``. The result is a fixed point: normalizing it
again returns it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote_to_bytes

from meshware.exceptions import ConfigurationError, MeshwareError

__all__ = [
    "DEFAULT_PATH_NORMALIZATION",
    "Backslash",
    "EscapedSlashes",
    "InvalidPath",
    "PathNormalization",
    "encode_raw_path",
    "normalize_path",
]

EscapedSlashes = Literal["reject", "decode", "keep"]
"""What to do with ``%2F`` / ``%5C`` (any case): reject the request, decode, or keep."""

Backslash = Literal["reject", "to-slash"]
"""What to do with a literal ``\\``: reject the request, or treat it as ``/``."""

_ESCAPED_SLASHES = ("reject", "decode", "keep")
_BACKSLASH = ("reject", "to-slash")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Characters a canonical path may contain literally: unreserved, sub-delims, ":", "@", "/".
_PATH_CHARS = r"A-Za-z0-9\-._~!$&'()*+,;=:@/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")
_TOKEN = re.compile(rf"%[0-9A-Fa-f]{{2}}|%|[^{_PATH_CHARS}]")
_PARAMS = re.compile(r";[^/]*")
_SLASHES = re.compile(r"//+")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:[/;]|\Z)")
_DOT_SEGMENT_PARAMS = re.compile(r"(?:\A|/)\.\.?;")
_SHOWN = 120


class InvalidPath(MeshwareError):
    """A request path that cannot be normalized safely; the request should get a 400.

    Attributes:
        reason: a stable short code: ``"too-long"``, ``"control-character"``,
            ``"invalid-percent-encoding"``, ``"invalid-utf8"``, ``"escaped-slash"``,
            ``"backslash"`` or ``"ambiguous-dot-segment"``.
        path: the path as given (possibly very long; do not log it unbounded).
    """

    def __init__(self, message: str, *, reason: str, path: str) -> None:
        self.reason = reason
        self.path = path
        shown = path if len(path) <= _SHOWN else path[: _SHOWN - 3] + "..."
        super().__init__(f"{message}: {shown!r} [{reason}]")


@dataclass(frozen=True, slots=True, kw_only=True)
class PathNormalization:
    """How request paths are normalized before path rules are matched.

    The defaults are the strict choice: they reject what different servers and
    frameworks read differently, and normalize only what every reader agrees on.

    Args:
        merge_slashes: collapse ``//`` into ``/`` (Envoy's ``merge_slashes``).
        escaped_slashes: what to do with ``%2F`` and ``%5C`` (either case), Envoy's
            ``path_with_escaped_slashes_action``. ``"reject"`` (default) fails the
            request with ``InvalidPath(reason="escaped-slash")``; ``"decode"`` turns them
            into ``/`` and ``\\`` before dot segments and slashes are handled (Istio's
            ``DECODE_AND_MERGE_SLASHES``); ``"keep"`` leaves them encoded (upper-cased),
            so ``/a%2Fb`` is one segment for matching, as in Istio's default.
        strip_params: drop ``;params`` from each segment, for back ends (Java servlet
            containers, for example) that ignore them: ``/admin;x=1/`` -> ``/admin/``
            and ``/..;/admin`` -> ``/admin``. Off by default because Python frameworks
            treat ``;`` as an ordinary path character; a dot segment with parameters
            (``/..;/``) is then rejected, since readers disagree on it.
        backslash: what to do with a literal ``\\``. ``"reject"`` (default) fails the
            request with ``InvalidPath(reason="backslash")``: it is not a legal URL
            character, browsers already turn it into ``/`` before sending, and servers
            disagree on it (some treat it as a separator), which is what path-confusion
            attacks exploit. ``"to-slash"`` treats it as ``/``, as Envoy does.
        max_length: the longest path accepted, in characters, before ``too-long``.

    Raises:
        ConfigurationError: a setting has the wrong type or an unknown value.
    """

    merge_slashes: bool = True
    escaped_slashes: EscapedSlashes = "reject"
    strip_params: bool = False
    backslash: Backslash = "reject"
    max_length: int = 8192
    _clean: Callable[[str], re.Match[str] | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("merge_slashes", "strip_params"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigurationError(
                    f"expected a bool, got {type(value).__name__}", field=name, value=value
                )
        if self.escaped_slashes not in _ESCAPED_SLASHES:
            raise ConfigurationError(
                "expected one of 'reject', 'decode', 'keep'",
                field="escaped_slashes",
                value=self.escaped_slashes,
            )
        if self.backslash not in _BACKSLASH:
            raise ConfigurationError(
                "expected one of 'reject', 'to-slash'", field="backslash", value=self.backslash
            )
        if (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or self.max_length < 1
        ):
            raise ConfigurationError(
                "expected a positive integer", field="max_length", value=self.max_length
            )
        # A path of these characters only, without "//" or "/.", is already canonical.
        chars = _PATH_CHARS.replace(";", "") if self.strip_params else _PATH_CHARS
        object.__setattr__(self, "_clean", re.compile(f"/[{chars}]*").fullmatch)

    @classmethod
    def from_istio(cls, mode: str) -> PathNormalization:
        """Build the settings of an Istio ``meshConfig.pathNormalization.normalization``.

        ``"DEFAULT"`` and ``"BASE"`` normalize without merging slashes and keep escaped
        slashes; ``"MERGE_SLASHES"`` also merges slashes; ``"DECODE_AND_MERGE_SLASHES"``
        also decodes ``%2F`` and ``%5C``. All three treat ``\\`` as ``/``, as Envoy does.

        Raises:
            ConfigurationError: ``"NONE"`` (matching paths that are not normalized lets
                another spelling of a path bypass its rules) or an unknown mode.
        """
        if mode in ("DEFAULT", "BASE"):
            return cls(merge_slashes=False, escaped_slashes="keep", backslash="to-slash")
        if mode == "MERGE_SLASHES":
            return cls(merge_slashes=True, escaped_slashes="keep", backslash="to-slash")
        if mode == "DECODE_AND_MERGE_SLASHES":
            return cls(merge_slashes=True, escaped_slashes="decode", backslash="to-slash")
        if mode == "NONE":
            raise ConfigurationError(
                "unsupported: path rules are always matched on normalized paths, otherwise "
                "another spelling of a path bypasses them; expected one of DEFAULT, BASE, "
                "MERGE_SLASHES, DECODE_AND_MERGE_SLASHES",
                field="pathNormalization.normalization",
                value=mode,
            )
        raise ConfigurationError(
            "expected one of DEFAULT, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES",
            field="pathNormalization.normalization",
            value=mode,
        )

    def normalize(self, raw_path: str) -> str:
        """Return the canonical form of ``raw_path`` (always starting with ``/``).

        Args:
            raw_path: the request path as received, still percent-encoded; a query or
                fragment is cut off. Characters outside ASCII are taken as themselves and
                encoded as UTF-8 (see :func:`encode_raw_path` for a path held as bytes).

        Raises:
            InvalidPath: the path is too long, contains control characters, bad
                percent-encoding or non-UTF-8 escapes, a dot segment with parameters, or
                an escaped slash or backslash that the settings reject.
        """
        if len(raw_path) > self.max_length:
            raise InvalidPath(
                f"path longer than {self.max_length} characters", reason="too-long", path=raw_path
            )
        if (
            self._clean(raw_path) is not None
            and not (self.merge_slashes and "//" in raw_path)
            and ("/." not in raw_path or _DOT_SEGMENT.search(raw_path) is None)
        ):
            return raw_path
        return self._normalize(raw_path)

    def _normalize(self, raw_path: str) -> str:
        if _CONTROL.search(raw_path):
            raise InvalidPath(
                "control character in path", reason="control-character", path=raw_path
            )
        cut = _QUERY_OR_FRAGMENT.search(raw_path)
        path = raw_path if cut is None else raw_path[: cut.start()]
        if self._clean(path) is None:
            path = _TOKEN.sub(self._token_rewriter(raw_path), path)
        if "%" in path:
            try:
                unquote_to_bytes(path).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidPath(
                    "percent-encoded bytes are not valid UTF-8",
                    reason="invalid-utf8",
                    path=raw_path,
                ) from None
        if ";" in path:
            if self.strip_params:
                path = _PARAMS.sub("", path)
            elif _DOT_SEGMENT_PARAMS.search(path):
                raise InvalidPath(
                    "dot segment with parameters in path",
                    reason="ambiguous-dot-segment",
                    path=raw_path,
                )
        if not path.startswith("/"):
            path = "/" + path
        if self.merge_slashes and "//" in path:
            path = _SLASHES.sub("/", path)
        if "/." in path:
            path = _remove_dot_segments(path)
        return path

    def _token_rewriter(self, raw_path: str) -> Callable[[re.Match[str]], str]:
        escaped_slashes = self.escaped_slashes
        backslash_to_slash = self.backslash == "to-slash"

        def backslash() -> str:
            if backslash_to_slash:
                return "/"
            raise InvalidPath("backslash in path", reason="backslash", path=raw_path)

        def rewrite(match: re.Match[str]) -> str:
            text = match.group()
            if text == "%":
                raise InvalidPath(
                    "'%' not followed by two hex digits",
                    reason="invalid-percent-encoding",
                    path=raw_path,
                )
            if text[0] == "%":
                byte = int(text[1:], 16)
                char = chr(byte)
                if char in _UNRESERVED:
                    return char
                if byte == 0x2F or byte == 0x5C:
                    if escaped_slashes == "reject":
                        raise InvalidPath(
                            "percent-encoded slash or backslash in path",
                            reason="escaped-slash",
                            path=raw_path,
                        )
                    if escaped_slashes == "keep":
                        return text.upper()
                    return "/" if byte == 0x2F else backslash()
                if byte < 0x20 or byte == 0x7F:
                    raise InvalidPath(
                        "percent-encoded control character in path",
                        reason="control-character",
                        path=raw_path,
                    )
                return text.upper()
            if text == "\\":
                return backslash()
            try:
                encoded = text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidPath(
                    "path is not valid UTF-8", reason="invalid-utf8", path=raw_path
                ) from None
            return "".join(f"%{b:02X}" for b in encoded)

        return rewrite


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")
    output: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if segments[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output)


DEFAULT_PATH_NORMALIZATION = PathNormalization()
"""The default settings: merge slashes, reject escaped slashes and backslashes."""


def normalize_path(
    raw_path: str, normalization: PathNormalization = DEFAULT_PATH_NORMALIZATION
) -> str:
    """Normalize ``raw_path`` with ``normalization`` (strict defaults when omitted).

    A shortcut for ``normalization.normalize(raw_path)``; see
    :meth:`PathNormalization.normalize`.

    Raises:
        InvalidPath: the path cannot be normalized safely.
    """
    return normalization.normalize(raw_path)


def encode_raw_path(raw_path: bytes) -> str:
    """Turn a request path held as bytes (ASGI's ``raw_path``) into a string to normalize.

    ASCII bytes are kept; every other byte is percent-encoded, so that a raw UTF-8
    ``é`` and its encoded spelling ``%C3%A9`` normalize to the same path, and bytes that
    are not UTF-8 are rejected by normalization instead of being misread.
    """
    if raw_path.isascii():
        return raw_path.decode("ascii")
    return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw_path)
