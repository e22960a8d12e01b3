"""Policy tooling for security teams: explain one request, and run a policy's test cases.

Both go through the real decision (`Authorizer.decide_for`) on the path `proxy.paths`
normalises, so what they report is what `jitgate serve` would do.

A test file is YAML:

    policy: policy.yaml            # optional, relative to this file; default policy.yaml
    cases:
      - name: snapshots without a grant are refused
        request: GET /api/projects/1/session_recordings/demo-1/snapshots
        user: alice                # omit (or null) for an anonymous request
        groups: [eng]              # optional
        grants: []                 # scopes the user holds, e.g. ["project:1"]
        expect: deny               # allow | deny | blocked | unauthenticated | bad_request
        expect_status: 403         # optional: 0 when allowed (the upstream answers)
        expect_route: recording    # optional: route id, `_default` or `_invalid`
        expect_scope: "recording:1/demo-1"   # optional: the route's scope (null: none)
        description: why it matters          # optional, not checked
        metadata: {start_url: "https://shop.example/billing/x", properties: {plan: pro}}
                                   # optional: the recording's metadata for sensitivity
                                   # rules, inline or a JSON/YAML file beside this one
        entitlement: billing-review          # optional: the grants' entitlement

`request` is `METHOD TARGET`; the target is the raw, still percent-encoded path (and
query), as a client would send it. Paths are normalised with `forward.reject_semicolons`
at its default (true).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .authorize import Authorizer
from .errors import BadPath, ConfigError, ConfigErrors
from .grants import Grant, GrantChecker
from .identity import Identity
from .paths import normalise, split_target
from .policy import Access, Policy, PresetInfo
from .sensitivity import metadata_problem, read_metadata
from .settings.yamlsrc import Node, Seq, line_of, load_file

EXPECTS = ("allow", "deny", "blocked", "unauthenticated", "bad_request")
METHOD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_CASE_FIELDS = (
    "name",
    "request",
    "user",
    "groups",
    "grants",
    "expect",
    "expect_status",
    "expect_route",
    "expect_scope",
    "description",
    "body",
    "metadata",
    "entitlement",
)


class GrantSource(GrantChecker, Protocol):
    """A grant checker that can also list a user's grants (RedisGrants)."""

    async def list(self, user: str | None = None) -> list[Grant]: ...


class SimulatedGrants:
    """Hypothetical grants for policy tests: a simulation answering `check`, not a grant store."""

    def __init__(self, user: str | None, scopes: Iterable[str]) -> None:
        self.user = user
        self.scopes = frozenset(scopes)

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        if user != self.user:
            return None
        for scope in scopes:  # narrowest first, like the Redis check
            if scope in self.scopes:
                return f"sim:{scope}", float("inf")
        return None


def authorizer(
    compiled: Policy,
    grants: GrantChecker,
    metadata: Mapping[str, Any] | None = None,
    entitlement: str | None = None,
) -> Authorizer:
    """Return an Authorizer for decisions on known identities.

    `metadata` is what the recording holds, for sensitivity rules; without it they are not
    considered. `entitlement` is what the grants were given under.
    """

    async def lookup(scope: str) -> tuple[Mapping[str, Any] | None, str | None] | None:
        return None if metadata is None else (metadata, None)

    async def grant_entitlement(grant_id: str) -> str | None:
        return entitlement

    return Authorizer(compiled, grants, metadata=lookup, grant_entitlement=grant_entitlement)


@dataclass(frozen=True)
class Verdict:
    """What jitgate would do with one request."""

    method: str
    target: str
    path: str | None  # normalised; None when the path itself is refused
    outcome: str  # allow, deny, blocked, unauthenticated, unavailable, bad_request, ...
    status: int  # 0 when forwarded (the upstream answers)
    reasons: tuple[str, ...]
    route: str
    access: Access | None
    scope: str | None = None  # the matched route's scope, whatever the outcome
    scopes: tuple[str, ...] = ()  # that scope and every scope covering it, narrowest first
    grant_id: str | None = None
    preset: str | None = None  # the preset the matched route came from, if any
    blobs: tuple[str, ...] = ()  # the fields whose presigned URLs are rewritten (blobs.py)

    @property
    def allow(self) -> bool:
        return self.outcome == "allow"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "path": self.path,
            "route": self.route,
            "preset": self.preset,
            "access": self.access.value if self.access else None,
            "scope": self.scope,
            "covering_scopes": list(self.scopes),
            "decision": self.outcome,
            "allow": self.allow,
            "status": self.status,
            "reasons": list(self.reasons),
            "grant_id": self.grant_id,
            "blob_fields": list(self.blobs),
        }


async def decide_request(
    auth: Authorizer,
    ident: Identity | None,
    method: str,
    target: str,
    *,
    reject_semicolons: bool = True,
    prefix: str | None = None,
    body: bytes | None = None,
) -> Verdict:
    """Normalise a raw request target as the gate does, then decide it (with its body)."""
    try:
        raw_path, query = split_target(target)
        path = normalise(raw_path, reject_semicolons=reject_semicolons)
    except BadPath as exc:
        return Verdict(method, target, None, "bad_request", 400, (str(exc),), "_invalid", None)
    low = path.lower()
    if prefix and (low == prefix.lower() or low.startswith(prefix.lower() + "/")):
        reason = f"{prefix} belongs to jitgate: answered by jitgate itself, never forwarded"
        return Verdict(method, target, path, "not_forwarded", 0, (reason,), "_prefix", None)
    match = auth.policy.match(method, path, query)
    if match.body and body is not None:
        match = auth.policy.match_body(match, body)
    d = await auth.decide_for(ident, method, path, query=query, body=body)
    return Verdict(
        method,
        target,
        path,
        d.outcome,
        d.status,
        d.reasons,
        d.route,
        d.access,
        match.scope,
        match.scopes,
        d.grant_id,
        match.preset if match.route == d.route else None,
        tuple(".".join(f) for f in match.blobs.fields) if match.blobs else (),
    )


# --- jitgate policy explain -------------------------------------------------------------


@dataclass(frozen=True)
class Explanation:
    verdict: Verdict
    user: str | None
    groups: tuple[str, ...]
    policy_file: str
    policy_version: str
    grants: tuple[Grant, ...] | None  # the user's active grants for the covering scopes
    grants_note: str | None = None  # why grants were not listed
    preset: PresetInfo | None = None  # the policy's preset, when it has one

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.verdict.to_dict(),
            "user": self.user,
            "groups": list(self.groups),
            "policy": {
                "file": self.policy_file,
                "version": self.policy_version,
                "preset": None
                if self.preset is None
                else {
                    "name": self.preset.name,
                    "tool": self.preset.tool,
                    "version": self.preset.version,
                    "sources": list(self.preset.sources),
                },
            },
            "grants": None
            if self.grants is None
            else [
                {
                    "id": g.id,
                    "scope": g.scope,
                    "expires_at": g.expires_at,
                    "reason": g.reason,
                    "granted_by": g.granted_by,
                }
                for g in self.grants
            ],
            "grants_note": self.grants_note,
        }

    def lines(self) -> list[str]:
        v = self.verdict
        who = self.user or "(anonymous)"
        if self.groups:
            who += f" (groups: {', '.join(self.groups)})"
        rows = [
            ("request", f"{v.method} {v.target}"),
            ("path", v.path or "(refused)"),
            ("user", who),
            ("policy", f"{self.policy_file} (version {self.policy_version})"),
            ("route", f"{v.route} ({v.access.value})" if v.access else v.route),
        ]
        if v.preset and self.preset:
            rule = v.route.removeprefix(f"{v.preset}.")
            made = f"{self.preset.tool} {self.preset.version}, {self.preset.file}"
            rows.append(("preset", f"{v.preset}: route {rule} ({made})"))
        if v.blobs:
            rows.append(("blobs", f"presigned URLs in {', '.join(v.blobs)} become blob URLs"))
        if v.scope:
            rows.append(("scope", v.scope))
            rows.append(("covered by", ", ".join(v.scopes[1:]) or "(no wider scope)"))
        if v.scopes:
            if self.grants is None:
                rows.append(("grants", self.grants_note or ""))
            elif not self.grants:
                rows.append(("grants", "none active for these scopes"))
            rows.extend(("grants", line) for line in _grant_lines(self.grants or ()))
        verdict = f"{v.outcome} ({v.status})" if v.status else v.outcome
        rows.append(("decision", verdict))
        rows.extend(("reason", r) for r in v.reasons)
        width = max(len(k) for k, _ in rows)
        return [f"{k.ljust(width)}  {val}" for k, val in rows]


def _grant_lines(grants: Iterable[Grant]) -> list[str]:
    now = time.time()
    cells = []
    for g in grants:
        expires = datetime.fromtimestamp(g.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = int(g.remaining(now))
        cells.append(
            (g.id, g.scope, f"expires {expires} (in {left // 60}m{left % 60:02d}s)", g.reason)
        )
    if not cells:
        return []
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return ["  ".join([*(c[i].ljust(widths[i]) for i in range(3)), c[3]]) for c in cells]


async def explain(
    compiled: Policy,
    method: str,
    target: str,
    ident: Identity | None,
    grants: GrantSource | None,
    *,
    reject_semicolons: bool = True,
    prefix: str | None = None,
    body: bytes | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Explanation:
    """Explain one request; `grants` None means grants are not checked (--no-redis).

    `metadata`: what the recording holds (--metadata), for the policy's sensitivity rules.
    """
    checker: GrantChecker = grants if grants is not None else SimulatedGrants(None, ())
    verdict = await decide_request(
        authorizer(compiled, checker, metadata),
        ident,
        method,
        target,
        reject_semicolons=reject_semicolons,
        prefix=prefix,
        body=body,
    )
    user = ident.subject if ident else None
    groups = ident.groups if ident else ()
    listed: tuple[Grant, ...] | None = None
    note: str | None = None
    if not verdict.scopes:
        note = "not needed by this route"
    elif ident is None:
        note = "none: anonymous request"
    elif grants is None:
        note = "not checked (--no-redis)"
        if verdict.outcome == "deny":
            # Nothing was checked, so this is what the request needs, not a refusal.
            wider = f" or {', '.join(verdict.scopes[1:])}" if len(verdict.scopes) > 1 else ""
            reason = f"needs an active grant for {verdict.scope}{wider} (not checked: --no-redis)"
            verdict = replace(verdict, outcome="needs_grant", reasons=(reason,))
    elif verdict.outcome == "unavailable":
        note = "not listed: grant store unavailable"
    else:
        try:
            mine = [g for g in await grants.list(ident.subject) if g.scope in verdict.scopes]
        except Exception as exc:  # the decision stands; only the listing is missing
            note = f"not listed: {type(exc).__name__}"
        else:
            mine.sort(key=lambda g: (verdict.scopes.index(g.scope), g.expires_at))
            listed = tuple(mine)
    return Explanation(
        verdict, user, groups, compiled.file, compiled.version, listed, note, compiled.preset
    )


# --- jitgate policy test ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    line: int
    method: str
    target: str
    user: str | None
    groups: tuple[str, ...]
    grants: tuple[str, ...]
    expect: str
    # Optional expectations by field: status, route, scope.
    checks: tuple[tuple[str, Any], ...] = ()
    body: bytes | None = None  # for routes with body rules: a string as is, else as JSON
    metadata: Mapping[str, Any] | None = None  # the recording's, for sensitivity rules
    entitlement: str | None = None  # what the case's grants were given under


@dataclass(frozen=True)
class Suite:
    file: str
    policy_file: Path
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class Result:
    case: Case
    verdict: Verdict
    mismatches: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        if self.passed:
            return f"PASS {self.case.name}"
        why = "; ".join(self.verdict.reasons)
        return f"FAIL {self.case.name}: {'; '.join(self.mismatches)} ({why})"

    def to_dict(self) -> dict[str, Any]:
        c = self.case
        return {
            "name": c.name,
            "line": c.line,
            "passed": self.passed,
            "request": f"{c.method} {c.target}",
            "user": c.user,
            "grants": list(c.grants),
            "expect": c.expect,
            "mismatches": list(self.mismatches),
            "got": self.verdict.to_dict(),
        }


def load_suite(path: Path, policy_file: Path | None = None) -> Suite:
    """Read a test file; raise ConfigErrors naming file:line and field for every problem."""
    try:
        raw = load_file(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None
    return _SuiteReader(path).read(raw, policy_file)


async def run_suite(suite: Suite, compiled: Policy) -> list[Result]:
    """Run every case through the real decision, with simulated grants."""
    return [await run_case(case, compiled) for case in suite.cases]


async def run_case(case: Case, compiled: Policy) -> Result:
    ident = Identity(case.user, case.groups) if case.user is not None else None
    grants = SimulatedGrants(case.user, case.grants)
    auth = authorizer(compiled, grants, case.metadata, case.entitlement)
    verdict = await decide_request(auth, ident, case.method, case.target, body=case.body)
    got = {"status": verdict.status, "route": verdict.route, "scope": verdict.scope}
    mismatches: list[str] = []
    if verdict.outcome != case.expect:
        mismatches.append(f"expected {case.expect}, got {verdict.outcome}")
    for key, want in case.checks:
        if got[key] != want:
            mismatches.append(f"expected {key} {want}, got {got[key]}")
    return Result(case, verdict, tuple(mismatches))


class _SuiteReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = str(path)
        self.errors: list[ConfigError] = []

    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None:
        line = line_of(node, key)
        self.errors.append(ConfigError(message, file=self.file, line=line, field=where))

    def read(self, raw: object, policy_file: Path | None) -> Suite:
        if not isinstance(raw, Node):
            error = ConfigError("a test file must be a mapping", file=self.file, line=1)
            raise ConfigErrors([error])
        for key in raw:
            if key not in ("policy", "cases"):
                self.err(raw, key, key, "unknown field (known: cases, policy)")
        named = raw.get("policy")
        if named is not None and (not isinstance(named, str) or not named):
            self.err(raw, "policy", "policy", "must be a file name")
            named = None
        if policy_file is None:
            policy_file = self.path.parent / (named or "policy.yaml")
        cases: list[Case] = []
        items = raw.get("cases")
        if not isinstance(items, Seq) or not items:
            self.err(raw, "cases", "cases", "is required and must be a non-empty list")
        else:
            seen: set[str] = set()
            for i, item in enumerate(items):
                case = self._case(items, i, item)
                if case is None:
                    continue
                if case.name in seen:
                    self.err(item, "name", f"cases[{i}].name", f"duplicate case {case.name!r}")
                seen.add(case.name)
                cases.append(case)
        if self.errors:
            raise ConfigErrors(self.errors)
        return Suite(self.file, policy_file, tuple(cases))

    def _case(self, items: Seq, i: int, item: object) -> Case | None:
        where = f"cases[{i}]"
        if not isinstance(item, Node):
            self.err(items, i, where, "must be a mapping")
            return None
        before = len(self.errors)
        for key in item:
            if key not in _CASE_FIELDS:
                known = ", ".join(sorted(_CASE_FIELDS))
                self.err(item, key, f"{where}.{key}", f"unknown field (known: {known})")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err(item, "name", f"{where}.name", "is required and must be a non-empty string")
            name = where
        method, target = self._request(item, where)
        user = item.get("user")
        if user is not None and (not isinstance(user, str) or not user):
            self.err(item, "user", f"{where}.user", "must be a user name, or null for anonymous")
            user = None
        groups = self._strings(item, "groups", where)
        grants = self._strings(item, "grants", where)
        if grants and user is None:
            self.err(item, "grants", f"{where}.grants", "an anonymous request holds no grants")
        expect = item.get("expect")
        if expect not in EXPECTS:
            got = "missing" if expect is None else f"got {expect!r}"
            choices = ", ".join(EXPECTS)
            self.err(item, "expect", f"{where}.expect", f"must be one of {choices}; {got}")
        checks: list[tuple[str, Any]] = []
        if "expect_status" in item:
            status = item["expect_status"]
            if isinstance(status, bool) or not isinstance(status, int):
                self.err(item, "expect_status", f"{where}.expect_status", "must be an integer")
            checks.append(("status", status))
        if "expect_route" in item:
            route = item["expect_route"]
            if not isinstance(route, str) or not route:
                self.err(item, "expect_route", f"{where}.expect_route", "must be a route id")
            checks.append(("route", route))
        if "expect_scope" in item:
            scope = item["expect_scope"]
            if scope is not None and (not isinstance(scope, str) or not scope):
                self.err(item, "expect_scope", f"{where}.expect_scope", "must be a scope or null")
            checks.append(("scope", scope))
        if len(self.errors) > before:
            return None
        return Case(
            name.strip(),
            item.line,
            method,
            target,
            user,
            groups,
            grants,
            str(expect),
            tuple(checks),
            self._body(item),
            self._metadata(item, where),
            item.get("entitlement") if isinstance(item.get("entitlement"), str) else None,
        )

    def _body(self, item: Node) -> bytes | None:
        value = item.get("body")
        if value is None:
            return None
        if isinstance(value, str):
            return value.encode()
        return json.dumps(value).encode()

    def _metadata(self, item: Node, where: str) -> Mapping[str, Any] | None:
        """A case's `metadata:`, inline or from a JSON/YAML file beside the test file."""
        value, at = item.get("metadata"), f"{where}.metadata"
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = read_metadata(self.path.parent / value)
            except ValueError as exc:
                self.err(item, "metadata", at, str(exc))
                return None
        problem = metadata_problem(value)
        if problem is not None:
            self.err(item, "metadata", at, problem)
            return None
        return dict(value)

    def _request(self, item: Node, where: str) -> tuple[str, str]:
        value = item.get("request")
        parts = value.split() if isinstance(value, str) else []
        if len(parts) != 2 or not METHOD.match(parts[0]):
            self.err(item, "request", f"{where}.request", "must be 'METHOD TARGET', e.g. 'GET /x'")
            return "GET", "/"
        return parts[0].upper(), parts[1]

    def _strings(self, item: Node, key: str, where: str) -> tuple[str, ...]:
        value = item.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.err(item, key, f"{where}.{key}", "must be a list of non-empty strings")
            return ()
        return tuple(value)
