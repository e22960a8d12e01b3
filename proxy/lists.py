"""Lists that show what the caller may open: a list route's recordings, checked per item.

A policy's `lists:` mode applies to every route with a `list:` section (the presets name
theirs, docs/policy.md):

- `pass` (the default): the list goes to the client as the upstream sent it.
- `annotate`: each recording the caller holds no grant for gets a `"jitgate"` field,
  `{"locked": true, "scope": ..., "request_url": "/_jit/request?scope=..."}`, so a UI can
  show a lock and a link to ask for access instead of an error when it is opened.
- `filter`: those recordings are removed from the list.

Every id of one list is checked in one batched grant lookup (one Redis round trip). An
item whose id cannot be made into a scope counts as locked. If the grants cannot be
checked, every item is removed, in either mode: nothing is shown as open while in doubt.

The body is held up to the policy's `list_max_bytes` (the batched lookup needs every id
before the first byte can be sent) and parsed whole by the standard library's C parser:
memory stays bounded by the cap, and a larger list is streamed on untouched without
holding more, with a warning and `jitgate_list_responses{outcome="over_cap"}`. Only 200
JSON answers are rewritten; gzip and deflate bodies are decoded (the request asks the
upstream for `identity` anyway) and the rewritten list is sent uncompressed with its own
Content-Length. Anything else passes unchanged and is counted: a malformed or differently
shaped body (`malformed`, `shape`) or another encoding (`encoded`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .policy import Listing, Policy

log = logging.getLogger("jitgate.lists")

_INLINE_MAX = 256 * 1024  # larger bodies are parsed in a worker thread
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_BAD_ID = frozenset("/{}")
# What a list request asks of the upstream, and the client headers it does not pass on: a
# part of a list, or a 304 for a list cached before a grant changed, would pass unchecked.
LIST_REQUEST_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}
LIST_DROP_HEADERS = frozenset({"range", "if-range", "if-none-match", "if-modified-since"})
_DROP = ("content-length", "content-encoding", "etag", "content-md5", "digest")

Checker = Any  # a GrantChecker, with check_many where the store has it
Count = Callable[[str], None]  # counts one outcome


class ListRewrite:
    """One list response's rewrite (forward.AsyncBodyRewrite), for one caller."""

    def __init__(
        self,
        mode: str,
        listing: Listing,
        params: Mapping[str, str],
        policy: Policy,
        grants: Checker,
        user: str,
        prefix: str,
        count: Count,
        route: str,
    ) -> None:
        self.mode = mode
        self.listing = listing
        self.params = dict(params)
        self.policy = policy
        self.grants = grants
        self.user = user
        self.prefix = prefix
        self.count = count
        self.route = route
        self.limit = policy.list_max_bytes
        self.note: str | None = None  # what was done, for the request's audit reasons

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        kind = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return status == 200 and (kind == "application/json" or kind.endswith("+json"))

    def fell_back(self, why: str) -> None:
        """The body was not rewritten and went on as it came (over the cap)."""
        log.warning("list on route %s passed unchanged: %s", self.route, why)
        self.note = f"list passed unchanged: {why}"
        self.count(why)

    async def rewrite(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        """Return the list's new headers and body, or None to send it as it came."""
        decoded = decode(headers, body, self.limit)
        if isinstance(decoded, str):
            self.fell_back(decoded)
            return None
        body = decoded
        if len(body) > _INLINE_MAX:
            parsed = await asyncio.to_thread(_parse, body, self.listing.items)
        else:
            parsed = _parse(body, self.listing.items)
        if isinstance(parsed, str):
            self.fell_back(parsed)
            return None
        doc, items = parsed
        scopes = [self._scope(item) for item in items]
        try:
            held = await self._check([s for s in scopes if s is not None])
        except Exception as exc:  # fail closed: nothing is shown as open while in doubt
            log.warning(
                "grants of a list on route %s not checked (%r): all removed", self.route, exc
            )
            self.note = f"list emptied: grants not checked ({type(exc).__name__})"
            items.clear()
            self.count("unavailable")
        else:
            total = len(items)
            locked = self._apply(items, scopes, held)
            self.note = f"list {self.mode}: {locked} of {total} locked"
            self.count(self.mode)
        if len(body) > _INLINE_MAX:
            out = await asyncio.to_thread(dump, doc)
        else:
            out = dump(doc)
        return changed_headers(headers, len(out)), out

    def _scope(self, item: object) -> str | None:
        if not isinstance(item, dict):
            return None
        value = item.get(self.listing.id)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value or not _BAD_ID.isdisjoint(value):
            return None
        return self.listing.scope.format_map({**self.params, self.listing.var: value})

    async def _check(self, scopes: list[str]) -> dict[str, bool]:
        """Whether a grant covers each scope: one batched lookup for all of them."""
        unique = sorted(set(scopes))
        groups = [self.policy.covering(s) for s in unique]
        batch = getattr(self.grants, "check_many", None)
        if batch is not None:
            found = await batch(self.user, groups)
        else:  # a checker without a batch call (a simulation): one check each
            checks = [self.grants.check(self.user, g) for g in groups]
            found = [r is not None for r in await asyncio.gather(*checks)]
        if len(found) != len(unique):
            raise RuntimeError("the grant store answered for the wrong number of scopes")
        return dict(zip(unique, (bool(f) for f in found), strict=True))

    def _apply(self, items: list[Any], scopes: list[str | None], held: dict[str, bool]) -> int:
        """Mark or remove the items not held in place; return how many were not held."""
        kept: list[Any] = []
        for item, scope in zip(items, scopes, strict=True):
            if scope is not None and held.get(scope, False):
                kept.append(item)
            elif self.mode == "annotate" and isinstance(item, dict):
                item["jitgate"] = self._marker(scope)
                kept.append(item)
        locked = len(items) - sum(1 for s in scopes if s is not None and held.get(s, False))
        items[:] = kept
        return locked

    def _marker(self, scope: str | None) -> dict[str, Any]:
        if scope is None:
            return {"locked": True, "scope": None, "request_url": None}
        url = URL(f"{self.prefix}/request").with_query(scope=scope)
        return {"locked": True, "scope": scope, "request_url": str(url)}


def decode(headers: MultiMapping[str], body: bytes, limit: int) -> bytes | str:
    """The body without its gzip or deflate encoding, or why not: encoded, malformed, over_cap."""
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _DECODERS:
        return "encoded"
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        body = decoder.decompress(body, limit + 1)
    except zlib.error:
        return "malformed"
    if len(body) > limit or decoder.unconsumed_tail:
        return "over_cap"
    return body


def _parse(body: bytes, path: tuple[str, ...]) -> tuple[Any, list[Any]] | str:
    """Return the document and its list of items, or why it cannot be rewritten."""
    try:
        doc = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return "malformed"
    node = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return "shape"
        node = node[key]
    return (doc, node) if isinstance(node, list) else "shape"


def changed_headers(headers: MultiMapping[str], length: int) -> CIMultiDict[str]:
    """The headers of a JSON body jitgate changed: its own length, uncompressed, not cached."""
    new = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _DROP)
    new["Content-Length"] = str(length)
    new["Cache-Control"] = "no-store"  # what it shows changes with the caller's grants
    return new


def dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
