"""Expanding a preset table into a policy: its routes after the policy's `overrides:`.

The table was compiled by the policy compiler itself (same checks as any route); here
each route gets its preset-prefixed id (`posthog.recording`), and an override replaces
its fields (compiled again, errors placed in the policy file) or removes it.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Protocol

from ..policy import Policy, Route
from ..settings.yamlsrc import Node, Seq
from . import OVERRIDE_FIELDS, merged


class Compiler(Protocol):
    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...

    def unknown(self, node: Node, where: str, known: tuple[str, ...]) -> None: ...

    def _route(self, item: Node, where: str) -> Route | None: ...


def preset_routes(compiler: Compiler, raw: Node, table: Policy, items: Seq) -> list[Route]:
    """Return the table's routes, in its order, with the policy's overrides applied."""
    assert table.preset is not None
    name = table.preset.name
    ids = {f"{name}.{r.id}" for r in table.routes}
    overrides = _overrides(compiler, raw, name, ids)
    out: list[Route] = []
    for route, item in zip(table.routes, items, strict=True):
        full = f"{name}.{route.id}"
        found = overrides.get(full)
        if found is not None:
            where, override = found
            if override.get("disabled") is True:
                continue
            changed = compiler._route(merged(item, override), where)
            if changed is None:
                continue
            route = changed
        out.append(replace(route, id=full, preset=name))
    return out


def _overrides(
    compiler: Compiler, raw: Node, name: str, ids: set[str]
) -> dict[str, tuple[str, Node]]:
    items = raw.get("overrides")
    if items is None:
        return {}
    if not isinstance(items, Seq):
        compiler.err(raw, "overrides", "overrides", "must be a list")
        return {}
    out: dict[str, tuple[str, Node]] = {}
    for i, item in enumerate(items):
        where = f"overrides[{i}]"
        if not isinstance(item, Node):
            compiler.err(items, i, where, "must be a mapping")
            continue
        compiler.unknown(item, where, ("id", "disabled", *OVERRIDE_FIELDS))
        rid = item.get("id")
        fields = [k for k in OVERRIDE_FIELDS if k in item]
        if rid not in ids:
            compiler.err(item, "id", f"{where}.id", _unknown_id(rid, name, ids))
        elif rid in out:
            compiler.err(item, "id", f"{where}.id", f"{rid!r} is overridden twice")
        elif "disabled" in item and (item["disabled"] is not True or fields):
            message = "must be true, alone: a disabled route takes no other fields"
            compiler.err(item, "disabled", f"{where}.disabled", message)
        elif "disabled" not in item and not fields:
            listed = ", ".join(OVERRIDE_FIELDS)
            message = f"give the fields to replace ({listed}) or disabled: true"
            compiler.err(item, "id", where, message)
        else:
            out[str(rid)] = (where, item)
    return out


def _unknown_id(rid: object, name: str, ids: set[str]) -> str:
    if not isinstance(rid, str):
        return f"is required: the id of a route of preset {name}, e.g. {min(ids)}"
    close = difflib.get_close_matches(rid, sorted(ids), n=1)
    hint = f"; did you mean {close[0]}?" if close else f" (docs/presets/{name}.md lists them)"
    return f"preset {name} has no route {rid!r}{hint}"
