"""Property-based tests of every parser that reads untrusted or user-written text.

Each parser, given arbitrary input, either returns a value or raises exactly its documented
error type — never ``IndexError``, ``KeyError``, ``UnicodeError`` or a bare ``ValueError`` —
and what it returns keeps its promises (a normalized path is a fixed point with no dot
segment; a parsed SPIFFE id prints back to itself; a timeout is finite and non-negative).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshware.config.errors import MeshConfigError
from meshware.config.loader import load_config
from meshware.exceptions import ConfigurationError, InvalidSpiffeId, InvalidXfcc
from meshware.identity.ca import parse_duration as parse_ttl
from meshware.identity.spiffe import SpiffeId
from meshware.identity.xfcc import parse_xfcc
from meshware.outbound.deadline import InvalidTimeoutHeader, parse_duration, parse_timeout
from meshware.outbound.retry import parse_retry_on
from meshware.policy.paths import (
    DEFAULT_PATH_NORMALIZATION,
    InvalidPath,
    PathNormalization,
    encode_raw_path,
)
from meshware.policy.ratelimit import Rate

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES = Path(__file__).resolve().parents[1] / "config" / "istio_examples"


def _pieces(*alphabet: str) -> st.SearchStrategy[str]:
    """Text built from pieces that matter to a grammar, mixed with arbitrary characters."""
    return st.lists(st.sampled_from(alphabet) | st.text(max_size=3), max_size=24).map("".join)


PATH_PIECES = _pieces(
    "/",
    "//",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    ";",
    ";x=1",
    "%00",
    "%ff",
    "%c0%ae",
    "%",
    "%2",
    "?",
    "#",
    "admin",
    "public",
    "%61",
    "~",
    " ",
    "é",
    "\x00",
    "\t",
)
SPIFFE_PIECES = _pieces(
    "spiffe://",
    "SPIFFE://",
    "cluster.local",
    "/ns/",
    "/sa/",
    "default",
    "orders",
    "/",
    "//",
    ".",
    "..",
    "%2f",
    ":",
    "@",
    "?",
    "#",
    "-",
    "_",
    "A",
    "é",
)
XFCC_PIECES = _pieces(
    "By=",
    "Hash=",
    "Cert=",
    "Chain=",
    "Subject=",
    "URI=",
    "DNS=",
    "spiffe://cluster.local/ns/a/sa/b",
    ";",
    ",",
    '"',
    '\\"',
    "\\",
    "=",
    " ",
    "%22",
    "Unknown=",
)
RATE_PIECES = _pieces(
    "5",
    "100",
    "0",
    "-1",
    "1.5",
    "1e9",
    "/",
    "second",
    "minute",
    "hour",
    "day",
    "s",
    "m",
    "h",
    "burst",
    "=",
    ";",
    " ",
    "per",
    "nan",
    "inf",
)
TIMEOUT_PIECES = _pieces("1", "0", "99999999", "123456789", "H", "M", "S", "m", "u", "n", " ", "\t")
DURATION_PIECES = _pieces(
    "1", "0", "1.5", ".5", "1e3", "h", "m", "s", "ms", "us", "µs", "ns", "d", "-", "+", " ", "nan"
)
RETRY_PIECES = _pieces(
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "503",
    "600",
    "99",
    ",",
    " ",
    "cancelled",
    "unknown",
)


@FUZZ
@given(st.one_of(PATH_PIECES, st.text(max_size=64)))
def test_normalize_path_fuzz(path: str) -> None:
    for normalization in (
        DEFAULT_PATH_NORMALIZATION,
        PathNormalization(escaped_slashes="decode", backslash="to-slash", strip_params=True),
        PathNormalization(escaped_slashes="keep", merge_slashes=False),
    ):
        try:
            out = normalization.normalize(path)
        except InvalidPath as exc:
            assert exc.reason in {
                "too-long",
                "control-character",
                "invalid-percent-encoding",
                "invalid-utf8",
                "escaped-slash",
                "backslash",
                "ambiguous-dot-segment",
            }
            continue
        assert out.startswith("/")
        segments = out.split("/")
        assert ".." not in segments[1:] and "." not in segments[1:]
        assert normalization.normalize(out) == out  # a fixed point


@FUZZ
@given(st.binary(max_size=64))
def test_raw_paths_from_the_wire_normalize_or_fail_cleanly(raw: bytes) -> None:
    path = encode_raw_path(raw)
    assert isinstance(path, str)
    try:
        out = DEFAULT_PATH_NORMALIZATION.normalize(path)
    except InvalidPath:
        return
    assert DEFAULT_PATH_NORMALIZATION.normalize(out) == out


@FUZZ
@given(st.one_of(SPIFFE_PIECES, st.text(max_size=64)))
def test_spiffe_id_fuzz(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert SpiffeId.parse(parsed.uri) == parsed
    assert parsed.uri == text


@FUZZ
@given(st.one_of(XFCC_PIECES, st.text(max_size=64)))
def test_xfcc_fuzz(header: str) -> None:
    try:
        elements = parse_xfcc(header)
    except InvalidXfcc:
        return
    assert isinstance(elements, list)


def test_xfcc_size_limits() -> None:
    with pytest.raises(InvalidXfcc):
        parse_xfcc("URI=" + "a" * 40_000)
    with pytest.raises(InvalidXfcc):
        parse_xfcc(",".join(["URI=spiffe://cluster.local/ns/a/sa/b"] * 17))


@FUZZ
@given(st.one_of(RATE_PIECES, st.text(max_size=32)))
def test_rate_spec_fuzz(text: str) -> None:
    try:
        rate = Rate.parse(text)
    except ConfigurationError:
        return
    assert isinstance(rate, Rate)


@FUZZ
@given(st.one_of(TIMEOUT_PIECES, st.text(max_size=16), st.binary(max_size=16)))
def test_deadline_header_fuzz(value: str | bytes) -> None:
    try:
        seconds = parse_timeout(value)
    except InvalidTimeoutHeader:
        return
    assert math.isfinite(seconds) and seconds >= 0


@FUZZ
@given(
    st.one_of(
        DURATION_PIECES,
        st.text(max_size=16),
        st.floats(allow_nan=True),
        st.integers(),
        st.none(),
        st.booleans(),
    )
)
def test_duration_fuzz(value: Any) -> None:
    try:
        seconds = parse_duration(value, field="timeout")
    except ConfigurationError as exc:
        assert exc.field == "timeout"
    else:
        assert math.isfinite(seconds) and seconds >= 0
    if isinstance(value, str):
        with contextlib.suppress(ConfigurationError):
            parse_ttl(value, field="ttl")


@FUZZ
@given(st.one_of(RETRY_PIECES, st.text(max_size=32), st.lists(RETRY_PIECES, max_size=4)))
def test_retry_on_fuzz(value: str | list[str]) -> None:
    try:
        conditions = parse_retry_on(value, field="retryOn")
    except ConfigurationError as exc:
        assert exc.field is not None and exc.field.startswith("retryOn")
        return
    assert all(isinstance(c, str) for c in conditions)


# -- configuration files -----------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["5xx", "1s", "ALLOW", "DENY", "STRICT", "*", "/api/*", "v1", "ROUND_ROBIN"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_KINDS = st.sampled_from(
    [
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("security.istio.io/v1", "PeerAuthentication"),
        ("security.istio.io/v1", "RequestAuthentication"),
        ("networking.istio.io/v1", "DestinationRule"),
        ("networking.istio.io/v1", "VirtualService"),
        ("v1", "List"),
        ("meshware.dev/v1", "Nonsense"),
    ]
)
_EXAMPLE_DOCS = [
    doc
    for path in sorted(EXAMPLES.glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if isinstance(doc, dict)
]


@st.composite
def _documents(draw: st.DrawFn) -> str:
    choice = draw(st.integers(0, 3))
    if choice == 0:  # a resource of a known kind with an arbitrary spec
        api, kind = draw(_KINDS)
        doc: Any = {
            "apiVersion": api,
            "kind": kind,
            "metadata": draw(st.dictionaries(st.sampled_from(["name", "namespace"]), _VALUES)),
            "spec": draw(_VALUES),
        }
    elif choice == 1:  # a real Istio example with one value replaced
        doc = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(_EXAMPLE_DOCS))))
        node = doc
        while isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
                node[key] = draw(_VALUES)
                break
            node = node[key] if isinstance(node[key], dict) else node[key][0] if node[key] else {}
    elif choice == 2:  # arbitrary structure
        doc = draw(_VALUES)
    else:  # arbitrary text, YAML-ish
        return draw(
            _pieces(
                "kind: ",
                "apiVersion: ",
                "spec:",
                "\n",
                "  ",
                "- ",
                ": ",
                "---",
                "&a",
                "*a",
                "!!python/object",
                "{",
                "[",
                "'",
                '"',
            )
        )
    return yaml.safe_dump(doc)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_documents(), min_size=1, max_size=3).map("---\n".join))
def test_load_config_fuzz(text: str) -> None:
    try:
        config = load_config(text=text, service="reviews")
    except (MeshConfigError, ConfigurationError):
        return
    assert config is not None


def test_peer_authentication_mode_of_the_wrong_type_is_a_problem_not_a_crash() -> None:
    """Found by the fuzzer: ``mode: []`` raised ``TypeError: unhashable type: 'list'``."""
    text = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: finance}\nspec:\n  mtls:\n    mode: []\n"
    )
    with pytest.raises(MeshConfigError) as caught:
        load_config(text=text)
    assert caught.value.field == "spec.mtls.mode"
    assert caught.value.value == []
    assert "expected one of STRICT, PERMISSIVE, DISABLE, UNSET" in str(caught.value)
