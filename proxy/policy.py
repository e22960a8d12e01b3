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

Paths that match no route get the policy's `default` access.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .errors import ConfigError, ConfigErrors
from .yamlsrc import Node, Seq, load_text


class Access(StrEnum):
    PROTECTED = "protected"  # identity and an active grant for the route's scope
    IDENTITY = "identity"  # identity only
    PUBLIC = "public"  # nobody needs to be known
    BLOCKED = "blocked"  # refused for everyone, grant or not


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_MAX_SCOPE_DEPTH = 8


@dataclass(frozen=True)
class Match:
    route: str
    access: Access
    scope: str | None = None  # the route's own scope, e.g. recording:1/demo-1
    scopes: tuple[str, ...] = ()  # that scope and every scope that covers it, narrowest first


@dataclass(frozen=True)
class _Route:
    id: str
    methods: frozenset[str] | None
    regex: re.Pattern[str]
    access: Access
    scope: str | None


@dataclass(frozen=True)
class _Cover:
    regex: re.Pattern[str]
    covered_by: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    file: str
    version: str
    default: Access
    routes: tuple[_Route, ...]
    covers: tuple[_Cover, ...]

    def match(self, method: str, path: str) -> Match:
        """Return the first route that matches a normalised path, or the default."""
        for route in self.routes:
            if route.methods is not None and method not in route.methods:
                continue
            m = route.regex.match(path)
            if m is None:
                continue
            if route.scope is None:
                return Match(route.id, route.access)
            scope = route.scope.format_map(m.groupdict())
            return Match(route.id, route.access, scope, self.covering(scope))
        return Match("_default", self.default)

    def covering(self, scope: str) -> tuple[str, ...]:
        """Return the scope and all wider scopes that cover it, narrowest first."""
        found = [scope]
        frontier = [scope]
        for _ in range(_MAX_SCOPE_DEPTH):
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

    @property
    def route_ids(self) -> tuple[str, ...]:
        return (*(r.id for r in self.routes), "_default")


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
    return _Compiler(name).compile(raw, hashlib.sha256(text.encode()).hexdigest()[:16])


class _Compiler:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None:
        if isinstance(node, Node) and isinstance(key, str):
            line = node.line_of(key)
        elif isinstance(node, Seq) and isinstance(key, int):
            line = node.line_of(key)
        else:
            line = node.line
        self.errors.append(ConfigError(message, file=self.file, line=line, field=where))

    def compile(self, raw: object, version: str) -> Policy:
        if not isinstance(raw, Node):
            raise ConfigErrors([ConfigError("a policy must be a mapping", file=self.file, line=1)])
        for key in raw:
            if key not in ("version", "default", "routes", "hierarchy"):
                self.err(
                    raw, key, key, "unknown field (known: default, hierarchy, routes, version)"
                )
        if raw.get("version", 1) != 1:
            self.err(raw, "version", "version", "only version 1 is supported")
        default = self._access(raw, "default", "default", Access.IDENTITY)
        if default is Access.PROTECTED:
            self.err(raw, "default", "default", "cannot be 'protected' (it has no scope)")
        routes = self._routes(raw)
        covers = self._hierarchy(raw)
        if self.errors:
            raise ConfigErrors(self.errors)
        return Policy(self.file, version, default, tuple(routes), tuple(covers))

    def _access(self, node: Node, key: str, where: str, fallback: Access) -> Access:
        value = node.get(key, fallback.value)
        try:
            return Access(value)
        except ValueError:
            choices = ", ".join(a.value for a in Access)
            self.err(node, key, where, f"must be one of {choices}, got {value!r}")
            return fallback

    def _routes(self, raw: Node) -> list[_Route]:
        items = raw.get("routes")
        if not isinstance(items, Seq):
            self.err(raw, "routes", "routes", "is required and must be a list")
            return []
        out: list[_Route] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = f"routes[{i}]"
            if not isinstance(item, Node):
                self.err(items, i, where, "must be a mapping")
                continue
            route = self._route(item, where)
            if route is None:
                continue
            if route.id in seen:
                self.err(item, "id", f"{where}.id", f"duplicate route id {route.id!r}")
            seen.add(route.id)
            out.append(route)
        return out

    def _route(self, item: Node, where: str) -> _Route | None:
        known = {"id", "methods", "path", "subpaths", "access", "scope", "description"}
        for key in item:
            if key not in known:
                self.err(
                    item,
                    key,
                    f"{where}.{key}",
                    f"unknown field (known: {', '.join(sorted(known))})",
                )
        rid = item.get("id")
        if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", rid):
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
        scope = item.get("scope")
        if access is Access.PROTECTED:
            if not isinstance(scope, str) or not scope:
                self.err(item, "scope", f"{where}.scope", "is required for protected routes")
                scope = None
            else:
                for name in _PARAM.findall(scope):
                    if name not in params:
                        self.err(item, "scope", f"{where}.scope", f"unknown parameter {{{name}}}")
                if _has_stray_braces(scope):
                    self.err(item, "scope", f"{where}.scope", "unbalanced '{' or '}'")
        elif scope is not None:
            self.err(item, "scope", f"{where}.scope", "only protected routes have a scope")
            scope = None
        return _Route(rid, methods, regex, access, scope if isinstance(scope, str) else None)

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
            m = _PARAM.fullmatch(seg)
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

    def _hierarchy(self, raw: Node) -> list[_Cover]:
        items = raw.get("hierarchy")
        if items is None:
            return []
        if not isinstance(items, Seq):
            self.err(raw, "hierarchy", "hierarchy", "must be a list")
            return []
        out: list[_Cover] = []
        for i, item in enumerate(items):
            where = f"hierarchy[{i}]"
            if not isinstance(item, Node):
                self.err(items, i, where, "must be a mapping")
                continue
            for key in item:
                if key not in ("scope", "covered_by"):
                    self.err(
                        item, key, f"{where}.{key}", "unknown field (known: covered_by, scope)"
                    )
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
            params = _PARAM.findall(scope)
            for wider in covered_by:
                for name in _PARAM.findall(wider):
                    if name not in params:
                        self.err(
                            item,
                            "covered_by",
                            f"{where}.covered_by",
                            f"unknown parameter {{{name}}}",
                        )
            out.append(_Cover(re.compile(_scope_pattern(scope)), tuple(covered_by)))
        return out


def _scope_pattern(template: str) -> str:
    out, last = [], 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[last : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^/]+)")
        last = m.end()
    out.append(re.escape(template[last:]))
    return "".join(out)


def _has_stray_braces(template: str) -> bool:
    stripped = _PARAM.sub("", template)
    return "{" in stripped or "}" in stripped
