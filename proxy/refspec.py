"""Compiling a route's `refs:`: the response fields that point at recordings.

Called by the policy compiler (policyfile.py, through listspec.response); what they mean
is in refs.py.

    refs:
      - field: results.*.item_id            # key path; * steps into every array element
        scope: "recording:{project}/{recording}"   # the path's values and one more
        when: {scope: recording}            # only where the sibling field is this string
        drop: [content, rich_content]       # removed with a locked reference
      - field: backdrop.events_url          # no scope: a URL, decided by the policy's routes
        locked: remove                      # mark (the default) or remove
"""

from __future__ import annotations

from typing import Protocol

from .policy import SCOPE_PARAM, Access, Ref
from .settings.yamlsrc import Node, Seq

KEYS = ("field", "scope", "when", "drop", "locked")


class Compiler(Protocol):
    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...

    def unknown(self, node: Node, where: str, known: tuple[str, ...]) -> None: ...


def refs(c: Compiler, item: Node, where: str, params: set[str], access: Access) -> tuple[Ref, ...]:
    """A route's `refs:`, a list of {field, scope?, when?, drop?, locked?}."""
    raw, at = item.get("refs"), f"{where}.refs"
    if not isinstance(raw, Seq) or not raw:
        c.err(item, "refs", at, "must be a non-empty list of {field, scope, when, drop, locked}")
        return ()
    if access not in (Access.IDENTITY, Access.PROTECTED):
        c.err(item, "refs", at, "only identity and protected routes have a caller to check")
    out = []
    for i, entry in enumerate(raw):
        here = f"{at}[{i}]"
        if not isinstance(entry, Node):
            c.err(raw, i, here, "must be a mapping: {field, scope, when, drop, locked}")
            continue
        ref = _ref(c, entry, here, params)
        if ref is not None:
            out.append(ref)
    return tuple(out)


def _ref(c: Compiler, entry: Node, here: str, params: set[str]) -> Ref | None:
    c.unknown(entry, here, KEYS)
    field = entry.get("field")
    if not isinstance(field, str) or not all(field.split(".")) or field.endswith("*"):
        c.err(entry, "field", f"{here}.field", "is required: a dotted key path, * for each item")
        return None
    scope, var = entry.get("scope"), None
    if scope is not None:
        names = SCOPE_PARAM.findall(scope) if isinstance(scope, str) else []
        extra = [name for name in names if name not in params]
        balanced = isinstance(scope, str) and scope.count("{") == scope.count("}") == len(names)
        if not isinstance(scope, str) or len(extra) != 1 or not balanced:
            message = "must be a scope template of the path's values and one more, the field's"
            c.err(entry, "scope", f"{here}.scope", message)
            return None
        var = extra[0]
    when = entry.get("when", Node())
    if not isinstance(when, Node) or not all(isinstance(v, str) for v in when.values()):
        c.err(entry, "when", f"{here}.when", "must map sibling fields to strings")
        when = Node()
    drop = entry.get("drop", [])
    if not isinstance(drop, list) or not all(isinstance(d, str) and d for d in drop):
        c.err(entry, "drop", f"{here}.drop", "must be a list of sibling field names")
        drop = []
    locked = entry.get("locked", "mark")
    if locked not in ("mark", "remove"):
        c.err(entry, "locked", f"{here}.locked", f"must be mark or remove, got {locked!r}")
    pairs = tuple((str(k), str(v)) for k, v in when.items())
    path = tuple(field.split("."))
    return Ref(path, scope, var, pairs, tuple(drop), remove=locked == "remove")
