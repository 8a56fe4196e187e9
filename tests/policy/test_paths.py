from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError, MeshwareError
from meshware.policy.paths import (
    DEFAULT_PATH_NORMALIZATION,
    InvalidPath,
    PathNormalization,
    encode_raw_path,
    normalize_path,
)

STRICT = PathNormalization()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Already canonical.
        ("/", "/"),
        ("/api/v1/items", "/api/v1/items"),
        ("/a-b_c.d~e/!$&'()*+,;=:@", "/a-b_c.d~e/!$&'()*+,;=:@"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/.c", "/a/..b/.c"),
        # Missing or relative start.
        ("", "/"),
        ("a/b", "/a/b"),
        ("../a", "/a"),
        # Slashes.
        ("/a//b", "/a/b"),
        ("///a", "/a"),
        ("/a/b//", "/a/b/"),
        ("//admin", "/admin"),
        # Dot segments, never above the root.
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../a", "/a"),
        ("/../../..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/public/../admin", "/admin"),
        ("/public/./../admin/./x", "/admin/x"),
        ("/a//..//admin", "/admin"),
        # Encoded dot segments are decoded before dot-segment removal.
        ("/a/%2e%2e/admin", "/admin"),
        ("/a/%2E%2E/admin", "/admin"),
        ("/a/.%2e/admin", "/admin"),
        ("/a/%2e./admin", "/admin"),
        ("/a/%2e/b", "/a/b"),
        ("/%2e%2e/%2e%2e/admin", "/admin"),
        # Unreserved escapes are decoded; every other escape is upper-cased.
        ("/%61dmin", "/admin"),
        ("/%41%42%43", "/ABC"),
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/a%2db%5fc", "/a-b_c"),
        ("/a%3bb", "/a%3Bb"),
        ("/a%20b", "/a%20b"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/caf%C3%a9", "/caf%C3%A9"),
        ("/a%3f", "/a%3F"),
        ("/a%23", "/a%23"),
        ("/a%25", "/a%25"),
        # Double encoding stays encoded: one decode by the application yields no dot segment.
        ("/%252e%252e/admin", "/%252e%252e/admin"),
        ("/%252F", "/%252F"),
        # Characters that may not appear in a path are encoded (as UTF-8).
        ("/a b", "/a%20b"),
        ("/café", "/caf%C3%A9"),
        ('/a"b', "/a%22b"),
        ("/a<b>", "/a%3Cb%3E"),
        ("/a{b}|c^d`e", "/a%7Bb%7D%7Cc%5Ed%60e"),
        ("/a[0]", "/a%5B0%5D"),
        ("/😀", "/%F0%9F%98%80"),
        # Query and fragment are not part of the path.
        ("/a?x=1", "/a"),
        ("/a#frag", "/a"),
        ("/a/..?x=/b", "/"),
        ("/a#/../b", "/a"),
        ("?x", "/"),
        ("/a?%zz", "/a"),
        # Parameters are kept by default.
        ("/admin;x=1", "/admin;x=1"),
        ("/a;b/c;d=1", "/a;b/c;d=1"),
        ("/a/...;x/b", "/a/...;x/b"),
        ("/a/x.;y", "/a/x.;y"),
    ],
)
def test_normalize_strict_defaults(raw: str, expected: str) -> None:
    assert STRICT.normalize(raw) == expected
    assert normalize_path(raw) == expected


def test_canonical_path_is_returned_as_is() -> None:
    raw = "/api/v1/items"
    assert STRICT.normalize(raw) is raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/a%2Fb", "escaped-slash"),
        ("/a%2fb", "escaped-slash"),
        ("/a%5Cb", "escaped-slash"),
        ("/a%5cb", "escaped-slash"),
        ("/public%2F..%2Fadmin", "escaped-slash"),
        ("/a\\b", "backslash"),
        ("\\admin", "backslash"),
        ("/public\\..\\admin", "backslash"),
        ("/%zz", "invalid-percent-encoding"),
        ("/%4", "invalid-percent-encoding"),
        ("/a%", "invalid-percent-encoding"),
        ("/%%41", "invalid-percent-encoding"),
        ("/%u002e%u002e/admin", "invalid-percent-encoding"),
        ("/%g0", "invalid-percent-encoding"),
        ("/%FF", "invalid-utf8"),
        ("/%c3", "invalid-utf8"),
        ("/%C3A", "invalid-utf8"),
        ("/%C0%AE%C0%AE/admin", "invalid-utf8"),
        ("/%c0%af", "invalid-utf8"),
        ("/%ED%A0%80", "invalid-utf8"),
        ("/\udc80", "invalid-utf8"),
        ("/a\x00", "control-character"),
        ("/a\nb", "control-character"),
        ("/a\rb", "control-character"),
        ("/a\tb", "control-character"),
        ("/a\x7f", "control-character"),
        ("/a?\x00", "control-character"),
        ("/%00", "control-character"),
        ("/a%0Ab", "control-character"),
        ("/a%0db", "control-character"),
        ("/%7f", "control-character"),
        ("/" + "a" * 8192, "too-long"),
        ("/public/..;/admin", "ambiguous-dot-segment"),
        ("/public/..;x=1/admin", "ambiguous-dot-segment"),
        ("/public/.;/admin", "ambiguous-dot-segment"),
        ("/public/%2e%2e;/admin", "ambiguous-dot-segment"),
        ("..;/admin", "ambiguous-dot-segment"),
        ("/a/..;", "ambiguous-dot-segment"),
    ],
)
def test_normalize_strict_rejects(raw: str, reason: str) -> None:
    with pytest.raises(InvalidPath) as info:
        STRICT.normalize(raw)
    assert info.value.reason == reason
    assert info.value.path == raw


def test_max_length_is_inclusive() -> None:
    path = "/" + "a" * 8191
    assert STRICT.normalize(path) == path
    short = PathNormalization(max_length=5)
    assert short.normalize("/abcd") == "/abcd"
    with pytest.raises(InvalidPath) as info:
        short.normalize("/abcde")
    assert info.value.reason == "too-long"


def test_invalid_path_message_and_type() -> None:
    with pytest.raises(InvalidPath) as info:
        STRICT.normalize("/a%2Fb")
    error = info.value
    assert str(error) == "percent-encoded slash or backslash in path: '/a%2Fb' [escaped-slash]"
    assert isinstance(error, MeshwareError)
    assert not isinstance(error, ConfigurationError)


def test_invalid_path_message_is_bounded() -> None:
    raw = "/" + "a" * 200 + "%zz"
    with pytest.raises(InvalidPath) as info:
        STRICT.normalize(raw)
    assert str(info.value) == (
        "'%' not followed by two hex digits: '/" + "a" * 116 + "...' [invalid-percent-encoding]"
    )
    assert info.value.path == raw


DECODE = PathNormalization(escaped_slashes="decode", backslash="to-slash")
KEEP = PathNormalization(escaped_slashes="keep")
NO_MERGE = PathNormalization(merge_slashes=False)
BACKSLASH = PathNormalization(backslash="to-slash")
PARAMS = PathNormalization(strip_params=True)


@pytest.mark.parametrize(
    ("normalization", "raw", "expected"),
    [
        (DECODE, "/a%2Fb", "/a/b"),
        (DECODE, "/a%2fb", "/a/b"),
        (DECODE, "/a%2F%2Fb", "/a/b"),
        (DECODE, "/public%2F..%2Fadmin", "/admin"),
        (DECODE, "/a%5Cb", "/a/b"),
        (DECODE, "/private/..%2Fpublic%5c%2e%2Fabc", "/public/abc"),
        (KEEP, "/a%2fb", "/a%2Fb"),
        (KEEP, "/a%5cb", "/a%5Cb"),
        (KEEP, "/public%2F..%2Fadmin", "/public%2F..%2Fadmin"),
        (KEEP, "/a/%2F/../b", "/a/b"),
        (NO_MERGE, "/a//b", "/a//b"),
        (NO_MERGE, "//", "//"),
        (NO_MERGE, "/a//../b", "/a/b"),
        (NO_MERGE, "/a/.//b", "/a//b"),
        (BACKSLASH, "/a\\b", "/a/b"),
        (BACKSLASH, "/public\\..\\admin", "/admin"),
        (BACKSLASH, "\\\\admin", "/admin"),
        (PARAMS, "/admin;x=1/", "/admin/"),
        (PARAMS, "/public/..;/admin", "/admin"),
        (PARAMS, "/public/%2e%2e;x/admin", "/admin"),
        (PARAMS, "/a/.;/b", "/a/b"),
        (PARAMS, "/a/;x/b", "/a/b"),
        (PARAMS, "/a;x;y/b;z", "/a/b"),
        (PARAMS, "/a%3Bx/b", "/a%3Bx/b"),
        (PARAMS, "/a%3bx/b", "/a%3Bx/b"),
    ],
)
def test_normalize_settings(normalization: PathNormalization, raw: str, expected: str) -> None:
    assert normalization.normalize(raw) == expected


def test_decode_with_backslash_rejected_rejects_encoded_backslash() -> None:
    normalization = PathNormalization(escaped_slashes="decode")
    assert normalization.normalize("/a%2Fb") == "/a/b"
    with pytest.raises(InvalidPath) as info:
        normalization.normalize("/a%5Cb")
    assert info.value.reason == "backslash"


@pytest.mark.parametrize(
    ("mode", "merge", "escaped", "backslash"),
    [
        ("DEFAULT", False, "keep", "to-slash"),
        ("BASE", False, "keep", "to-slash"),
        ("MERGE_SLASHES", True, "keep", "to-slash"),
        ("DECODE_AND_MERGE_SLASHES", True, "decode", "to-slash"),
    ],
)
def test_from_istio(mode: str, merge: bool, escaped: str, backslash: str) -> None:
    normalization = PathNormalization.from_istio(mode)
    assert normalization == PathNormalization(
        merge_slashes=merge,
        escaped_slashes=escaped,  # type: ignore[arg-type]
        backslash=backslash,  # type: ignore[arg-type]
    )


def test_from_istio_base_normalizes_without_merging() -> None:
    base = PathNormalization.from_istio("BASE")
    assert base.normalize("/a//b/../c\\d%2f") == "/a//c/d%2F"


def test_from_istio_rejects_none_and_unknown() -> None:
    with pytest.raises(ConfigurationError) as info:
        PathNormalization.from_istio("NONE")
    assert info.value.field == "pathNormalization.normalization"
    assert info.value.value == "NONE"
    assert "unsupported" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        PathNormalization.from_istio("merge_slashes")
    assert str(info.value) == (
        "pathNormalization.normalization: expected one of DEFAULT, BASE, MERGE_SLASHES, "
        "DECODE_AND_MERGE_SLASHES"
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (
            {"escaped_slashes": "drop"},
            "escaped_slashes",
            "expected one of 'reject', 'decode', 'keep'",
        ),
        ({"backslash": "keep"}, "backslash", "expected one of 'reject', 'to-slash'"),
        ({"merge_slashes": "yes"}, "merge_slashes", "expected a bool, got str"),
        ({"strip_params": 1}, "strip_params", "expected a bool, got int"),
        ({"max_length": 0}, "max_length", "expected a positive integer"),
        ({"max_length": True}, "max_length", "expected a positive integer"),
        ({"max_length": 10.5}, "max_length", "expected a positive integer"),
    ],
)
def test_settings_validation(kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        PathNormalization(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.value == kwargs[field]
    assert str(info.value) == f"{field}: {message}"


def test_default_instance() -> None:
    assert PathNormalization() == DEFAULT_PATH_NORMALIZATION
    assert DEFAULT_PATH_NORMALIZATION.escaped_slashes == "reject"
    assert DEFAULT_PATH_NORMALIZATION.backslash == "reject"
    assert DEFAULT_PATH_NORMALIZATION.merge_slashes is True
    assert DEFAULT_PATH_NORMALIZATION.strip_params is False
    assert DEFAULT_PATH_NORMALIZATION.max_length == 8192


def test_encode_raw_path() -> None:
    assert encode_raw_path(b"/api/items") == "/api/items"
    assert encode_raw_path(b"/caf\xc3\xa9") == "/caf%C3%A9"
    assert STRICT.normalize(encode_raw_path(b"/caf\xc3\xa9")) == STRICT.normalize("/caf%c3%a9")
    assert STRICT.normalize(encode_raw_path("/café".encode())) == STRICT.normalize("/café")
    with pytest.raises(InvalidPath) as info:
        STRICT.normalize(encode_raw_path(b"/\xff"))
    assert info.value.reason == "invalid-utf8"


# -- properties -------------------------------------------------------------------------

_PIECES = [
    "/",
    "//",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    ";",
    ";x=1",
    "a",
    "admin",
    "%61",
    "%41",
    "%7e",
    "%",
    "%z",
    "%4",
    "?",
    "#",
    "é",
    "%C3%A9",
    "%c3",
    "%C0%AE",
    " ",
    "%20",
    "%00",
    "\x00",
    "%25",
    "~",
    "*",
    "{",
    "\udcff",
    "%3B",
]
paths = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(_PIECES), max_size=20).map("".join),
)
SETTINGS = [
    STRICT,
    DECODE,
    KEEP,
    NO_MERGE,
    BACKSLASH,
    PARAMS,
    PathNormalization(escaped_slashes="decode", merge_slashes=False, strip_params=True),
    PathNormalization.from_istio("BASE"),
]
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CANONICAL_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_REASONS = {
    "too-long",
    "control-character",
    "invalid-percent-encoding",
    "invalid-utf8",
    "escaped-slash",
    "backslash",
    "ambiguous-dot-segment",
}


@pytest.mark.parametrize("normalization", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
@settings(max_examples=300, deadline=None)
@given(raw=paths)
def test_normalize_properties(normalization: PathNormalization, raw: str) -> None:
    try:
        result = normalization.normalize(raw)
    except InvalidPath as exc:
        assert exc.reason in _REASONS
        return
    assert result.startswith("/")
    assert normalization.normalize(result) == result
    assert _CANONICAL_CHARS.fullmatch(result)
    for forbidden in ("/./", "/../", "/.;", "/..;", "?", "#", "\\"):
        assert forbidden not in result
    assert not result.endswith(("/.", "/.."))
    if normalization.merge_slashes:
        assert "//" not in result
    if normalization.strip_params:
        assert ";" not in result
    for escape in _ESCAPE.findall(result):
        assert escape == escape.upper()
        assert chr(int(escape, 16)) not in _UNRESERVED
    assert "%" not in _ESCAPE.sub("", result)


@settings(max_examples=300, deadline=None)
@given(raw=paths)
def test_normalize_is_idempotent_across_query_cut(raw: str) -> None:
    try:
        expected = STRICT.normalize(raw)
    except InvalidPath:
        return
    assert STRICT.normalize(expected + "?q=1#f") == expected
