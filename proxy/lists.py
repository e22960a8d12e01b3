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

A route's `refs:` (refs.py) are checked by the same rewrite: the response is parsed once
and its list's ids and its references are looked up in one batch.

With `sensitivity:` rules, a recording a grant covers can still be locked by them, from
the metadata already known (listsensitivity.py): its marker then says why, in `"reason"`.
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

from . import refs as references
from .listsensitivity import Lock, Lookups, locks
from .policy import Listing, Policy, Ref

log = logging.getLogger("jitgate.lists")

_INLINE_MAX = 256 * 1024  # larger bodies are parsed in a worker thread
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# What a list request asks of the upstream, and the client headers it does not pass on: a
# part of a list, or a 304 for a list cached before a grant changed, would pass unchecked.
LIST_REQUEST_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}
LIST_DROP_HEADERS = frozenset({"range", "if-range", "if-none-match", "if-modified-since"})
_DROP = ("content-length", "content-encoding", "etag", "content-md5", "digest")

Checker = Any  # a GrantChecker, with check_many where the store has it
Count = Callable[[str], None]  # counts one outcome


class ListRewrite:
    """One list or references response's rewrite (forward.AsyncBodyRewrite), for one caller.

    `listing` is None when only the route's `refs` are checked; `count` and `count_refs`
    count what was done to each (the metrics' outcome label).
    """

    def __init__(
        self,
        mode: str,
        listing: Listing | None,
        params: Mapping[str, str],
        policy: Policy,
        grants: Checker,
        user: str,
        prefix: str,
        count: Count,
        route: str,
        refs: tuple[Ref, ...] = (),
        count_refs: Count = lambda outcome: None,
        sensitive: Lookups | None = None,
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
        self.refs = refs
        self.count_refs = count_refs
        self.sensitive = sensitive
        self.locks: dict[str, Lock] = {}  # the sensitivity rules' locks, by scope
        self.limit = policy.list_max_bytes
        self.note: str | None = None  # what was done, for the request's audit reasons

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        kind = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return status == 200 and (kind == "application/json" or kind.endswith("+json"))

    def fell_back(self, why: str) -> None:
        """The body was not rewritten and went on as it came (over the cap)."""
        what = "list" if self.listing is not None else "references"
        log.warning("%s on route %s passed unchanged: %s", what, self.route, why)
        self.note = f"{what} passed unchanged: {why}"
        if self.listing is not None:
            self.count(why)
        if self.refs:
            self.count_refs(why)

    async def rewrite(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        """Return the list's new headers and body, or None to send it as it came."""
        decoded = decode(headers, body, self.limit)
        if isinstance(decoded, str):
            self.fell_back(decoded)
            return None
        body = decoded
        path = self.listing.items if self.listing is not None else None
        if len(body) > _INLINE_MAX:
            parsed = await asyncio.to_thread(_parse, body, path)
        else:
            parsed = _parse(body, path)
        if isinstance(parsed, str) or (parsed[1] is None and not self.refs):
            self.fell_back(parsed if isinstance(parsed, str) else "shape")
            return None
        doc, items = parsed
        await self._change(doc, items)
        if len(body) > _INLINE_MAX:
            out = await asyncio.to_thread(dump, doc)
        else:
            out = dump(doc)
        return changed_headers(headers, len(out)), out

    async def _change(self, doc: Any, items: list[Any] | None) -> None:
        """Lock, in place, the list's items and the references the caller holds no grant for."""
        sites = references.find(doc, self.refs, self.params, self.policy, self.prefix)
        scopes = [self._scope(item) for item in items] if items is not None else []
        notes = []
        try:
            wanted = scopes + [site.scope for site in sites]
            grants = await self._check([s for s in wanted if s is not None])
            self.locks = await locks(self.policy.sensitivity, grants, self.sensitive)
            held = {s: bool(g) and s not in self.locks for s, g in grants.items()}
        except Exception as exc:  # fail closed: nothing is shown as open while in doubt
            log.warning("grants on route %s not checked (%r): all removed", self.route, exc)
            why = f"grants not checked ({type(exc).__name__})"
            if items is not None:
                items.clear()
                notes.append(f"list emptied: {why}")
                self.count("unavailable")
            if sites:
                references.apply(sites, None, self._marker)
                notes.append(f"references removed: {why}")
            if self.refs:
                self.count_refs("unavailable")
        else:
            if items is not None:
                total = len(items)
                locked = self._apply(items, scopes, held)
                notes.append(f"list {self.mode}: {locked} of {total} locked{self._why()}")
                self.count(self.mode)
            elif self.listing is not None:
                notes.append("list passed unchanged: shape")
                self.count("shape")
            if self.refs:
                locked = references.apply(sites, held, self._marker)
                notes.append(f"references: {locked} of {len(sites)} locked")
                self.count_refs("checked")
        self.note = "; ".join(notes) or None

    def _scope(self, item: object) -> str | None:
        assert self.listing is not None
        if not isinstance(item, dict):
            return None
        value = item.get(self.listing.id)
        return references.id_scope(value, self.listing.scope, self.listing.var, self.params)

    def _why(self) -> str:
        return f" ({len(self.locks)} by sensitivity rules)" if self.locks else ""

    async def _check(self, scopes: list[str]) -> dict[str, str | None]:
        """The grant covering each scope (None: none does): one batched lookup for all."""
        unique = sorted(set(scopes))
        groups = [self.policy.covering(s) for s in unique]
        batch = getattr(self.grants, "check_many", None)
        if batch is not None:
            found = await batch(self.user, groups)
        else:  # a checker without a batch call (a simulation): one check each
            checks = [self.grants.check(self.user, g) for g in groups]
            found = [r[0] if r else None for r in await asyncio.gather(*checks)]
        if len(found) != len(unique):
            raise RuntimeError("the grant store answered for the wrong number of scopes")
        return dict(zip(unique, (f or None for f in found), strict=True))

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
        lock = self.locks.get(scope)
        url = URL(f"{self.prefix}/request").with_query(scope=scope)
        marker: dict[str, Any] = {"locked": True, "scope": scope, "request_url": str(url)}
        if lock is not None:
            marker["reason"] = lock.reason
            if not lock.requestable:
                marker["request_url"] = None
        return marker


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


def _parse(body: bytes, path: tuple[str, ...] | None) -> tuple[Any, list[Any] | None] | str:
    """Return the document and its list of items (None: no list or not there), or why not."""
    try:
        doc = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return "malformed"
    node = doc
    for key in path or ():
        if not isinstance(node, dict) or key not in node:
            return doc, None
        node = node[key]
    return (doc, node) if path is not None and isinstance(node, list) else (doc, None)


def changed_headers(headers: MultiMapping[str], length: int) -> CIMultiDict[str]:
    """The headers of a JSON body jitgate changed: its own length, uncompressed, not cached."""
    new = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _DROP)
    new["Content-Length"] = str(length)
    new["Cache-Control"] = "no-store"  # what it shows changes with the caller's grants
    return new


def dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
