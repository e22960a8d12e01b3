"""References in responses: fields that point at recordings, checked against the caller's grants.

A route's `refs:` (compiled by refspec.py) names the fields of its JSON response that
point at a recording, by id (with a scope template, as a list's items) or by URL (whose
path the policy's own routes decide: a protected route gives the scope, a public or
identity route leaves the reference alone, anything blocked or undecidable is locked).
Each reference the caller holds no grant for is locked: its value is replaced with a
marker, `{"jitgate": {"locked": true, "scope": ..., "request_url": ...}}`, or the field
is removed (`locked: remove`), and the sibling fields its `drop:` names go with it.

The references are found in the parsed document by `find` and checked in the same batched
grant lookup as the response's list (lists.py, which holds and parses the body); when the
grants cannot be checked, `apply` removes every reference: nothing is shown as open while
in doubt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from .errors import BadPath
from .paths import normalise
from .policy import Access, Policy, Ref

BAD_ID = frozenset("/{}")  # an id with these cannot be put into a scope
Marker = Callable[[str | None], dict[str, Any]]  # the lock marker of a scope (lists.py)


@dataclass(frozen=True)
class Site:
    """One reference found in a response: `parent[key]`, and the scope it needs (None: unknown)."""

    parent: dict[str, Any]
    key: str
    scope: str | None
    ref: Ref


def find(
    doc: Any, refs: tuple[Ref, ...], params: Mapping[str, str], policy: Policy, prefix: str
) -> list[Site]:
    """Every reference `refs` name in a document, with the scope each one needs."""
    sites = []
    for ref in refs:
        for parent, key in _walk(doc, ref.at):
            if any(parent.get(k) != v for k, v in ref.when):
                continue
            value = parent[key]
            if value is None or value == "":
                continue  # points at nothing
            if ref.scope is not None:
                sites.append(Site(parent, key, id_scope(value, ref.scope, ref.var, params), ref))
                continue
            scope, free = url_scope(value, policy, prefix)
            if not free:
                sites.append(Site(parent, key, scope, ref))
    return sites


def apply(sites: list[Site], held: Mapping[str, bool] | None, marker: Marker) -> int:
    """Lock each reference not held (all when `held` is None, unknown); return how many."""
    locked = 0
    for site in sites:
        if held is not None and site.scope is not None and held.get(site.scope, False):
            continue
        locked += 1
        if held is None or site.ref.remove:
            site.parent.pop(site.key, None)
        else:
            site.parent[site.key] = {"jitgate": marker(site.scope)}
        for name in site.ref.drop:
            site.parent.pop(name, None)
    return locked


def id_scope(
    value: object, template: str, var: str | None, params: Mapping[str, str]
) -> str | None:
    """The scope an item's id fills in, or None if the id cannot be one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if var is None or not isinstance(value, str) or not value or not BAD_ID.isdisjoint(value):
        return None
    return template.format_map({**params, var: value})


def url_scope(value: object, policy: Policy, prefix: str) -> tuple[str | None, bool]:
    """The scope a URL's path needs by the policy's routes, and whether it needs none."""
    if not isinstance(value, str):
        return None, False
    try:
        url = URL(value)
    except ValueError:
        return None, False
    if url.scheme not in ("", "http", "https") or not url.raw_path.startswith("/"):
        return None, False
    try:
        path = normalise(url.raw_path)
    except BadPath:
        return None, False
    low = path.lower()
    if low == prefix.lower() or low.startswith(prefix.lower() + "/"):
        return None, True  # jitgate's own (a signed blob URL, a request link)
    match = policy.match("GET", path, url.raw_query_string)
    if match.body or match.invalid is not None or match.access is Access.BLOCKED:
        return None, False
    if match.access is not Access.PROTECTED:
        return None, True
    return match.scope, False


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[dict[str, Any], str]]:
    """Each (object, key) the key path reaches; `*` steps into every element of an array."""
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(node, list):
            for element in node:
                yield from _walk(element, rest)
    elif isinstance(node, dict) and head in node:
        if rest:
            yield from _walk(node[head], rest)
        else:
            yield node, head
