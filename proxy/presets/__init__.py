"""Preset route tables for real replay tools, shipped as package data.

A policy file names one with `preset: posthog`; policyfile.py compiles the table with the
same compiler and checks as the policy's own routes, prefixes its route ids with the
preset's name (`posthog.recording`), and applies the policy's `overrides:`. Each table is
a plain policy file with an `about:` block naming the tool, the version and the source
files it was taken from.
"""

from __future__ import annotations

from importlib import resources

from ..settings.yamlsrc import Node

NAMES = ("highlight", "openreplay", "posthog", "rrweb-generic", "sentry")
# Route fields an override may replace; `disabled: true` removes the route instead.
OVERRIDE_FIELDS = (
    "methods", "path", "subpaths", "access", "scope", "query", "description", "blobs",
)  # fmt: skip


def read(name: str) -> tuple[str, str]:
    """Return a preset table's text and the name its errors are reported under."""
    if name not in NAMES:
        raise KeyError(name)
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return text, f"proxy/presets/{name}.yaml"


def merged(base: Node, override: Node) -> Node:
    """Return a preset route with an override's fields in place of its own.

    Lines point at the override (the policy file is where a mistake would be fixed). A
    route that stops being protected loses the preset's scope unless the override gives one;
    one that stops being an identity route loses its `list:`, and a public or blocked one
    its `refs:`.
    """
    out = Node()
    out.line = override.line
    out.key_lines = {}
    for key, value in base.items():
        out[key] = value
        out.key_lines[key] = override.line
    for key in OVERRIDE_FIELDS:
        if key in override:
            out[key] = override[key]
            out.key_lines[key] = override.line_of(key)
    if override.get("access", "protected") not in ("protected",) and "scope" not in override:
        out.pop("scope", None)
        if "query" not in override:
            out.pop("query", None)
    if override.get("access", "identity") not in ("identity", "identity-only"):
        out.pop("list", None)  # only identity routes list recordings (lists.py)
    if override.get("access", "identity") in ("public", "blocked"):
        out.pop("refs", None)  # no caller whose grants a reference could be checked against
    return out
