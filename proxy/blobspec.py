"""Compiling a route's `blobs:` section: the JSON fields that hold presigned storage URLs.

Called by the policy compiler (policyfile.py); what is done with them is in blobs.py.
"""

from __future__ import annotations

from .listspec import Compiler
from .policy import Access, Blobs
from .settings.yamlsrc import Node


def blobs(c: Compiler, item: Node, where: str, access: Access) -> Blobs | None:
    """A protected route's `blobs: {fields: [data.domURL, ...]}`; null: none.

    On a blocked route (a preset's route overridden to `access: blocked`) it is ignored:
    nothing is forwarded there. On identity and public routes it is an error.
    """
    raw, at = item.get("blobs"), f"{where}.blobs"
    if raw is None or access is Access.BLOCKED:
        return None
    if not isinstance(raw, Node):
        c.err(item, "blobs", at, "must be a mapping: {fields: [key paths]}")
        return None
    c.unknown(raw, at, ("fields",))
    if access is not Access.PROTECTED:
        message = "only protected routes hand out recording files (blobs: null to drop it)"
        c.err(item, "blobs", at, message)
    fields = raw.get("fields")
    if not isinstance(fields, list) or not fields:
        c.err(raw, "fields", f"{at}.fields", "is required: a list of dotted key paths")
        return None
    out: list[tuple[str, ...]] = []
    for i, field in enumerate(fields):
        if not isinstance(field, str) or not field or not all(field.split(".")):
            c.err(raw, "fields", f"{at}.fields[{i}]", f"must be a dotted key path, got {field!r}")
            continue
        out.append(tuple(field.split(".")))
    return Blobs(tuple(dict.fromkeys(out))) if out else None
