"""Sensitivity rules: recordings that hold more than others, by what their metadata says.

A policy's `sensitivity:` rules match a recording's metadata (from the replay tool, see
proxy/metadata/) by the URLs it visited (globs) and by person properties (a value or a set
of values). A recording that a `block` rule matches is refused under any grant, with the
rule's reason ("this recording includes /billing/*"); one that a `require` rule matches
only under a grant given by one of the rule's entitlements (their approvers, ticket and
maximum then apply). Compiled with the policy; a plain mapping of metadata (`urls`,
`start_url`, `properties`) is all this module reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError, ConfigErrors
from .policy import Policy
from .settings.yamlsrc import Node, Seq

ACTIONS = ("block", "require")
METADATA_FIELDS = ("start_url", "urls", "properties")  # what the rules read
_FIELDS = ("id", "description", "reason", "urls", "properties", "action", "entitlements")


@dataclass(frozen=True)
class Rule:
    id: str
    reason: str  # what decisions and refusal pages say
    urls: tuple[str, ...] = ()  # globs; `/...` against a URL's path, else the whole URL
    properties: tuple[tuple[str, frozenset[str]], ...] = ()  # each must hold
    action: str = "block"
    entitlements: tuple[str, ...] = ()  # with `require`: the only ones whose grants open it

    def refusal(self, entitlement: str | None) -> str | None:
        """Why a grant under `entitlement` cannot open a matching recording, or None if it can."""
        if self.action == "block":
            return self.reason
        if entitlement in self.entitlements:
            return None
        under = f"; the grant is under {entitlement!r}" if entitlement else ""
        return f"{self.reason}: it needs a grant under {' or '.join(self.entitlements)}{under}"

    def matches(self, meta: Mapping[str, Any]) -> bool:
        """Whether the recording's metadata meets every condition the rule gives."""
        if self.urls and not any(_url_matches(u, self.urls) for u in _urls(meta)):
            return False
        props = meta.get("properties") or {}
        for name, allowed in self.properties:
            value = props.get(name) if isinstance(props, Mapping) else None
            values = value if isinstance(value, list) else [value]
            if not any(v is not None and _text(v) in allowed for v in values):
                return False
        return True


def matching(rules: tuple[Rule, ...], meta: Mapping[str, Any]) -> Rule | None:
    """Return the first rule the metadata matches, or None."""
    return next((rule for rule in rules if rule.matches(meta)), None)


def _urls(meta: Mapping[str, Any]) -> list[str]:
    found = [u for u in meta.get("urls") or () if isinstance(u, str)]
    start = meta.get("start_url")
    return [start, *found] if isinstance(start, str) else found


def _url_matches(url: str, globs: tuple[str, ...]) -> bool:
    path = urlsplit(url).path or "/"
    return any(fnmatchcase(path if g.startswith("/") else url, g) for g in globs)


class Compiler(Protocol):
    errors: list[ConfigError]

    def err(self, node: Node | Seq, key: str | int, where: str, message: str) -> None: ...

    def unknown(self, node: Node, where: str, known: tuple[str, ...]) -> None: ...


def settings(c: Compiler, raw: Node, policy: Policy) -> Policy:
    """The policy with its `sensitivity:` rules."""
    items = raw.get("sensitivity")
    if items is None:
        return policy
    if not isinstance(items, Seq):
        c.err(raw, "sensitivity", "sensitivity", "must be a list of rules")
        raise ConfigErrors(c.errors)
    rules: list[Rule] = []
    for i, item in enumerate(items):
        where = f"sensitivity[{i}]"
        if not isinstance(item, Node):
            c.err(items, i, where, "must be a mapping: {id, urls, properties, action}")
            continue
        known = {e.id for e in policy.entitlements}
        rule = _rule(c, item, where, {r.id for r in rules}, known)
        if rule is not None:
            rules.append(rule)
    if c.errors:
        raise ConfigErrors(c.errors)
    return replace(policy, sensitivity=tuple(rules))


def _rule(c: Compiler, item: Node, where: str, seen: set[str], known: set[str]) -> Rule | None:
    c.unknown(item, where, _FIELDS)
    rid = item.get("id")
    if not isinstance(rid, str) or not rid:
        c.err(item, "id", f"{where}.id", "is required")
        return None
    if rid in seen:
        c.err(item, "id", f"{where}.id", f"{rid!r} is used by an earlier rule")
    urls = item.get("urls", [])
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        c.err(item, "urls", f"{where}.urls", "must be a list of URL globs such as /billing/*")
        urls = []
    props: list[tuple[str, frozenset[str]]] = []
    raw_props = item.get("properties", Node())
    if not isinstance(raw_props, Node):
        c.err(item, "properties", f"{where}.properties", "must map property names to values")
        raw_props = Node()
    for name, value in raw_props.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            message = "must be a value or a list of values"
            c.err(raw_props, name, f"{where}.properties.{name}", message)
            continue
        props.append((str(name), frozenset(_text(v) for v in values)))
    if not urls and not props:
        c.err(item, "id", where, "needs urls or properties: a rule that matches every recording")
    action = item.get("action", "block")
    if action not in ACTIONS:
        c.err(item, "action", f"{where}.action", f"must be {' or '.join(ACTIONS)}")
    entitlements = item.get("entitlements", [])
    if not isinstance(entitlements, list) or not all(isinstance(e, str) for e in entitlements):
        c.err(item, "entitlements", f"{where}.entitlements", "must be a list of entitlement ids")
        entitlements = []
    for name in entitlements:
        if name not in known:
            c.err(item, "entitlements", f"{where}.entitlements", f"no entitlement {name!r}")
    if (action == "require") != bool(entitlements):
        message = "goes with action: require (and require needs entitlements)"
        c.err(item, "action", f"{where}.entitlements", message)
    reason = item.get("reason")
    if reason is not None and not isinstance(reason, str):
        c.err(item, "reason", f"{where}.reason", "must be a string")
        reason = None
    if reason is None:
        parts = [f"includes {' or '.join(urls)}"] if urls else []
        parts += [f"is of a person whose {n} is {' or '.join(sorted(v))}" for n, v in props]
        reason = f"this recording {' and '.join(parts)} (sensitivity rule {rid!r})"
    return Rule(rid, reason, tuple(urls), tuple(props), str(action), tuple(entitlements))


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_metadata(path: Path) -> Any:
    """Read a metadata fixture (JSON or YAML); raise ValueError saying what is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not JSON or YAML: {exc}") from None
    problem = metadata_problem(data)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    return data


def metadata_problem(value: Any) -> str | None:
    """What is wrong with a recording's metadata as a test gives it, or None."""
    if not isinstance(value, dict) or not set(value) <= set(METADATA_FIELDS):
        return f"must be a mapping of {', '.join(METADATA_FIELDS)}"
    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return "urls must be a list of URLs"
    if not isinstance(value.get("start_url", ""), str):
        return "start_url must be a URL"
    if not isinstance(value.get("properties", {}), dict):
        return "properties must be a mapping"
    return None
