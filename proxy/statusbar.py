"""The optional status bar: a grant's time left, injected into the replay tool's HTML pages.

Only whole pages are changed: a 200 text/html answer to a GET for a top-level document,
at most MAX_PAGE bytes both as received and once decoded, plain or gzip/deflate (br when
the brotli module can decode with a bounded output). Anything else, or a page whose
Content-Security-Policy cannot be extended safely, is sent on byte for byte.
"""

from __future__ import annotations

import base64
import html
import importlib
import re
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, MultiMapping

brotli: Any
try:
    brotli = importlib.import_module("brotli")
except ImportError:  # br pages are then left alone
    brotli = None

MAX_PAGE = 5 * 1024 * 1024

# The bar's files are served with the pages' static files; the byte path reads them here.
_STATIC = Path(__file__).parent / "web" / "static"
_CSS = (_STATIC / "statusbar.css").read_text()
_JS = (_STATIC / "statusbar.js").read_text()
# Both are inlined: a closing tag inside them would end the element early.
assert "</" not in _CSS and "</" not in _JS

_CSP_HEADERS = ("Content-Security-Policy", "Content-Security-Policy-Report-Only")
# A changed body no longer matches these; a cached copy would hold a stale nonce and time.
_DROP = (
    "Content-Encoding",
    "Content-Length",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
    "Content-MD5",
    "Digest",
    "Content-Digest",
    "Repr-Digest",
)
# Where a browser looks for the rule over each kind of inline content, nearest first
# (CSP3 "effective directive" fallback). The bar uses elements only, but adding a nonce to
# a directive also changes what it means for the page's own inline attributes.
_FALLBACKS = {
    "script": ("script-src-elem", "script-src", "default-src"),
    "script-attr": ("script-src-attr", "script-src", "default-src"),
    "style": ("style-src-elem", "style-src", "default-src"),
    "style-attr": ("style-src-attr", "style-src", "default-src"),
}
_META_CSP = re.compile(rb"<meta[^>]*?http-equiv\s*=\s*[\"']?\s*content-security-policy", re.I)
_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")


class StatusBar:
    """Decides, per request, whether the bar may go into the page; built once from settings."""

    def __init__(self, prefix: str, *, limit: int = MAX_PAGE) -> None:
        self.access_url = f"{prefix}/access"
        self.limit = limit

    def for_request(
        self, method: str, headers: Mapping[str, str], expires_at: float
    ) -> PageBar | None:
        """Return the rewrite for one request under a grant ending at expires_at, if any."""
        if method != "GET":
            return None
        # A browser says what it loads: only a top-level page gets the bar, not a frame
        # (the player may embed pages) nor an HTML fragment fetched by a script.
        dest = headers.get("Sec-Fetch-Dest")
        if dest is not None and dest.lower() != "document":
            return None
        return PageBar(self, expires_at)


class PageBar:
    """One page's rewrite (forward.BodyRewrite): a fresh nonce, the grant's expiry."""

    def __init__(self, bar: StatusBar, expires_at: float, clock: Callable[[], float] = time.time):
        self._bar = bar
        self.limit = bar.limit
        self.expires_at = expires_at
        self._clock = clock
        self.nonce = base64.b64encode(secrets.token_bytes(18)).decode()

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        if status != 200 or "Content-Range" in headers:
            return False
        types = headers.getall("Content-Type", ())
        if len(types) != 1 or not _is_html(types[0]):
            return False
        if headers.get("Content-Disposition", "").strip().lower().startswith("attachment"):
            return False
        # RFC 9111 5.2.2.6: an intermediary must not change a no-transform response.
        controls = ",".join(headers.getall("Cache-Control", ())).lower()
        if "no-transform" in controls:
            return False
        codings = headers.getall("Content-Encoding", ())
        if len(codings) > 1 or _decoder(codings[0] if codings else "") is None:
            return False
        length = headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return False
        return _csp_headers(headers, self.nonce) is not None

    def apply(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        coding = headers.get("Content-Encoding", "")
        decode = _decoder(coding)
        csp = _csp_headers(headers, self.nonce)
        if decode is None or csp is None:
            return None
        page = decode(body, self.limit)
        # A page whose bytes are not ASCII-compatible would be garbled by the ASCII bar; a
        # <meta> policy cannot be extended from here, so the bar would only break it.
        if page is None or page[:2] in (b"\xfe\xff", b"\xff\xfe") or _META_CSP.search(page):
            return None
        snippet = self.render().encode("ascii")
        # The last </body>: an earlier one may sit in a script's string.
        at = page.lower().rfind(b"</body")
        if at < 0:
            at = len(page)
        out = page[:at] + snippet + page[at:]
        new = CIMultiDict(headers)
        for name in (*_DROP, *_CSP_HEADERS):
            new.popall(name, None)
        for name, values in csp.items():
            for value in values:
                new.add(name, value)
        # The bar is this user's and this moment's: no cache may keep or reuse it.
        new["Cache-Control"] = "private, no-store"
        new["Content-Length"] = str(len(out))
        return new, out

    def render(self) -> str:
        """Return the bar's markup, style and script: ASCII only, every value escaped."""
        left = max(0, round(self.expires_at - self._clock()))
        until = datetime.fromtimestamp(self.expires_at, UTC)
        nonce = html.escape(self.nonce)
        return (
            f'<div id="jitgate-statusbar" data-left="{left}" lang="en" dir="ltr">'
            '<input type="checkbox" id="jitgate-sb-hide" class="jitgate-sb-hide"'
            ' aria-label="Hide the jitgate access bar">'
            '<div class="jitgate-sb-bar" role="region" aria-label="jitgate access">'
            f'<span>Access: <span class="jitgate-sb-left">{_minutes(left)}</span></span>'
            '<span class="jitgate-sb-until">until '
            f'<time datetime="{until.strftime("%Y-%m-%dT%H:%M:%SZ")}">'
            f"{until.strftime('%Y-%m-%d %H:%M')} UTC</time></span>"
            f'<a href="{html.escape(self._bar.access_url)}">My access</a>'
            '<label for="jitgate-sb-hide" class="jitgate-sb-close" title="Hide">&times;</label>'
            "</div></div>"
            f'<style nonce="{nonce}">{_CSS}</style>'
            f'<script nonce="{nonce}">{_JS}</script>'
        )


def _minutes(seconds: int) -> str:
    if seconds <= 0:
        return "access ended"
    if seconds < 60:
        return "under a minute left"
    return f"{seconds // 60} min left"


def _is_html(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "text/html":
        return False
    # UTF-16 and UTF-32 pages are not ASCII-compatible: the bar's bytes would not be text.
    charset = re.search(r"charset\s*=\s*\"?([\w.:-]+)", params, re.I)
    return charset is None or not charset.group(1).lower().startswith(("utf-16", "utf-32"))


def _decoder(coding: str) -> Callable[[bytes, int], bytes | None] | None:
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return lambda data, limit: data if len(data) <= limit else None
    if coding in ("gzip", "x-gzip"):
        return lambda data, limit: _inflate(data, 16 + zlib.MAX_WBITS, limit)
    if coding == "deflate":
        return _deflate
    if coding == "br" and brotli is not None:
        return _brotli
    return None


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | None:
    """Decompress one whole stream, never producing more than limit bytes (no bombs)."""
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or d.unconsumed_tail or not d.eof or d.unused_data:
        return None
    return out


def _deflate(data: bytes, limit: int) -> bytes | None:
    # HTTP's deflate is zlib-wrapped, but some servers send the raw stream.
    out = _inflate(data, zlib.MAX_WBITS, limit)
    return out if out is not None else _inflate(data, -zlib.MAX_WBITS, limit)


def _brotli(data: bytes, limit: int) -> bytes | None:
    d = brotli.Decompressor()
    try:
        # Only a brotli that can cap its output is used: an unbounded one is a bomb risk.
        out = d.process(data, output_buffer_limit=limit + 1)
    except TypeError:
        return None
    except brotli.error:
        return None
    if len(out) > limit or not d.is_finished():
        return None
    return bytes(out)


def _csp_headers(headers: MultiMapping[str], nonce: str) -> dict[str, list[str]] | None:
    """Return every CSP header with the nonce allowed, or None if one cannot take it safely.

    Report-only policies get the nonce too, so the bar causes no reports; they are held to
    the same rules, to keep the page and its reports exactly as the upstream meant them.
    """
    out: dict[str, list[str]] = {}
    for name in _CSP_HEADERS:
        values = []
        for value in headers.getall(name, ()):
            extended = extend_csp(value, nonce)
            if extended is None:
                return None
            values.append(extended)
        if values:
            out[name] = values
    return out


def extend_csp(value: str, nonce: str) -> str | None:
    """Allow <script nonce> and <style nonce> under a serialized CSP list, or return None.

    None when it cannot be done without changing what the page itself may do:
    - require-trusted-types-for: the page opted into Trusted Types; jitgate stays out;
    - a nonce would go into a directive whose 'unsafe-inline' the page relies on for its own
      inline scripts, styles or attributes (a nonce turns 'unsafe-inline' off), e.g.
      `default-src 'strict-dynamic' 'unsafe-inline'`, where scripts need a nonce but the
      styles that fall back to it rely on 'unsafe-inline';
    - anything but printable ASCII (not a policy this parser can vouch for).
    """
    if not _PRINTABLE.fullmatch(value):
        return None
    policies = []
    for policy in value.split(","):
        extended = _extend_policy(policy, nonce)
        if extended is None:
            return None
        policies.append(extended)
    return ", ".join(policies)


def _extend_policy(policy: str, nonce: str) -> str | None:
    directives = [d.split() for d in policy.split(";")]
    directives = [d for d in directives if d]
    first: dict[str, int] = {}  # a repeated directive is ignored by browsers: the first counts
    for n, tokens in enumerate(directives):
        first.setdefault(tokens[0].lower(), n)
    if "require-trusted-types-for" in first:
        return None
    effective: dict[str, int] = {}
    for kind, names in _FALLBACKS.items():
        found = next((first[n] for n in names if n in first), None)
        if found is not None:
            effective[kind] = found
    source = f"'nonce-{nonce}'"
    for kind in ("script", "style"):
        at = effective.get(kind)
        if at is None or _relies_on_inline(directives[at][1:], kind):
            continue  # no rule, or inline content already allowed: nothing to add
        name, *sources = directives[at]
        if source in sources:
            continue  # already added for the other kind (both fall back to default-src)
        if any(j == at and _relies_on_inline(sources, k) for k, j in effective.items()):
            return None
        # 'none' must stand alone: beside a nonce it would be ignored with a warning.
        if [s.lower() for s in sources] == ["'none'"]:
            sources = []
        directives[at] = [name, *sources, source]
    return "; ".join(" ".join(d) for d in directives)


def _relies_on_inline(sources: list[str], kind: str) -> bool:
    """Whether 'unsafe-inline' is what lets this kind of inline content run (CSP3 6.7.3.3)."""
    low = [s.lower() for s in sources]
    if "'unsafe-inline'" not in low:
        return False
    if any(s.startswith(("'nonce-", "'sha256-", "'sha384-", "'sha512-")) for s in low):
        return False
    return not (kind.startswith("script") and "'strict-dynamic'" in low)
