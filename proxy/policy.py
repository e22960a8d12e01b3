"""Compiled access policy: which routes are protected and by which scope.

A policy file lists routes, first match wins:

    routes:
      - id: recording
        methods: [GET, HEAD]
        path: /api/projects/{project}/session_recordings/{recording}
        subpaths: true
        access: protected
        scope: "recording:{project}/{recording}"

and a scope hierarchy, in which a wider scope covers a narrower one:

    hierarchy:
      - scope: "recording:{project}/{recording}"
        covered_by: ["project:{project}"]

Paths that match no route get the policy's `default` access. Entitlements say who may
request which scopes, for how long and approved how; the first rule whose scope template
matches and whose `who` admits the requester applies:

    entitlements:
      - id: support-recordings
        scopes: ["recording:{project}/{recording}"]
        who: {groups: [support]}
        durations: {offered: [15m, 1h], default: 1h, max: 1h}
        approval: {mode: approvers, count: 1, approvers: {groups: [leads]}}

A policy can start from a reviewed route table for a real tool (`preset: posthog`): the
table's routes come after the policy's own, with ids prefixed by the preset's name, and
`overrides:` replaces or removes them by id (see policyfile.py and proxy/presets/).

This module is the compiled policy that decisions read; policyfile.py reads and checks
the file (every error names its file, line and field).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from . import bodyrules
from .bodyrules import BodyRule
from .queryrules import BadQuery, QueryBind, bind

if TYPE_CHECKING:
    from .sensitivity import Rule


class Access(StrEnum):
    PROTECTED = "protected"  # identity and an active grant for the route's scope
    IDENTITY = "identity"  # identity only
    PUBLIC = "public"  # nobody needs to be known
    BLOCKED = "blocked"  # refused for everyone, grant or not


SCOPE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_SCOPE_DEPTH = 8


@dataclass(frozen=True)
class Match:
    route: str
    access: Access
    scope: str | None = None  # the route's own scope, e.g. recording:1/demo-1
    scopes: tuple[str, ...] = ()  # that scope and every scope that covers it, narrowest first
    preset: str | None = None  # the preset the route came from, e.g. posthog
    listing: Listing | None = None  # a list of recordings (lists.py), with `params`
    params: tuple[tuple[str, str], ...] = ()  # the path's values, for `listing` and `refs` only
    invalid: str | None = None  # why the request cannot be decided (refused, 400)
    # Routes with `body:` for this path, with their path values: the body decides (below).
    body: tuple[tuple[Route, tuple[tuple[str, str], ...]], ...] = ()
    note: str | None = None  # why a blocked request is blocked, when not by its route
    refs: tuple[Ref, ...] = ()  # response fields that point at recordings (refs.py)
    blobs: Blobs | None = None  # presigned URLs in the response, rewritten (blobs.py)


@dataclass(frozen=True)
class Listing:
    """Where a list route's response keeps its recordings, and the scope of each (lists.py).

    `items` is the key path to the JSON array (empty: the body is the array), `id` the
    field of an item that holds its recording id, `scope` a template using the route's path
    parameters and one more, `var`, which the item's id fills.
    """

    items: tuple[str, ...]
    id: str
    scope: str
    var: str


@dataclass(frozen=True)
class Ref:
    """A response field that points at a recording, checked against the caller's grants (refs.py).

    `at` is the key path to the field, where `*` steps into every element of an array.
    With `scope` (a template of the route's path values and one more, `var`) the field holds
    a recording id; without, it holds a URL, whose path the policy's own routes decide.
    `when` names sibling fields that must hold these strings for the field to count; `drop`
    names sibling fields removed together with a locked reference.
    """

    at: tuple[str, ...]
    scope: str | None = None
    var: str | None = None
    when: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    remove: bool = False  # a locked reference is removed (else replaced with a marker)


@dataclass(frozen=True)
class Blobs:
    """The JSON fields of a protected route's response that hold presigned storage URLs.

    Each field is a key path (`data.domURL`); a list met on the way, or at the end, is
    walked item by item. blobs.py rewrites every URL found into a grant-bound one.
    """

    fields: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Route:
    id: str
    methods: frozenset[str] | None
    regex: re.Pattern[str]
    access: Access
    scope: str | None
    first: str | None = None  # the first path segment, lower case, if it is a literal
    preset: str | None = None  # the preset table the route came from, e.g. posthog
    query: tuple[QueryBind, ...] = ()  # scope variables bound from query parameters
    body: BodyRule | None = None  # the JSON or GraphQL body rule that must match too
    listing: Listing | None = None
    refs: tuple[Ref, ...] = ()
    blobs: Blobs | None = None


@dataclass(frozen=True)
class PresetInfo:
    """The preset a policy expands, and where its table was taken from."""

    name: str  # e.g. posthog
    file: str  # the table, e.g. proxy/presets/posthog.yaml
    tool: str  # e.g. PostHog
    version: str  # the tool's version or commit the table was derived from
    sources: tuple[str, ...]  # the tool's source files and docs it was derived from


@dataclass(frozen=True)
class Cover:
    regex: re.Pattern[str]
    covered_by: tuple[str, ...]


@dataclass(frozen=True)
class Approval:
    mode: str  # "auto" | "approvers"
    count: int  # approvals needed; 0 for auto
    groups: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Entitlement:
    id: str
    description: str
    scopes: tuple[str, ...]  # the templates as written
    any_user: bool
    groups: frozenset[str]
    users: frozenset[str]
    durations: tuple[float, ...]  # offered, seconds, ascending
    default_duration: float
    max_duration: float
    reason_required: bool
    ticket_pattern: re.Pattern[str] | None
    pending_ttl: float
    approval: Approval
    extend_requires_approval: bool
    break_glass: bool
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regexes = tuple(re.compile(scope_pattern(t)) for t in self.scopes)
        object.__setattr__(self, "_regexes", regexes)

    def admits(self, user: str, groups: Iterable[str]) -> bool:
        """Return whether this person may request under this rule."""
        if not user:
            return False
        return self.any_user or user in self.users or not self.groups.isdisjoint(groups)

    def covers(self, scope: str) -> bool:
        return any(r.fullmatch(scope) for r in self._regexes)

    def may_approve(self, user: str, groups: Iterable[str]) -> bool:
        """Return whether this person is an eligible approver (requester not excluded here)."""
        approval = self.approval
        if approval.mode != "approvers" or not user:
            return False
        return user in approval.users or not approval.groups.isdisjoint(groups)

    def ticket_ok(self, ticket: str | None) -> bool:
        """Return whether a ticket satisfies the rule (any or none when there is no pattern)."""
        if self.ticket_pattern is None:
            return True
        return ticket is not None and self.ticket_pattern.fullmatch(ticket) is not None


@dataclass(frozen=True)
class Policy:
    file: str
    version: str
    default: Access
    routes: tuple[Route, ...]
    covers: tuple[Cover, ...]
    entitlements: tuple[Entitlement, ...] = ()
    preset: PresetInfo | None = None
    lists: str = "pass"  # list routes: annotate, filter or pass (lists.py)
    list_max_bytes: int = 4 * 1024 * 1024  # larger list responses pass unchanged
    sensitivity: tuple[Rule, ...] = ()  # recordings refused by what they hold (sensitivity.py)
    _recording: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    # The routes a path can match, by its first segment (lower case), in policy order: those
    # naming that segment and those whose first segment is a parameter. Other paths get
    # only the latter. Compiled once, so matching does not walk every route.
    _by_first: dict[str, tuple[Route, ...]] = field(init=False, repr=False, compare=False)
    _generic: tuple[Route, ...] = field(init=False, repr=False, compare=False)
    # Decisions repeat: the Match of a recent (method, path), emptied when it gets full.
    _matched: dict[tuple[str, str], Match] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every scope template with a {recording} variable, so audit records can name the
        # recording a scope is about, whichever route, cover or rule wrote the scope.
        templates = {r.scope for r in self.routes if r.scope}
        templates.update(t for e in self.entitlements for t in e.scopes)
        regexes = [re.compile(scope_pattern(t)) for t in sorted(templates) if "{recording}" in t]
        object.__setattr__(self, "_recording", tuple(regexes))
        firsts = {r.first for r in self.routes if r.first is not None}
        by_first = {
            f: tuple(r for r in self.routes if r.first in (f, None)) for f in sorted(firsts)
        }
        object.__setattr__(self, "_by_first", by_first)
        object.__setattr__(self, "_generic", tuple(r for r in self.routes if r.first is None))
        object.__setattr__(self, "_matched", {})

    def recording_of(self, scope: str | None) -> str | None:
        """Return the {recording} a scope names (e.g. demo-1 for recording:1/demo-1), if any."""
        if scope:
            for regex in self._recording:
                m = regex.fullmatch(scope)
                if m is not None:
                    return m["recording"]
        return None

    def match(self, method: str, path: str, query: str = "") -> Match:
        """Return the first route that matches a normalised path, or the default.

        `query` is the raw query string; only routes with `query:` rules read it.
        """
        key = (method, path)
        found = self._matched.get(key)
        if found is None:
            found, by_query = self._match(method, path, query)
            if by_query:
                return found  # depends on the query: never kept
            if len(self._matched) >= MATCH_CACHE:
                self._matched.clear()  # rare, and only costs the next matches a walk
            self._matched[key] = found
        return found

    def _match(self, method: str, path: str, query: str) -> tuple[Match, bool]:
        first = path[1:].split("/", 1)[0].lower()
        candidates = self._by_first.get(first, self._generic)
        for i, route in enumerate(candidates):
            if route.methods is not None and method not in route.methods:
                continue
            m = route.regex.match(path)
            if m is None:
                continue
            if route.body is not None:
                return self._body_candidates(method, path, candidates[i:]), False
            values = m.groupdict()
            # What a list or reference check of the response needs (lists.py, refs.py).
            shown = _shown(route, values)
            if route.scope is None:
                return Match(route.id, route.access, preset=route.preset, **shown), False
            if route.query:
                try:
                    values.update(bind(query, route.query))
                except BadQuery as exc:
                    bad = Match(route.id, route.access, preset=route.preset, invalid=str(exc))
                    return bad, True
            scope = route.scope.format_map(values)
            wider = self.covering(scope)
            found = Match(route.id, route.access, scope, wider, route.preset, **shown)
            return found, bool(route.query)
        return Match("_default", self.default), False

    def _body_candidates(self, method: str, path: str, routes: tuple[Route, ...]) -> Match:
        """The routes with `body:` for this path, in order; only they can decide it."""
        found = []
        for route in routes:
            if route.body is None or (route.methods is not None and method not in route.methods):
                continue
            m = route.regex.match(path)
            if m is not None:
                found.append((route, tuple(m.groupdict().items())))
        head = found[0][0]
        return Match(head.id, Access.BLOCKED, preset=head.preset, body=tuple(found))

    def match_body(self, match: Match, body: bytes) -> Match:
        """Decide a Match that needs its body: the first body rule that matches, or blocked."""
        head = match.body[0][0]
        graphql = any(r.body is not None and r.body.kind == "graphql" for r, _ in match.body)
        try:
            parsed = bodyrules.parse(body, graphql)
            for route, found in match.body:
                assert route.body is not None
                bound = bodyrules.match(route.body, parsed)
                if bound is None:
                    continue
                values = {**dict(found), **bound}
                shown = _shown(route, values)
                if route.scope is None:
                    return Match(route.id, route.access, preset=route.preset, **shown)
                scope = route.scope.format_map(values)
                wider = self.covering(scope)
                return Match(route.id, route.access, scope, wider, route.preset, **shown)
        except bodyrules.BadBody as exc:
            return Match(head.id, Access.BLOCKED, preset=head.preset, invalid=str(exc))
        what = f"operation {parsed.operation!r}" if parsed.operation else "this body"
        note = f"no body rule of route {head.id!r} matches {what}: blocked by default"
        return Match(head.id, Access.BLOCKED, preset=head.preset, note=note)

    def covering(self, scope: str) -> tuple[str, ...]:
        """Return the scope and all wider scopes that cover it, narrowest first."""
        found = [scope]
        frontier = [scope]
        for _ in range(MAX_SCOPE_DEPTH):
            nxt: list[str] = []
            for current in frontier:
                for cover in self.covers:
                    m = cover.regex.fullmatch(current)
                    if m is None:
                        continue
                    for template in cover.covered_by:
                        wider = template.format_map(m.groupdict())
                        if wider not in found:
                            found.append(wider)
                            nxt.append(wider)
            if not nxt:
                break
            frontier = nxt
        return tuple(found)

    def entitlement_for(
        self,
        scope: str,
        user: str,
        groups: Iterable[str],
        *,
        break_glass: bool | None = None,
        among: Iterable[str] | None = None,
    ) -> Entitlement | None:
        """Return the first rule that covers the scope and admits the person, or None.

        `among`: only these rules count (a sensitivity rule's, for a sensitive recording).
        """
        # With `break_glass` given only rules with that flag count, so an ordinary request
        # never lands on a break-glass rule, nor an emergency one on an ordinary rule.
        member = frozenset(groups)
        only = None if among is None else frozenset(among)
        for ent in self.entitlements:
            if break_glass is not None and ent.break_glass != break_glass:
                continue
            if only is not None and ent.id not in only:
                continue
            if ent.covers(scope) and ent.admits(user, member):
                return ent
        return None

    def entitlements_for_scope(self, scope: str) -> tuple[Entitlement, ...]:
        """Return every rule whose scope templates match, in policy order."""
        return tuple(ent for ent in self.entitlements if ent.covers(scope))

    def entitlement(self, entitlement_id: str) -> Entitlement | None:
        return next((ent for ent in self.entitlements if ent.id == entitlement_id), None)


def _shown(route: Route, values: dict[str, str]) -> dict[str, Any]:
    """A Match's `listing`, `refs`, `blobs` and `params`, for a route whose response is
    checked or rewritten."""
    if route.listing is None and not route.refs and route.blobs is None:
        return {}
    listing = route.listing if route.access is not Access.PROTECTED else None
    return {
        "listing": listing,
        "refs": route.refs,
        "blobs": route.blobs,
        "params": tuple(values.items()),
    }


MATCH_CACHE = 4096  # recent (method, path) pairs whose Match a policy keeps


def scope_pattern(template: str) -> str:
    out, last = [], 0
    for m in SCOPE_PARAM.finditer(template):
        out.append(re.escape(template[last : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/]+)")
        last = m.end()
    out.append(re.escape(template[last:]))
    return "".join(out)


def format_duration(seconds: float) -> str:
    """Write seconds the way a policy would: 90 -> 1m30s, 14400 -> 4h."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, out = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            count, rest = divmod(rest, size)
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"
