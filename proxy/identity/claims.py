"""Claim mapping: where subject, email and groups sit in a token, and how groups are read.

A claim path is either a dotted string (`realm_access.roles`: key `realm_access`, then
key `roles`) or a tuple of keys taken one per level, for claim names that contain dots
themselves (`("https://example.com/groups",)`). Groups may be a list of strings or one
delimited string; aliases then rename an IdP's group names to the policy's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..settings.identity import ClaimPath


def keys_of(path: ClaimPath) -> tuple[str, ...]:
    """Return the keys a path walks, one per level."""
    return tuple(path.split(".")) if isinstance(path, str) else path


def show(path: ClaimPath) -> str:
    """Return the path quoted as the config wrote it, for error messages."""
    return repr(path) if isinstance(path, str) else repr(list(path))


def lookup(claims: Mapping[str, Any], path: ClaimPath) -> Any:
    """Return the value at `path`, or None if any level is missing or not a mapping."""
    value: Any = claims
    for key in keys_of(path):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def put(claims: dict[str, Any], path: ClaimPath, value: Any) -> None:
    """Set the value at `path`, making the mappings on the way (for minted dev tokens)."""
    *parents, last = keys_of(path)
    node = claims
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def split_groups(value: Any, delimiter: str | None = None) -> tuple[str, ...]:
    """Return the group names of a claim: a list of strings or a delimited string.

    Without a delimiter a string is split at commas and whitespace. Anything else (a
    number, a mapping) gives no groups rather than a guess.
    """
    if isinstance(value, str):
        parts = value.split(delimiter) if delimiter else value.replace(",", " ").split()
        return tuple(p.strip() for p in parts if p.strip())
    if isinstance(value, list):
        return tuple(g for g in value if isinstance(g, str) and g)
    return ()


def has_control(text: str) -> bool:
    """Whether text holds control characters: they must never reach a header or a log."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


@dataclass(frozen=True)
class ClaimMap:
    """Where one issuer's tokens keep the user's subject, email and groups."""

    subject: ClaimPath = "sub"
    email: ClaimPath = "email"
    groups: ClaimPath = "groups"
    delimiter: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    _table: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", dict(self.aliases))

    def groups_of(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        return self.rename(split_groups(lookup(claims, self.groups), self.delimiter))

    def rename(self, groups: Iterable[str]) -> tuple[str, ...]:
        """Apply the alias table to group names from anywhere (claims or headers)."""
        return alias(groups, self._table)


def alias(groups: Iterable[str], table: Mapping[str, str]) -> tuple[str, ...]:
    """Rename groups by the alias table, dropping duplicates and keeping their order."""
    seen: dict[str, None] = {}
    for g in groups:
        seen.setdefault(table.get(g, g), None)
    return tuple(seen)
