"""Parsing Envoy's ``x-forwarded-client-cert`` (XFCC) header.

Format (Envoy's documentation): elements separated by ``,``; each element is ``key=value``
pairs separated by ``;``; a value that contains ``,`` ``;`` or ``=`` is double-quoted, and a
``"`` inside a quoted value is written ``\\"``. Keys are ``By``, ``Hash``, ``Cert``, ``Chain``,
``Subject``, ``URI`` and ``DNS`` (case-insensitive here); ``URI`` and ``DNS`` may repeat.
Each proxy appends one element describing *its* client, so the last element describes the
client of the nearest proxy — the one meshware trusts.

Limits keep hostile values cheap to refuse: the header is at most ``max_bytes`` long and has at
most ``max_elements`` elements; anything malformed raises :class:`InvalidXfcc` naming what is
wrong and where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from meshware.exceptions import InvalidXfcc

MAX_XFCC_BYTES = 32 * 1024
MAX_XFCC_ELEMENTS = 16
_KNOWN_KEYS = {
    "by": "By",
    "hash": "Hash",
    "cert": "Cert",
    "chain": "Chain",
    "subject": "Subject",
    "uri": "URI",
    "dns": "DNS",
}


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One element of the header: the certificate facts one proxy saw for its client.

    Attributes:
        by: the proxy's own identity (``By``), if given.
        hash: SHA-256 hex digest of the client certificate (``Hash``).
        cert: the client certificate in PEM, URL-decoded (``Cert``).
        chain: the client chain in PEM, URL-decoded (``Chain``).
        subject: the certificate subject (``Subject``).
        uris: the certificate's URI SANs (``URI``, repeated).
        dns: the certificate's DNS SANs (``DNS``, repeated).
    """

    by: tuple[str, ...] = ()
    hash: str | None = None
    cert: str | None = None
    chain: str | None = None
    subject: str | None = None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = field(default=())


def _split_pairs(element: str, index: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(element)
    while i < n:
        eq = element.find("=", i)
        semi = element.find(";", i)
        if eq < 0 or (0 <= semi < eq):
            raise InvalidXfcc(
                f"x-forwarded-client-cert element {index}: expected key=value at offset {i}",
                reason="xfcc-malformed",
            )
        key = element[i:eq].strip()
        if not key:
            raise InvalidXfcc(
                f"x-forwarded-client-cert element {index}: empty key at offset {i}",
                reason="xfcc-malformed",
            )
        j = eq + 1
        if j < n and element[j] == '"':
            value_chars: list[str] = []
            j += 1
            while True:
                if j >= n:
                    raise InvalidXfcc(
                        f"x-forwarded-client-cert element {index}: unbalanced quote in {key}",
                        reason="xfcc-unbalanced-quote",
                    )
                c = element[j]
                if c == "\\" and j + 1 < n:
                    value_chars.append(element[j + 1])
                    j += 2
                    continue
                if c == '"':
                    j += 1
                    break
                value_chars.append(c)
                j += 1
            value = "".join(value_chars)
            rest = element[j:].lstrip()
            if rest and not rest.startswith(";"):
                raise InvalidXfcc(
                    f"x-forwarded-client-cert element {index}: text after the quoted {key} value",
                    reason="xfcc-malformed",
                )
            j = n - len(rest) + (1 if rest else 0)
        else:
            end = element.find(";", j)
            end = n if end < 0 else end
            value = element[j:end].strip()
            if '"' in value:
                raise InvalidXfcc(
                    f"x-forwarded-client-cert element {index}: stray quote in {key}",
                    reason="xfcc-unbalanced-quote",
                )
            j = end + 1
        pairs.append((key, value))
        i = j
    return pairs


def _split_elements(header: str) -> list[str]:
    elements: list[str] = []
    start, quoted, i, n = 0, False, 0, len(header)
    while i < n:
        c = header[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            elements.append(header[start:i])
            start = i + 1
            if len(elements) > MAX_XFCC_ELEMENTS:
                break
        i += 1
    if quoted:
        raise InvalidXfcc(
            "x-forwarded-client-cert: unbalanced quote", reason="xfcc-unbalanced-quote"
        )
    elements.append(header[start:])
    return elements


def parse_xfcc(header: str) -> list[XfccElement]:
    """Parse a header value into its elements, first (farthest proxy) to last (nearest).

    Raises:
        InvalidXfcc: the value is too long, has too many elements, has an empty element,
            an unbalanced quote, a pair without ``=``, an unknown key, or a repeated
            single-valued key.
    """
    if len(header) > MAX_XFCC_BYTES:
        raise InvalidXfcc(
            f"x-forwarded-client-cert is {len(header)} bytes; at most {MAX_XFCC_BYTES} accepted",
            reason="xfcc-too-large",
        )
    raw_elements = _split_elements(header)
    if len(raw_elements) > MAX_XFCC_ELEMENTS:
        raise InvalidXfcc(
            f"x-forwarded-client-cert has more than {MAX_XFCC_ELEMENTS} elements",
            reason="xfcc-too-many-elements",
        )
    elements: list[XfccElement] = []
    for index, raw in enumerate(raw_elements):
        if not raw.strip():
            raise InvalidXfcc(
                f"x-forwarded-client-cert element {index} is empty", reason="xfcc-malformed"
            )
        single: dict[str, str] = {}
        multi: dict[str, list[str]] = {"By": [], "URI": [], "DNS": []}
        for key, value in _split_pairs(raw.strip(), index):
            canonical = _KNOWN_KEYS.get(key.lower())
            if canonical is None:
                raise InvalidXfcc(
                    f"x-forwarded-client-cert element {index}: unknown key {key[:40]!r} "
                    f"(expected one of {', '.join(_KNOWN_KEYS.values())})",
                    reason="xfcc-unknown-key",
                )
            if canonical in multi:
                multi[canonical].append(value)
            elif canonical in single:
                raise InvalidXfcc(
                    f"x-forwarded-client-cert element {index}: {canonical} appears twice",
                    reason="xfcc-malformed",
                )
            else:
                single[canonical] = value
        elements.append(
            XfccElement(
                by=tuple(multi["By"]),
                hash=single.get("Hash"),
                cert=unquote(single["Cert"]) if "Cert" in single else None,
                chain=unquote(single["Chain"]) if "Chain" in single else None,
                subject=single.get("Subject"),
                uris=tuple(multi["URI"]),
                dns=tuple(multi["DNS"]),
            )
        )
    return elements
