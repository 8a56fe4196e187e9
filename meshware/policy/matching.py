"""Istio-style value matching, compiled once and cheap to apply on every request.

Istio's authorization fields take string values with four forms, and IP fields take
addresses or CIDR blocks:

=============  ==================  ============================================
form           example             matches
=============  ==================  ============================================
exact          ``/api/orders``     that value only
prefix         ``/api/*``          values that start with ``/api/``
suffix         ``*.internal``      values that end with ``.internal``
presence       ``*``               any non-empty value (never a missing one)
path template  ``/api/{*}/items``  (paths only) ``{*}`` one segment, ``{**}`` the rest
IP / CIDR      ``10.0.0.0/8``      addresses inside the block
=============  ==================  ============================================

A matcher is an *any-of* set: it matches when at least one of its patterns does. The
patterns are sorted once into a frozenset of exact values and tuples of prefixes and
suffixes, so a match is a set lookup plus one ``str.startswith`` / ``str.endswith`` call.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence

from meshware.exceptions import ConfigurationError

__all__ = ["IPMatcher", "StringMatcher", "parse_ip", "port_set"]

# RFC 3986 pchar without "*" and "=", as Envoy's URI-template matcher defines a segment.
_SEGMENT_CHARS = r"A-Za-z0-9\-._~%!$&'()+,;:@"
_ONE_SEGMENT = f"[{_SEGMENT_CHARS}]+"
_ANY_SEGMENTS = f"[{_SEGMENT_CHARS}/]*"
_TEMPLATE_LITERAL = re.compile(r"[A-Za-z0-9\-._~%!$&'()+,;:@=]+\Z")
_MATCH_ONE = "{*}"
_MATCH_ANY = "{**}"


def _type_name(value: object) -> str:
    return type(value).__name__


class StringMatcher:
    """An any-of set of Istio string patterns, compiled once.

    Args:
        patterns: the values as written in a policy: ``"abc"`` (exact), ``"abc*"``
            (prefix), ``"*abc"`` (suffix) or ``"*"`` (presence: any non-empty value).
            A ``*`` anywhere else is rejected rather than taken literally, because it
            is almost always a mistake that would silently never match.
        field: the name of the setting the patterns come from; errors name
            ``field[index]``.
        ignore_case: match case-insensitively (Istio's ``hosts``).
        path_templates: also accept Istio's path templates, where a whole segment
            ``{*}`` matches exactly one path segment and a final ``{**}`` matches zero or
            more segments (``/api/{*}/items``, ``/static/{**}``).

    Raises:
        ConfigurationError: a pattern is not a non-empty string or is malformed.

    Attributes:
        patterns: the patterns as given, in order.
        exact: the exact values (lower-cased when ``ignore_case``).
        prefixes: the prefixes of ``abc*`` patterns.
        suffixes: the suffixes of ``*abc`` patterns.
        presence: whether ``*`` is among the patterns.
        fast: a callable equivalent to :meth:`match`, specialized to the patterns'
            shape (a bare ``frozenset.__contains__`` for exact values only).
    """

    __slots__ = (
        "_templates",
        "exact",
        "fast",
        "ignore_case",
        "patterns",
        "prefixes",
        "presence",
        "suffixes",
    )

    patterns: tuple[str, ...]
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool
    ignore_case: bool
    fast: Callable[[str], bool]
    _templates: tuple[re.Pattern[str], ...]

    def __init__(
        self,
        patterns: Iterable[str],
        *,
        field: str = "patterns",
        ignore_case: bool = False,
        path_templates: bool = False,
    ) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        templates: list[re.Pattern[str]] = []
        presence = False
        given = tuple(patterns)
        for index, pattern in enumerate(given):
            where = f"{field}[{index}]"
            if not isinstance(pattern, str):
                raise ConfigurationError(
                    f"expected a string, got {_type_name(pattern)}", field=where, value=pattern
                )
            if not pattern:
                raise ConfigurationError(
                    "empty value not allowed; expected a non-empty string", field=where, value=""
                )
            value = pattern.lower() if ignore_case else pattern
            if value == "*":
                presence = True
            elif path_templates and ("{" in value or "}" in value):
                templates.append(_compile_template(value, where))
            elif value.startswith("*"):
                _no_inner_star(value[1:], where, pattern, path_templates)
                suffixes.append(value[1:])
            elif value.endswith("*"):
                _no_inner_star(value[:-1], where, pattern, path_templates)
                prefixes.append(value[:-1])
            else:
                _no_inner_star(value, where, pattern, path_templates)
                exact.add(value)
        self.patterns = given
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.presence = presence
        self.ignore_case = ignore_case
        self._templates = tuple(templates)
        self.fast = self._specialize()

    def _specialize(self) -> Callable[[str], bool]:
        # The common shapes get a C-level callable instead of the general match().
        if self.ignore_case or self._templates:
            return self.match
        exact, prefixes, suffixes = self.exact, self.prefixes, self.suffixes
        if self.presence:
            return bool
        if not prefixes and not suffixes:
            return exact.__contains__
        if not exact and not suffixes:
            return lambda value: value.startswith(prefixes)
        if not exact and not prefixes:
            return lambda value: value.endswith(suffixes)
        return self.match

    def match(self, value: str) -> bool:
        """Return whether ``value`` matches at least one pattern."""
        if self.ignore_case:
            value = value.lower()
        if self.presence:
            return value != ""
        if value in self.exact:
            return True
        if self.prefixes and value.startswith(self.prefixes):
            return True
        if self.suffixes and value.endswith(self.suffixes):
            return True
        if self._templates:
            for template in self._templates:
                if template.fullmatch(value):
                    return True
        return False

    def match_any(self, values: Iterable[str]) -> bool:
        """Return whether at least one of ``values`` matches (list-valued JWT claims)."""
        return any(self.match(value) for value in values)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"StringMatcher({list(self.patterns)!r})"


def _no_inner_star(body: str, where: str, pattern: str, path_templates: bool) -> None:
    if "*" in body:
        hint = "; use {*} or {**} for whole path segments" if path_templates else ""
        raise ConfigurationError(
            f"wildcard '*' is only supported as the whole value or at its start or end{hint}",
            field=where,
            value=pattern,
        )


def _compile_template(pattern: str, where: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ConfigurationError("a path template must start with '/'", field=where, value=pattern)
    parts: list[str] = []
    seen_any = False
    segments = pattern[1:].split("/")
    trailing_slash = len(segments) > 1 and segments[-1] == ""
    if trailing_slash:
        segments.pop()
    for segment in segments:
        if segment in (_MATCH_ONE, _MATCH_ANY):
            if seen_any:
                raise ConfigurationError(
                    "{**} must be the last operator of a path template", field=where, value=pattern
                )
            seen_any = segment == _MATCH_ANY
            parts.append(_ANY_SEGMENTS if seen_any else _ONE_SEGMENT)
        elif "{" in segment or "}" in segment:
            raise ConfigurationError(
                "'{' or '}' is only supported in whole-segment path templates {*} and {**}",
                field=where,
                value=pattern,
            )
        elif not _TEMPLATE_LITERAL.match(segment):
            raise ConfigurationError(
                f"path template segment {segment!r} is not a valid path literal",
                field=where,
                value=pattern,
            )
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts) + ("/" if trailing_slash else ""))


def parse_ip(address: str) -> tuple[int, int] | None:
    """Parse an IP address into ``(version, integer value)``, or ``None`` if it is not one.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are taken as the IPv4 address they
    carry, so that IPv4 blocks match peers reported by a dual-stack socket. Brackets
    (``[::1]``) and an IPv6 zone (``fe80::1%eth0``) are ignored.
    """
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):
        pass
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    address = address.partition("%")[0]
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


class IPMatcher:
    """An any-of set of IP addresses and CIDR blocks (``10.1.2.3``, ``10.0.0.0/8``).

    Args:
        blocks: single addresses or CIDR blocks, IPv4 or IPv6. Host bits set in a
            block (``10.1.2.3/16``) are ignored, as Envoy does.
        field: the name of the setting; errors name ``field[index]``.

    Raises:
        ConfigurationError: an entry is not a string or not an address or block.

    Attributes:
        blocks: the blocks as given, in order.
    """

    __slots__ = ("_v4", "_v6", "blocks")

    blocks: tuple[str, ...]
    _v4: tuple[tuple[int, int], ...]
    _v6: tuple[tuple[int, int], ...]

    def __init__(self, blocks: Iterable[str], *, field: str = "ip_blocks") -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        given = tuple(blocks)
        for index, block in enumerate(given):
            where = f"{field}[{index}]"
            if not isinstance(block, str):
                raise ConfigurationError(
                    f"expected a string, got {_type_name(block)}", field=where, value=block
                )
            try:
                network = ipaddress.ip_network(block, strict=False)
            except ValueError as exc:
                raise ConfigurationError(
                    "bad IP address or CIDR block; expected an address like 10.1.2.3 or a "
                    "block like 10.0.0.0/8",
                    field=where,
                    value=block,
                ) from exc
            entry = (int(network.network_address), int(network.netmask))
            (v4 if network.version == 4 else v6).append(entry)
        self.blocks = given
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)

    def match(self, address: str) -> bool:
        """Return whether ``address`` lies in one of the blocks (``False`` if unparsable)."""
        parsed = parse_ip(address)
        if parsed is None:
            return False
        version, value = parsed
        for network, mask in self._v4 if version == 4 else self._v6:
            if value & mask == network:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def __repr__(self) -> str:
        return f"IPMatcher({list(self.blocks)!r})"


def port_set(ports: Sequence[object], *, field: str = "ports") -> frozenset[int]:
    """Validate port numbers (0-65535, as ``int``) and return them as a frozenset.

    Raises:
        ConfigurationError: an entry is not an integer in range.
    """
    result: set[int] = set()
    for index, port in enumerate(ports):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(
                "bad port; expected an integer from 0 to 65535",
                field=f"{field}[{index}]",
                value=port,
            )
        result.add(port)
    return frozenset(result)
