"""Scope variables taken from a request's query string, read the way the upstream reads it.

A route can bind scope variables from query parameters:

    - id: matching-events
      path: /api/projects/{project}/session_recordings/matching_events
      query: {session_ids: '["{recording}"]'}
      scope: "recording:{project}/{recording}"

Each named parameter must appear exactly once, non-empty, and its decoded value must match
its template whole. Anything else is refused (400) rather than guessed at, because the
upstream acts on the query as the client sent it (it is forwarded unchanged): a parameter
given twice (frameworks differ on first or last), spelled in another case or encoded
differently (`session%5Fids`), split by `;` (some servers read it as `&`), missing, empty,
with control characters or not valid UTF-8 all could make the upstream act on a recording
other than the one the grant was checked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_plus

from .settings.yamlsrc import Node, Seq

SCOPE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # as in policy.py
# A variable read from a query value: no '/', quote, backslash, space or control
# character, so a JSON template such as ["{recording}"] matches one plain string only.
VALUE_VAR = r'[^/"\\\x00-\x20\x7f]+'
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class BadQuery(ValueError):
    """The query string cannot be read one way only: the request is refused (400)."""


@dataclass(frozen=True)
class QueryBind:
    """One query parameter a route reads, and the template its value must match."""

    name: str  # the parameter, as the upstream spells it
    template: str  # e.g. {recording} or ["{recording}"]
    regex: re.Pattern[str]
    variables: tuple[str, ...]


def compile_bind(name: str, template: str) -> QueryBind:
    out, last = [], 0
    for m in SCOPE_PARAM.finditer(template):
        out.append(re.escape(template[last : m.start()]))
        out.append(f"(?P<{m.group(1)}>{VALUE_VAR})")
        last = m.end()
    out.append(re.escape(template[last:]))
    names = tuple(SCOPE_PARAM.findall(template))
    return QueryBind(name, template, re.compile("".join(out)), names)


def bind(query: str, binds: tuple[QueryBind, ...]) -> dict[str, str]:
    """Return the variables the query's parameters bind; raise BadQuery when in doubt."""
    if ";" in query:
        raise BadQuery("';' in the query string (some servers read it as '&')")
    wanted = {b.name.casefold(): b for b in binds}
    found: dict[str, str] = {}
    for part in query.split("&") if query else ():
        raw_name, _, raw_value = part.partition("=")
        try:
            name = unquote_plus(raw_name, errors="strict")
        except UnicodeDecodeError:
            raise BadQuery("a query parameter name is not valid UTF-8") from None
        b = wanted.get(name.casefold())
        if b is None:
            continue
        if name != b.name or raw_name != b.name:
            raise BadQuery(f"query parameter {b.name!r} spelled {raw_name!r}")
        if b.name in found:
            raise BadQuery(f"query parameter {b.name!r} given more than once")
        try:
            found[b.name] = unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise BadQuery(f"query parameter {b.name!r} is not valid UTF-8") from None
    out: dict[str, str] = {}
    for b in binds:
        value = found.get(b.name)
        if value is None:
            raise BadQuery(f"query parameter {b.name!r} is required")
        if not value:
            raise BadQuery(f"query parameter {b.name!r} is empty")
        if _CONTROL.search(value):
            raise BadQuery(f"query parameter {b.name!r} holds a control character")
        m = b.regex.fullmatch(value)
        if m is None:
            raise BadQuery(f"query parameter {b.name!r} must have the form {b.template}")
        out.update(m.groupdict())
    return out


class _Errors(Protocol):
    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...


def compile_query(
    compiler: _Errors, item: Node, where: str, params: set[str], protected: bool
) -> tuple[QueryBind, ...]:
    """Compile a route's `query:`; report errors through the policy compiler."""
    node = item.get("query")
    if node is None:
        return ()
    err, at = compiler.err, f"{where}.query"
    if not protected:
        err(item, "query", at, "only protected routes bind scope variables")
        return ()
    if not isinstance(node, Node) or not node:
        err(item, "query", at, 'must map parameters to templates: {name: "{var}"}')
        return ()
    out: list[QueryBind] = []
    seen = set(params)
    for name, template in node.items():
        here = f"{at}.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            err(node, name, here, "a parameter name: letters, digits, '_', '-', '.'")
            continue
        rest = SCOPE_PARAM.sub("", template) if isinstance(template, str) else "{"
        if "{" in rest or "}" in rest:
            err(node, name, here, 'must be a template naming variables: "{var}"')
            continue
        names = SCOPE_PARAM.findall(template)
        if not names:
            err(node, name, here, "must name at least one variable, e.g. {recording}")
            continue
        for var in names:
            if var in seen:
                err(node, name, here, f"parameter {{{var}}} is bound twice")
            seen.add(var)
        if any(b.name.casefold() == name.casefold() for b in out):
            err(node, name, here, "named twice (names are compared ignoring case)")
        out.append(compile_bind(name, template))
    return tuple(out)
