"""Sensitive recordings in lists: which of those a caller's grants cover stay locked.

A list's rewrite (lists.py) finds which of its recordings the caller holds a grant for;
the policy's sensitivity rules (sensitivity.py) may still keep some of them closed, as
they would when the recording is opened. `locks` says which, from what is already known:

- metadata a `block` rule matches: locked with the rule's reason, no request link;
- metadata a `require` rule matches, under a grant given by none of its entitlements:
  locked with the rule's refusal, and a request link (a grant under one of them opens it);
- metadata not known yet, of a recording the rules could match: locked, "metadata
  unknown" (fail closed); the lookup starts a fetch in the background, so the next list
  is exact. The list never waits for the replay tool.

It reads the metadata and the grants' entitlements through `Lookups`, which the gate
wires: the metadata of all of a list's recordings in one batch (memory, then one Redis
round trip), the entitlements of the grants a `require` rule concerns in another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .sensitivity import Rule, matching

log = logging.getLogger("jitgate.lists")

UNKNOWN = "metadata unknown"
# The cached metadata of each scope the metadata describes (None: not known yet).
MetadataBatch = Callable[[list[str]], Awaitable[Mapping[str, Mapping[str, Any] | None]]]
# The entitlement each grant was given under, by id ("" for an admin's; absent: gone).
EntitlementBatch = Callable[[list[str]], Awaitable[Mapping[str, str]]]


@dataclass(frozen=True)
class Lookups:
    metadata: MetadataBatch
    entitlements: EntitlementBatch


class Lock(NamedTuple):
    reason: str
    requestable: bool  # whether a grant request could open it (not for a `block` rule)


async def locks(
    rules: tuple[Rule, ...], held: Mapping[str, str | None], lookups: Lookups | None
) -> dict[str, Lock]:
    """The sensitivity lock of each scope `held` maps to a grant id, where one applies."""
    scopes = [scope for scope, grant in held.items() if grant]
    if not rules or not scopes:
        return {}
    if lookups is None:
        return {s: Lock(f"{UNKNOWN} (no metadata section is configured)", True) for s in scopes}
    try:
        metas = await lookups.metadata(scopes)
    except Exception as exc:  # in doubt: every recording stays closed
        log.warning("list: metadata not read (%r): every granted recording locked", exc)
        return {s: Lock(UNKNOWN, True) for s in scopes}
    out: dict[str, Lock] = {}
    needs: dict[str, Rule] = {}  # require rules: the grant's entitlement decides
    for scope, meta in metas.items():
        if meta is None:
            out[scope] = Lock(UNKNOWN, True)
            continue
        rule = matching(rules, meta)
        if rule is None:
            continue
        if rule.action == "block":
            out[scope] = Lock(rule.reason, False)
        else:
            needs[scope] = rule
    if not needs:
        return out
    try:
        found = await lookups.entitlements([held[s] or "" for s in needs])
    except Exception as exc:
        log.warning("list: grant entitlements not read (%r): locked", exc)
        why = "the entitlement of the grant cannot be read"
        return out | {s: Lock(why, True) for s in needs}
    for scope, rule in needs.items():
        refusal = rule.refusal(found.get(held[scope] or ""))
        if refusal is not None:
            out[scope] = Lock(refusal, True)
    return out
