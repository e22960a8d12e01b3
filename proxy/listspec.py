"""Compiling the policy's list settings: a route's `list:` and the top-level `lists:` mode.

Called by the policy compiler (policyfile.py); what they mean is in lists.py. A route's
`refs:` (refspec.py) is compiled alongside its `list:`: both say what in its response
is checked against the caller's grants.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from . import refspec
from .errors import ConfigError, ConfigErrors
from .policy import SCOPE_PARAM, Access, Listing, Policy
from .settings.yamlsrc import Node, Seq

MODES = ("annotate", "filter", "pass")


class Compiler(Protocol):
    errors: list[ConfigError]

    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...

    def unknown(self, node: Node, where: str, known: tuple[str, ...]) -> None: ...


def response(
    c: Compiler, item: Node, where: str, params: set[str], access: Access
) -> dict[str, Any]:
    """A route's `list:` and `refs:`, as the Route fields `listing` and `refs`."""
    found = listing(c, item, where, params, access) if "list" in item else None
    refs = refspec.refs(c, item, where, params, access) if "refs" in item else ()
    return {"listing": found, "refs": refs}


def listing(
    c: Compiler, item: Node, where: str, params: set[str], access: Access
) -> Listing | None:
    """A list route's `list: {items, id, scope}`."""
    raw, at = item.get("list"), f"{where}.list"
    if not isinstance(raw, Node):
        c.err(item, "list", at, "must be a mapping: {items, id, scope}")
        return None
    c.unknown(raw, at, ("items", "id", "scope"))
    if access is not Access.IDENTITY:
        c.err(item, "list", at, "only identity routes list recordings")
    items, rid, scope = raw.get("items", ""), raw.get("id"), raw.get("scope")
    if not isinstance(items, str) or (items and not all(items.split("."))):
        c.err(raw, "items", f"{at}.items", "must be a dotted key path, or '' for the body")
        items = ""
    if not isinstance(rid, str) or not rid:
        c.err(raw, "id", f"{at}.id", "is required: the item field that holds the id")
        rid = None
    names = SCOPE_PARAM.findall(scope) if isinstance(scope, str) else []
    extra = [name for name in names if name not in params]
    balanced = isinstance(scope, str) and scope.count("{") == scope.count("}") == len(names)
    if not isinstance(scope, str) or len(extra) != 1 or not balanced:
        message = "is required: a scope template of the path's parameters and one more"
        c.err(raw, "scope", f"{at}.scope", message + ", which the item's id fills")
        return None
    if rid is None:
        return None
    return Listing(tuple(items.split(".")) if items else (), rid, scope, extra[0])


def settings(c: Compiler, raw: Node, policy: Policy) -> Policy:
    """The policy with its top-level `lists:` mode and `list_max_bytes:` cap."""
    mode = raw.get("lists", "pass")
    cap = raw.get("list_max_bytes", policy.list_max_bytes)
    if mode not in MODES:
        c.err(raw, "lists", "lists", f"must be annotate, filter or pass, got {mode!r}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        c.err(raw, "list_max_bytes", "list_max_bytes", "must be a positive number of bytes")
    if c.errors:
        raise ConfigErrors(c.errors)
    return replace(policy, lists=str(mode), list_max_bytes=int(cap))
