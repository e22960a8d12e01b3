"""One normalised request path: the path the policy decides on is the path sent upstream.

Normalisation decodes percent-encoded unreserved characters, upper-cases the
remaining escapes, resolves dot segments and merges empty segments. Anything
that different servers could read differently is refused instead: encoded
`/`, `\\`, `#`, NUL and other control characters, double encoding such as
`%252f`, raw characters outside RFC 3986, escapes that do not decode as UTF-8
(overlong forms such as `%C0%AF`, surrogates, stray bytes: servers replace,
re-escape or pass them, so `%C0` and `%C1` could become one recording id), and
(by default) `;` parameters, which some servers strip before routing.
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote_to_bytes

from .errors import BadPath

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_ALLOWED = _UNRESERVED | _SUB_DELIMS | frozenset(":@/%")
_HEX = frozenset(string.hexdigits)
# Bytes whose encoded form would change meaning once an upstream decodes it.
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_FORBIDDEN_ENCODED = {0x2F: "'/'", 0x5C: "'\\'", 0x23: "'#'", 0x00: "NUL"}


def split_target(raw_target: str) -> tuple[str, str]:
    """Split a raw request target into (path, query); refuse fragments."""
    if "#" in raw_target:
        raise BadPath("a request target must not carry a fragment ('#')")
    path, _, query = raw_target.partition("?")
    return path, query


def normalise(raw_path: str, *, reject_semicolons: bool = True) -> str:
    """Return the single canonical form of a raw, still percent-encoded path."""
    if not raw_path.startswith("/"):
        raise BadPath("the path must start with '/'")
    out: list[str] = []
    i, n = 0, len(raw_path)
    while i < n:
        ch = raw_path[i]
        if ch == "%":
            out.append(_decode_escape(raw_path, i, reject_semicolons))
            i += 3
            continue
        if ch not in _ALLOWED:
            if ch == "\\":
                raise BadPath("'\\' is not allowed in paths")
            raise BadPath(f"character {ch!r} is not allowed in paths")
        if ch == ";" and reject_semicolons:
            raise BadPath("';' path parameters are not allowed")
        out.append(ch)
        i += 1
    path = "".join(out)
    if _DOUBLE.search(path):
        # %25 followed by hex digits that were themselves encoded (%25%32%66): the same
        # double encoding as %252f once an upstream decodes the digits.
        raise BadPath("double percent-encoding is not allowed in paths")
    if "%" in path:
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadPath("percent-escapes that are not UTF-8 are not allowed in paths") from None
    return _resolve_segments(path)


def _decode_escape(raw: str, i: int, reject_semicolons: bool) -> str:
    pair = raw[i + 1 : i + 3]
    if len(pair) != 2 or not all(c in _HEX for c in pair):
        raise BadPath(f"malformed percent-escape at offset {i}")
    byte = int(pair, 16)
    if byte in _FORBIDDEN_ENCODED:
        raise BadPath(f"encoded {_FORBIDDEN_ENCODED[byte]} is not allowed in paths")
    if byte < 0x20 or byte == 0x7F:
        raise BadPath("encoded control characters are not allowed in paths")
    if byte == 0x3B and reject_semicolons:
        raise BadPath("encoded ';' is not allowed in paths")
    if byte == 0x25:
        nxt = raw[i + 3 : i + 5]
        if len(nxt) == 2 and all(c in _HEX for c in nxt):
            raise BadPath("double percent-encoding is not allowed in paths")
    char = chr(byte)
    if char in _UNRESERVED:
        return char
    return "%" + pair.upper()


def _resolve_segments(path: str) -> str:
    stack: list[str] = []
    segments = path.split("/")[1:]
    trailing = False
    for seg in segments:
        trailing = seg in ("", ".", "..")
        if seg == "..":
            if stack:
                stack.pop()
        elif seg not in ("", "."):
            stack.append(seg)
    if not stack:
        return "/"
    return "/" + "/".join(stack) + ("/" if trailing else "")
