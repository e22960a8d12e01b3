"""Deciding on a POST's JSON or GraphQL body: which body rule matches, and what it binds.

A route with `body:` matches only when its body rule does:

    - id: highlight-session
      methods: [POST]
      path: /private
      body:
        graphql:
          operation: GetSession            # the name of the operation executed
          fields: [session]                # the root fields it may select (not aliases)
          variables: {session_secure_id: "{recording}"}
      scope: "recording:{recording}"
    - id: query-replay
      methods: [POST]
      path: /api/projects/{project}/query
      body:
        json: {query.kind: SessionsTimelineQuery}
      access: identity

The routes with `body:` sharing a path are tried in order on one parse of the body; when
none matches, the request is blocked: an unknown operation on such an endpoint is refused
by default. The body is held whole (up to `forward.max_body_bytes`) and forwarded byte for
byte as decided on. What cannot be read one way only is refused (400): invalid UTF-8 or
JSON, duplicate keys (upstreams differ on which wins), NaN, deep nesting, a batch (a JSON
array), a persisted query (a hash in place of a document), a document whose executed
operation is not determined, a root fragment spread, and, where a rule binds variables, any
string literal in the document or string in a variable the rule does not bind (it could
name another recording than the bound variables do). Operation names are chosen by the
client: a rule also lists the root fields the operation may select, by field name (an
alias cannot disguise a field).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from graphql import GraphQLError
from graphql import parse as gql_parse
from graphql.language import FieldNode, OperationDefinitionNode, StringValueNode, Visitor, visit

from .settings.yamlsrc import Node, Seq

SCOPE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # as in policy.py
VALUE_VAR = r'[^/"\\\x00-\x20\x7f]+'
MAX_DEPTH = 64  # JSON nesting a body rule reads


class BadBody(ValueError):
    """The body cannot be read one way only: the request is refused (400)."""


class BodyTooLarge(ValueError):
    """The body is over `forward.max_body_bytes`: the request is refused (413)."""


@dataclass(frozen=True)
class Template:
    text: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]


def template(text: str) -> Template:
    out, last = [], 0
    for m in SCOPE_PARAM.finditer(text):
        out.append(re.escape(text[last : m.start()]))
        out.append(f"(?P<{m.group(1)}>{VALUE_VAR})")
        last = m.end()
    out.append(re.escape(text[last:]))
    return Template(text, re.compile("".join(out)), tuple(SCOPE_PARAM.findall(text)))


@dataclass(frozen=True)
class BodyRule:
    """A `json:` rule (field paths) or a `graphql:` rule (operation, fields, variables)."""

    kind: str  # "json" | "graphql"
    fields: tuple[tuple[tuple[str, ...], Template], ...] = ()  # json: path -> template
    operation: str | None = None  # graphql
    root_fields: frozenset[str] = frozenset()  # graphql
    variables: tuple[tuple[str, Template], ...] = ()  # graphql

    @property
    def binds(self) -> tuple[str, ...]:
        pairs = self.fields if self.kind == "json" else self.variables
        return tuple(v for _, t in pairs for v in t.variables)

    def describe(self) -> str:
        if self.kind == "json":
            return "json " + ", ".join(".".join(p) + "=" + t.text for p, t in self.fields)
        return f"graphql operation {self.operation}"


@dataclass(frozen=True)
class Parsed:
    """One body, parsed once for every body rule of a path."""

    doc: Any  # the JSON value
    operation: str | None = None  # graphql: the executed operation's name
    root_fields: frozenset[str] = frozenset()
    literals: bool = False  # graphql: the document holds a string literal


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadBody(f"the JSON body names {key!r} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BadBody(f"the JSON body holds {name}, which is not JSON")


def parse_json(body: bytes) -> Any:
    """Parse strict JSON: UTF-8 only, no duplicate keys, no NaN, bounded nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise BadBody("the body starts with a byte order mark")
    depth = max(text.count("["), text.count("{"))
    if depth > MAX_DEPTH and _nesting(text) > MAX_DEPTH:
        raise BadBody(f"the JSON body nests deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, BadBody):
            raise
        raise BadBody(f"the body is not valid JSON ({exc})") from None


def _nesting(text: str) -> int:
    deepest = depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse(body: bytes, graphql: bool) -> Parsed:
    """Parse a body once; for GraphQL, find the operation the server will execute."""
    doc = parse_json(body)
    if not graphql:
        return Parsed(doc)
    if isinstance(doc, list):
        raise BadBody("a batch of GraphQL operations (a JSON array) is not decided on")
    if not isinstance(doc, dict):
        raise BadBody("a GraphQL request must be a JSON object")
    extensions = doc.get("extensions")
    if isinstance(extensions, dict) and "persistedQuery" in extensions:
        raise BadBody("a persisted query names its document by hash: it is not decided on")
    query = doc.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadBody("a GraphQL request needs its document in 'query'")
    name = doc.get("operationName")
    if name is not None and not isinstance(name, str):
        raise BadBody("'operationName' must be a string")
    variables = doc.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise BadBody("'variables' must be an object")
    return _graphql(doc, query, name or None)


def _graphql(doc: Any, query: str, name: str | None) -> Parsed:
    try:
        document = gql_parse(query, no_location=True, max_tokens=20_000)
    except GraphQLError as exc:
        raise BadBody(f"the GraphQL document does not parse: {exc.message}") from None
    ops = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        if len(ops) != 1:
            raise BadBody("several operations and no 'operationName': which runs is not decided")
        op = ops[0]
    else:
        named = [o for o in ops if o.name is not None and o.name.value == name]
        if len(named) != 1:
            raise BadBody(f"operationName {name!r} names no single operation of the document")
        op = named[0]
    if op.name is None:
        raise BadBody("an anonymous operation: rules match operations by name")
    roots: set[str] = set()
    for selection in op.selection_set.selections:
        if not isinstance(selection, FieldNode):
            raise BadBody("a fragment at the operation's root: its fields are not decided on")
        roots.add(selection.name.value)

    class Strings(Visitor):
        found = False

        def enter_string_value(self, node: StringValueNode, *_: object) -> None:
            self.found = True

    strings = Strings()
    visit(document, strings)
    return Parsed(doc, op.name.value, frozenset(roots), strings.found)


def match(rule: BodyRule, parsed: Parsed) -> dict[str, str] | None:
    """Return the variables a matching rule binds, None if it does not match.

    Raises BadBody where the body matches but cannot be decided (e.g. a stray string).
    """
    if rule.kind == "json":
        return _match_json(rule, parsed.doc)
    if parsed.operation != rule.operation:
        return None
    extra = parsed.root_fields - rule.root_fields - {"__typename"}
    if extra:
        raise BadBody(f"operation {rule.operation} selects {', '.join(sorted(extra))} too")
    values: dict[str, str] = {}
    variables = parsed.doc.get("variables") or {}
    if rule.variables:
        if parsed.literals:
            raise BadBody("a string literal in the document could name another recording")
        bound = {name for name, _ in rule.variables}
        for key, value in variables.items():
            if key not in bound and _has_string(value):
                raise BadBody(f"variable {key!r} holds a string the rule does not bind")
    for key, tmpl in rule.variables:
        value = variables.get(key)
        if not isinstance(value, str):
            raise BadBody(f"variable {key!r} must be a string")
        values.update(_bind(tmpl, value, f"variable {key!r}"))
    return values


def _match_json(rule: BodyRule, doc: Any) -> dict[str, str] | None:
    values: dict[str, str] = {}
    for path, tmpl in rule.fields:
        node = doc
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        if not isinstance(node, str):
            return None
        if not tmpl.variables:
            if node != tmpl.text:
                return None
            continue
        values.update(_bind(tmpl, node, ".".join(path)))
    return values


def _bind(tmpl: Template, value: str, what: str) -> dict[str, str]:
    m = tmpl.regex.fullmatch(value)
    if m is None:
        raise BadBody(f"{what} must have the form {tmpl.text}")
    return m.groupdict()


def _has_string(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return any(_has_string(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_string(v) for v in value)
    return False


# --- compiling `body:` ------------------------------------------------------------------

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Errors(Protocol):
    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...


def compile_body(compiler: _Errors, item: Node, where: str, params: set[str]) -> BodyRule | None:
    """Compile a route's `body:` ({json: {...}} or {graphql: {...}}); report errors."""
    node = item.get("body")
    if node is None:
        return None
    err, at = compiler.err, f"{where}.body"
    if not isinstance(node, Node) or len(node) != 1 or next(iter(node)) not in ("json", "graphql"):
        err(item, "body", at, "must be {json: {FIELD.PATH: TEMPLATE}} or {graphql: {...}}")
        return None
    kind = next(iter(node))
    inner = node[kind]
    at = f"{at}.{kind}"
    seen = set(params)

    def tmpl(owner: Node, key: str, here: str) -> Template | None:
        value = owner.get(key)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            err(owner, key, here, "must be a string (a literal or a template such as {recording})")
            return None
        text = str(value)
        rest = SCOPE_PARAM.sub("", text)
        if "{" in rest or "}" in rest:
            err(owner, key, here, "unbalanced '{' or '}'")
            return None
        for var in SCOPE_PARAM.findall(text):
            if var in seen:
                err(owner, key, here, f"parameter {{{var}}} is bound twice")
            seen.add(var)
        return template(text)

    if kind == "json":
        if not isinstance(inner, Node) or not inner:
            err(node, kind, at, "must map field paths (query.kind) to templates")
            return None
        fields = []
        for key in inner:
            path = tuple(str(key).split("."))
            if not all(_FIELD.fullmatch(p) for p in path):
                err(inner, key, f"{at}.{key}", "a field path: names joined by '.'")
                continue
            t = tmpl(inner, key, f"{at}.{key}")
            if t is not None:
                fields.append((path, t))
        return BodyRule("json", fields=tuple(fields))
    if not isinstance(inner, Node):
        err(node, kind, at, "must be {operation: NAME, fields: [...], variables: {...}}")
        return None
    for key in inner:
        if key not in ("operation", "fields", "variables"):
            err(inner, key, f"{at}.{key}", "unknown field (known: fields, operation, variables)")
    operation = inner.get("operation")
    if not isinstance(operation, str) or not _FIELD.fullmatch(operation):
        err(inner, "operation", f"{at}.operation", "is required: the operation's name")
        return None
    roots = inner.get("fields")
    if (
        not isinstance(roots, list)
        or not roots
        or not all(isinstance(f, str) and _FIELD.fullmatch(f) for f in roots)
    ):
        message = "is required: the root fields the operation may select"
        err(inner, "fields", f"{at}.fields", message)
        return None
    variables = []
    raw = inner.get("variables", Node())
    if not isinstance(raw, Node):
        err(inner, "variables", f"{at}.variables", "must map variable names to templates")
        return None
    for key in raw:
        if not isinstance(key, str) or not _FIELD.fullmatch(key):
            err(raw, key, f"{at}.variables.{key}", "a GraphQL variable name")
            continue
        t = tmpl(raw, key, f"{at}.variables.{key}")
        if t is not None:
            variables.append((key, t))
    return BodyRule(
        "graphql", operation=operation, root_fields=frozenset(roots), variables=tuple(variables)
    )
