"""Reading a policy file: YAML in, a compiled `Policy` out, or every error at once.

Each error names its place, e.g. `config/policy.yaml:14: routes[2].scope: unknown
parameter {recordng}`. The file's format is described in policy.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from . import blobspec, listspec, presets, sensitivity
from .bodyrules import compile_body
from .errors import ConfigError, ConfigErrors
from .policy import (
    SCOPE_PARAM,
    Access,
    Approval,
    Cover,
    Entitlement,
    Policy,
    PresetInfo,
    Route,
    format_duration,
    scope_pattern,
)
from .presets import expand
from .queryrules import compile_query
from .settings.read import parse_duration
from .settings.yamlsrc import Node, Seq, line_of, load_text

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_ID = re.compile(r"[A-Za-z0-9_.-]+")


def load(path: Path) -> Policy:
    """Read and compile a policy file; raise ConfigErrors naming file:line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigErrors([ConfigError(f"cannot read: {exc.strerror}", file=str(path))]) from None
    return compile_text(text, str(path))


def compile_text(text: str, name: str) -> Policy:
    """Compile policy YAML text; `name` is used in error messages."""
    try:
        raw = load_text(text, name)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None
    return _Compiler(name).compile(raw, text)


def _table(preset: str) -> tuple[Policy, Seq, str]:
    """Compile a shipped preset table; return it, its raw routes and its text."""
    text, name = presets.read(preset)
    raw = load_text(text, name)
    return _Compiler(name, preset).compile(raw, text), raw["routes"], text


class _Compiler:
    def __init__(self, file: str, table: str | None = None) -> None:
        self.file = file
        self.table = table  # compiling the route table of this preset, not a policy
        self.errors: list[ConfigError] = []

    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None:
        line = line_of(node, key)
        self.errors.append(ConfigError(message, file=self.file, line=line, field=where))

    def compile(self, raw: object, text: str) -> Policy:
        if not isinstance(raw, Node):
            raise ConfigErrors([ConfigError("a policy must be a mapping", file=self.file, line=1)])
        known: tuple[str, ...] = ("default", "hierarchy", "routes", "version")
        known += ("about",) if self.table else ("entitlements", "overrides", "preset")
        known += () if self.table else ("lists", "list_max_bytes", "sensitivity")
        self.unknown(raw, "", known)
        if raw.get("version", 1) != 1:
            self.err(raw, "version", "version", "only version 1 is supported")
        base = self._preset(raw)
        table, info = (base[0], base[0].preset) if base else (None, self._about(raw))
        fallback = table.default if table is not None else Access.IDENTITY
        default = self._access(raw, "default", "default", fallback)
        if default is Access.PROTECTED:
            self.err(raw, "default", "default", "cannot be 'protected' (it has no scope)")
        routes = self._routes(raw, optional="preset" in raw and not self.table)
        covers = self._hierarchy(raw)
        if base is not None:
            routes += expand.preset_routes(self, raw, base[0], base[1])
            covers += base[0].covers
            text += "\0" + base[2]  # the version covers the table too
        entitlements = _EntitlementCompiler(self).compile(raw)
        if self.errors:
            raise ConfigErrors(self.errors)
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        policy = Policy(
            self.file, version, default, tuple(routes), tuple(covers), tuple(entitlements), info
        )
        return sensitivity.settings(self, raw, listspec.settings(self, raw, policy))

    # --- presets ----------------------------------------------------------------------

    def _preset(self, raw: Node) -> tuple[Policy, Seq, str] | None:
        name = raw.get("preset")
        if name is None or self.table:
            if "overrides" in raw:
                self.err(raw, "overrides", "overrides", "needs a preset (preset: NAME)")
            return None
        if name not in presets.NAMES:
            self.err(raw, "preset", "preset", f"must be one of {', '.join(presets.NAMES)}")
            return None
        return _table(name)

    def _about(self, raw: Node) -> PresetInfo | None:
        if self.table is None:
            return None
        about = raw.get("about")
        fields = ("tool", "version", "sources", "reviewed")
        if not isinstance(about, Node) or not all(k in about for k in fields[:3]):
            self.err(raw, "about", "about", "is required: {tool, version, sources, reviewed}")
            return None
        self.unknown(about, "about", fields)
        sources = about["sources"]
        if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
            self.err(about, "sources", "about.sources", "must be a list of source files")
            sources = []
        return PresetInfo(
            self.table, self.file, str(about["tool"]), str(about["version"]), tuple(sources)
        )

    def unknown(self, node: Node, where: str, known: tuple[str, ...]) -> None:
        for key in node:
            if key not in known:
                at = f"{where}.{key}" if where else key
                self.err(node, key, at, f"unknown field (known: {', '.join(sorted(known))})")

    def _access(self, node: Node, key: str, where: str, fallback: Access) -> Access:
        value = node.get(key, fallback.value)
        if value == "identity-only":
            value = Access.IDENTITY.value
        try:
            return Access(value)
        except ValueError:
            choices = ", ".join(a.value for a in Access)
            self.err(node, key, where, f"must be one of {choices}, got {value!r}")
            return fallback

    def _routes(self, raw: Node, *, optional: bool = False) -> list[Route]:
        items = raw.get("routes")
        if items is None and optional:
            return []
        if not isinstance(items, Seq):
            self.err(raw, "routes", "routes", "is required and must be a list")
            return []
        out: list[Route] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = f"routes[{i}]"
            if not isinstance(item, Node):
                self.err(items, i, where, "must be a mapping")
                continue
            route = self._route(item, where)
            if route is None:
                continue
            preset = raw.get("preset")
            if route.id in seen:
                self.err(item, "id", f"{where}.id", f"duplicate route id {route.id!r}")
            elif isinstance(preset, str) and route.id.startswith(f"{preset}."):
                message = f"the {preset}. prefix names preset routes: change them in overrides:"
                self.err(item, "id", f"{where}.id", message)
            seen.add(route.id)
            out.append(route)
        return out

    def _route(self, item: Node, where: str) -> Route | None:
        known: tuple[str, ...] = ("id", "methods", "path", "subpaths", "access", "scope")
        known += ("description", "query", "body", "list", "refs", "blobs")
        self.unknown(item, where, known)
        rid = item.get("id")
        if not isinstance(rid, str) or not _ID.fullmatch(rid):
            self.err(item, "id", f"{where}.id", "is required: letters, digits, '.', '_' or '-'")
            rid = where
        path = item.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            self.err(item, "path", f"{where}.path", "is required and must start with '/'")
            return None
        subpaths = item.get("subpaths", False)
        if not isinstance(subpaths, bool):
            self.err(item, "subpaths", f"{where}.subpaths", "must be true or false")
            subpaths = False
        regex, params = self._path_regex(item, where, path, subpaths)
        methods = self._methods(item, where)
        access = self._access(item, "access", f"{where}.access", Access.PROTECTED)
        query = compile_query(self, item, where, params, access is Access.PROTECTED)
        params |= {v for b in query for v in b.variables}
        body = compile_body(self, item, where, params)
        params |= set(body.binds if body is not None else ())
        if body is not None and query:
            self.err(item, "body", f"{where}.body", "a route binds from its query or its body")
        scope = item.get("scope")
        if access is Access.PROTECTED:
            if not isinstance(scope, str) or not scope:
                self.err(item, "scope", f"{where}.scope", "is required for protected routes")
                scope = None
            else:
                for name in SCOPE_PARAM.findall(scope):
                    if name not in params:
                        self.err(item, "scope", f"{where}.scope", f"unknown parameter {{{name}}}")
                if _has_stray_braces(scope):
                    self.err(item, "scope", f"{where}.scope", "unbalanced '{' or '}'")
        elif scope is not None:
            self.err(item, "scope", f"{where}.scope", "only protected routes have a scope")
            scope = None
        segments = path.strip("/").split("/")
        first = (
            segments[0].lower() if path != "/" and not SCOPE_PARAM.fullmatch(segments[0]) else None
        )
        shown = listspec.response(self, item, where, params, access)  # list: and refs:
        blobs = blobspec.blobs(self, item, where, access) if "blobs" in item else None
        scope = scope if isinstance(scope, str) else None
        return Route(
            rid, methods, regex, access, scope, first, query=query, body=body, blobs=blobs, **shown
        )

    def _methods(self, item: Node, where: str) -> frozenset[str] | None:
        value = item.get("methods")
        if value is None or value == "*" or value == ["*"]:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            self.err(item, "methods", f"{where}.methods", "must be a list of HTTP methods or '*'")
            return None
        methods = set()
        for m in value:
            if not isinstance(m, str) or not _METHOD.match(m.upper()):
                self.err(item, "methods", f"{where}.methods", f"invalid method {m!r}")
                continue
            methods.add(m.upper())
        if "GET" in methods:
            methods.add("HEAD")  # HEAD reveals what GET would: protect both alike
        return frozenset(methods)

    def _path_regex(
        self, item: Node, where: str, path: str, subpaths: bool
    ) -> tuple[re.Pattern[str], set[str]]:
        params: set[str] = set()
        parts: list[str] = []
        segments = path.strip("/").split("/") if path != "/" else []
        for seg in segments:
            m = SCOPE_PARAM.fullmatch(seg)
            if m:
                name = m.group(1)
                if name in params:
                    self.err(item, "path", f"{where}.path", f"parameter {{{name}}} appears twice")
                params.add(name)
                parts.append(f"(?P<{name}>[^/]+)")
            elif "{" in seg or "}" in seg:
                self.err(
                    item, "path", f"{where}.path", f"a parameter must fill a whole segment: {seg!r}"
                )
                parts.append(re.escape(seg))
            elif seg in ("", ".", ".."):
                self.err(item, "path", f"{where}.path", "empty, '.' or '..' segments never match")
            else:
                parts.append(re.escape(seg))
        body = "/" + "/".join(parts)
        # The trailing slash is optional; subpaths also take anything beneath.
        tail = "(?:/.*)?" if subpaths else "/?"
        if body == "/":
            tail = ".*" if subpaths else ""
        # Literal segments ignore case: an upstream that routes case-insensitively
        # must not see /API/... as an unprotected path.
        return re.compile(body + tail + r"\Z", re.IGNORECASE), params

    def _hierarchy(self, raw: Node) -> list[Cover]:
        items = raw.get("hierarchy")
        if items is None:
            return []
        if not isinstance(items, Seq):
            self.err(raw, "hierarchy", "hierarchy", "must be a list")
            return []
        out: list[Cover] = []
        for i, item in enumerate(items):
            where = f"hierarchy[{i}]"
            if not isinstance(item, Node):
                self.err(items, i, where, "must be a mapping")
                continue
            self.unknown(item, where, ("scope", "covered_by"))
            scope = item.get("scope")
            covered_by = item.get("covered_by")
            if not isinstance(scope, str) or not scope:
                self.err(item, "scope", f"{where}.scope", "is required")
                continue
            if isinstance(covered_by, str):
                covered_by = [covered_by]
            if not isinstance(covered_by, list) or not all(isinstance(c, str) for c in covered_by):
                self.err(item, "covered_by", f"{where}.covered_by", "must be a list of scopes")
                continue
            params = SCOPE_PARAM.findall(scope)
            for wider in covered_by:
                for name in SCOPE_PARAM.findall(wider):
                    if name not in params:
                        self.err(
                            item,
                            "covered_by",
                            f"{where}.covered_by",
                            f"unknown parameter {{{name}}}",
                        )
            out.append(Cover(re.compile(scope_pattern(scope)), tuple(covered_by)))
        return out


def _has_stray_braces(template: str) -> bool:
    stripped = SCOPE_PARAM.sub("", template)
    return "{" in stripped or "}" in stripped


# --- entitlements -------------------------------------------------------------------------

_ENTITLEMENT_FIELDS = (
    "id", "description", "scopes", "who", "durations", "reason", "ticket", "pending_ttl",
    "approval", "extend", "break_glass",
)  # fmt: skip
_PEOPLE = "{groups: [...], users: [...]}"


class _EntitlementCompiler:
    """Compile `entitlements:`, reporting through the policy compiler's error list."""

    def __init__(self, compiler: _Compiler) -> None:
        self.compiler = compiler
        self.err = compiler.err

    def compile(self, raw: Node) -> list[Entitlement]:
        items = raw.get("entitlements")
        if items is None:
            return []
        if not isinstance(items, Seq):
            self.err(raw, "entitlements", "entitlements", "must be a list")
            return []
        out: list[Entitlement] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = f"entitlements[{i}]"
            if not isinstance(item, Node):
                self.err(items, i, where, "must be a mapping")
                continue
            ent = self._entitlement(item, where, seen)
            if ent is not None:
                out.append(ent)
        return out

    def _entitlement(self, item: Node, where: str, seen: set[str]) -> Entitlement | None:
        before = len(self.compiler.errors)
        self.compiler.unknown(item, where, _ENTITLEMENT_FIELDS)
        eid = item.get("id")
        if not isinstance(eid, str) or not _ID.fullmatch(eid):
            self.err(item, "id", f"{where}.id", "is required: letters, digits, '.', '_' or '-'")
            eid = where
        elif eid in seen:
            self.err(item, "id", f"{where}.id", f"duplicate entitlement id {eid!r}")
        seen.add(eid)
        description = item.get("description", "")
        if not isinstance(description, str):
            self.err(item, "description", f"{where}.description", "must be a string")
        scopes = self._scopes(item, where)
        who = item.get("who")
        if who == "any":
            any_user, groups, users = True, frozenset[str](), frozenset[str]()
        else:
            any_user = False
            groups, users = self._people(item, "who", f"{where}.who", "'any' or " + _PEOPLE)
        durations = self._durations(item, where)
        reason = item.get("reason", "required")
        if reason not in ("required", "optional"):
            self.err(item, "reason", f"{where}.reason", "must be 'required' or 'optional'")
        ticket = self._ticket(item, where)
        pending_ttl = self._duration(item, "pending_ttl", f"{where}.pending_ttl", 3600.0)
        approval = self._approval(item, where)
        extend = self._extend(item, where, approval)
        break_glass = item.get("break_glass", False)
        if not isinstance(break_glass, bool):
            self.err(item, "break_glass", f"{where}.break_glass", "must be true or false")
        elif break_glass and approval is not None and approval.mode == "auto":
            # Auto approval already grants at once; break-glass exists to get an emergency
            # grant past approvers and have one of them review it afterwards.
            message = "needs approval mode approvers (they review the emergency access)"
            self.err(item, "break_glass", f"{where}.break_glass", message)
        elif break_glass and reason == "optional":
            message = "must be 'required' for break-glass access (the review needs it)"
            self.err(item, "reason", f"{where}.reason", message)
        elif approval is not None and approval.mode == "auto" and reason == "optional":
            # Self-service is only acceptable with a stated purpose on record.
            message = "must be 'required' with approval mode auto (self-service needs a purpose)"
            self.err(item, "reason", f"{where}.reason", message)
        failed = len(self.compiler.errors) > before
        if failed or durations is None or approval is None or pending_ttl is None:
            return None
        offered, default, maximum = durations
        return Entitlement(
            id=eid,
            description=str(description),
            scopes=scopes,
            any_user=any_user,
            groups=groups,
            users=users,
            durations=offered,
            default_duration=default,
            max_duration=maximum,
            reason_required=reason == "required",
            ticket_pattern=ticket,
            pending_ttl=pending_ttl,
            approval=approval,
            extend_requires_approval=extend,
            break_glass=bool(break_glass),
        )

    def _scopes(self, item: Node, where: str) -> tuple[str, ...]:
        value = item.get("scopes")
        if not isinstance(value, Seq) or not value:
            message = "is required: a non-empty list of scope templates"
            self.err(item, "scopes", f"{where}.scopes", message)
            return ()
        out: list[str] = []
        for i, template in enumerate(value):
            at = f"{where}.scopes[{i}]"
            if not isinstance(template, str) or not template:
                self.err(value, i, at, "must be a non-empty string")
                continue
            if _has_stray_braces(template):
                message = "malformed braces: a parameter is {name} (letters, digits, '_')"
                self.err(value, i, at, message)
                continue
            names = SCOPE_PARAM.findall(template)
            twice = next((n for n in names if names.count(n) > 1), None)
            if twice is not None:
                self.err(value, i, at, f"parameter {{{twice}}} appears twice")
            elif template in out:
                self.err(value, i, at, f"duplicate scope {template!r}")
            else:
                out.append(template)
        return tuple(out)

    def _people(
        self, node: Node, key: str, where: str, shape: str
    ) -> tuple[frozenset[str], frozenset[str]]:
        value = node.get(key)
        if not isinstance(value, Node):
            self.err(node, key, where, f"{'must be' if key in node else 'is required:'} {shape}")
            return frozenset(), frozenset()
        self.compiler.unknown(value, where, ("groups", "users"))
        before = len(self.compiler.errors)
        groups = self._names(value, "groups", where)
        users = self._names(value, "users", where)
        if not groups and not users and len(self.compiler.errors) == before:
            self.err(node, key, where, "must name at least one group or user")
        return groups, users

    def _names(self, node: Node, key: str, where: str) -> frozenset[str]:
        value = node.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.err(node, key, f"{where}.{key}", "must be a list of names")
            return frozenset()
        return frozenset(value)

    def _duration(
        self, node: Node, key: str, where: str, fallback: float | None = None
    ) -> float | None:
        if key not in node:
            return fallback
        return self._seconds(node, key, where, node[key])

    def _seconds(self, node: Node | Seq, key: str | int, where: str, value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.err(node, key, where, "must be a duration such as 90s, 5m, 2h or 1d, or seconds")
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(node, key, where, str(exc))
            return None

    def _durations(self, item: Node, where: str) -> tuple[tuple[float, ...], float, float] | None:
        at = f"{where}.durations"
        node = item.get("durations")
        if not isinstance(node, Node):
            self.err(item, "durations", at, "is required: {offered: [...], default: ..., max: ...}")
            return None
        self.compiler.unknown(node, at, ("offered", "default", "max"))
        before = len(self.compiler.errors)
        if "default" not in node:
            self.err(item, "durations", f"{at}.default", "is required")
        default = self._duration(node, "default", f"{at}.default")
        maximum = self._duration(node, "max", f"{at}.max")
        offered: dict[float, int] = {}  # seconds -> index, to place later errors
        raw = node.get("offered")
        if raw is not None and (not isinstance(raw, Seq) or not raw):
            self.err(node, "offered", f"{at}.offered", "must be a non-empty list of durations")
        elif raw is not None:
            for i, value in enumerate(raw):
                seconds = self._seconds(raw, i, f"{at}.offered[{i}]", value)
                if seconds is not None and seconds in offered:
                    message = f"duplicate duration {format_duration(seconds)}"
                    self.err(raw, i, f"{at}.offered[{i}]", message)
                elif seconds is not None:
                    offered[seconds] = i
        if default is None or len(self.compiler.errors) > before:
            return None
        if maximum is None:  # absent: the longest duration named
            maximum = max([default, *offered])
        limit = f"must not exceed max ({format_duration(maximum)})"
        if default > maximum:
            self.err(node, "default", f"{at}.default", limit)
        for seconds, i in offered.items():
            if seconds > maximum and isinstance(raw, Seq):
                self.err(raw, i, f"{at}.offered[{i}]", limit)
        if offered and default not in offered:
            # The workflow offers exactly these; a default outside them could not be picked.
            choices = ", ".join(format_duration(s) for s in sorted(offered))
            message = f"must be one of the offered durations ({choices})"
            self.err(node, "default", f"{at}.default", message)
        if len(self.compiler.errors) > before:
            return None
        return tuple(sorted(offered)) or (default,), default, maximum

    def _ticket(self, item: Node, where: str) -> re.Pattern[str] | None:
        node = item.get("ticket")
        if node is None:
            return None
        at = f"{where}.ticket"
        if not isinstance(node, Node):
            self.err(item, "ticket", at, "must be a mapping: {pattern: <regular expression>}")
            return None
        self.compiler.unknown(node, at, ("pattern",))
        pattern = node.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            message = "is required: a regular expression the whole ticket must match"
            self.err(node, "pattern", f"{at}.pattern", message)
            return None
        try:
            return re.compile(pattern)
        except re.error as exc:
            self.err(node, "pattern", f"{at}.pattern", f"invalid regular expression: {exc}")
            return None

    def _approval(self, item: Node, where: str) -> Approval | None:
        at = f"{where}.approval"
        node = item.get("approval")
        if not isinstance(node, Node):
            message = f"is required: {{mode: auto}} or {{mode: approvers, approvers: {_PEOPLE}}}"
            self.err(item, "approval", at, message)
            return None
        self.compiler.unknown(node, at, ("mode", "count", "approvers"))
        mode = node.get("mode")
        if mode == "auto":
            for key in ("count", "approvers"):
                if key in node:
                    self.err(node, key, f"{at}.{key}", "only for mode approvers")
            return Approval("auto", 0)
        if mode != "approvers":
            got = "" if mode is None else f", got {mode!r}"
            self.err(node, "mode", f"{at}.mode", f"must be 'auto' or 'approvers'{got}")
            return None
        count = node.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            self.err(node, "count", f"{at}.count", "must be an integer of at least 1")
            return None
        shape = f"{_PEOPLE} (needed for mode approvers)"
        groups, users = self._people(node, "approvers", f"{at}.approvers", shape)
        if users and not groups and count > len(users):
            named = f"{len(users)} user" + ("" if len(users) == 1 else "s")
            message = f"cannot be met: approvers names only {named}"
            self.err(node, "count", f"{at}.count", message)
        return Approval("approvers", count, groups, users)

    def _extend(self, item: Node, where: str, approval: Approval | None) -> bool:
        by_default = approval is not None and approval.mode == "approvers"
        node = item.get("extend")
        if node is None:
            return by_default
        at = f"{where}.extend"
        if not isinstance(node, Node):
            self.err(item, "extend", at, "must be a mapping: {requires_approval: true|false}")
            return by_default
        self.compiler.unknown(node, at, ("requires_approval",))
        value: object = node.get("requires_approval", by_default)
        if not isinstance(value, bool):
            self.err(node, "requires_approval", f"{at}.requires_approval", "must be true or false")
            return by_default
        if value and approval is not None and approval.mode == "auto":
            message = "needs approval mode approvers (auto approval has nobody to ask)"
            self.err(node, "requires_approval", f"{at}.requires_approval", message)
        return value
