"""The reading layer of the config: a walker that collects errors, and shared field kinds.

`Reader` walks a parsed YAML tree and records every problem as a ConfigError with its
file:line (or the environment variable that set it); the helpers read the field kinds
several sections share: durations, sizes, paths, http(s) URLs. `Secret` holds a value
whose repr never shows it. Nothing here knows a particular section.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from ..errors import ConfigError
from .yamlsrc import Node, Seq, line_of

T = TypeVar("T")


class Secret:
    """A secret string whose repr never shows the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Reader:
    """Walk a parsed YAML tree, collecting every error with its file:line."""

    def __init__(self, file: str, env_keys: Mapping[str, str], environ: Mapping[str, str]) -> None:
        self.file = file
        self.env_keys = env_keys
        self.environ = environ  # for ${VAR} in audit.http headers
        self.errors: list[ConfigError] = []

    def error(self, node: Node | Seq | None, key: str | int, where: str, message: str) -> None:
        # A field inside a value set by one variable (e.g. a YAML list) is that variable's.
        env = next(
            (
                name
                for at, name in self.env_keys.items()
                if where == at or where.startswith((at + ".", at + "["))
            ),
            None,
        )
        if env is not None:
            self.errors.append(ConfigError(message, file=f"env {env}", field=where))
            return
        line = line_of(node, key)
        self.errors.append(ConfigError(message, file=self.file, line=line, field=where))

    def section(self, node: Node, key: str, where: str) -> Node:
        value = node.get(key)
        if value is None:
            empty = Node()
            empty.line, empty.key_lines = node.line_of(key), {}
            return empty
        if not isinstance(value, Node):
            self.error(node, key, where, "must be a mapping")
            empty = Node()
            empty.line, empty.key_lines = node.line_of(key), {}
            return empty
        return value

    def known(self, node: Node, keys: set[str], where: str) -> None:
        for key in node:
            if key not in keys:
                hint = f" (known: {', '.join(sorted(keys))})"
                self.error(node, key, f"{where}.{key}".lstrip("."), "unknown field" + hint)

    def get(self, node: Node, key: str, kind: type[T], default: T, where: str) -> T:
        if key not in node or node[key] is None:
            return default
        value = node[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            self.error(node, key, where, "must be an integer")
            return default
        if not isinstance(value, kind):
            self.error(node, key, where, f"must be {_kind_name(kind)}, got {value!r}")
            return default
        return value

    def positive(self, node: Node, key: str, kind: type[T], default: T, where: str) -> T:
        value = self.get(node, key, kind, default, where)
        if isinstance(value, int | float) and value <= 0:
            self.error(node, key, where, "must be greater than 0")
            return default
        return value

    def optional_str(self, node: Node, key: str, default: str | None, where: str) -> str | None:
        if key in node and node[key] is None:
            return None
        return self.get(node, key, str, default or "", where) if key in node else default

    def str_list(
        self, node: Node, key: str, default: tuple[str, ...], where: str
    ) -> tuple[str, ...]:
        if key not in node or node[key] is None:
            return default
        value = node[key]
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(node, key, where, "must be a list of strings")
            return default
        return tuple(value)

    def networks(self, s: Node, key: str, where: str) -> list[IPv4Network | IPv6Network]:
        """A list of CIDRs of peers to trust; `0.0.0.0/0` and host bits set are errors."""
        nets: list[IPv4Network | IPv6Network] = []
        for text in self.str_list(s, key, (), where):
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                self.error(s, key, where, f"{text!r} is not a CIDR: {exc}")
                continue
            if net.prefixlen == 0:
                self.error(s, key, where, f"{text!r} would trust every client")
                continue
            nets.append(net)
        return nets

    def str_map(self, s: Node, key: str, where: str, keys: str, example: str) -> dict[str, str]:
        """Return the mapping of strings at s[key] ({} when absent); report anything else."""
        value = s.get(key) or {}
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        self.error(s, key, where, f"must map {keys} to strings, e.g. {example}")
        return {}

    def mappings(self, s: Node, key: str, at: str, shape: str, item: str) -> list[tuple[str, Node]]:
        """Return (where, node) for each mapping in the list at s[key]; report the others.

        shape describes the list's items for an error ("{url, format}"), item what each
        must be ("a mapping with a url").
        """
        raw = s.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error(s, key, at, f"must be a list of {shape}")
            return []
        out = []
        for i, value in enumerate(raw):
            where = f"{at}[{i}]"
            if not isinstance(value, dict):
                if isinstance(raw, Seq):
                    self.error(raw, i, where, f"must be {item}")
                else:  # a list from an environment variable: no lines of its own
                    self.error(s, key, where, f"must be {item}")
                continue
            out.append(
                (where, value if isinstance(value, Node) else as_node(value, s.line_of(key)))
            )
        return out


def _kind_name(kind: type[Any]) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, kind.__name__
    )


def as_node(mapping: Mapping[Any, Any], line: int) -> Node:
    """Wrap a plain mapping (from an environment variable) so the reader can walk it."""
    node = Node((str(k), v) for k, v in mapping.items())
    node.line, node.key_lines = line, {}
    return node


def resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    # normpath, not resolve: "config/../.jitgate" reads better as ".jitgate" in logs, and
    # symlinks are left as the operator wrote them.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def seconds(r: Reader, s: Node, key: str, default: T, at: str) -> float | T:
    where = f"{at}.{key}"
    if key not in s or s[key] is None:
        return default
    value = s[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        r.error(s, key, where, "must be a duration such as 30s, 5m or 1h, or seconds")
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        r.error(s, key, where, str(exc))
        return default


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | float | int) -> float:
    """Parse '90', '90s', '5m', '2h', '1d' or '1h30m' into seconds; raise ValueError if bad."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        if not value:
            raise ValueError("empty duration")
        try:
            seconds = float(value)
        except ValueError:
            parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)([smhdw]))+", value)
            if parts is None:
                raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 5m, 2h, 1d)") from None
            seconds = sum(
                float(num) * _DURATION[unit]
                for num, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", value)
            )
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {text!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration must be at most 100 years, got {text!r}")
    return seconds


# Longer means nothing for a grant or a setting, and milliseconds of it must fit Redis's
# 64-bit integers (1.8e308 seconds made an extension fail with a 500).
MAX_DURATION = 100 * 365 * 86400.0


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(r: Reader, s: Node, key: str, default: int | None, at: str) -> int | None:
    where = f"{at}.{key}"
    if key not in s or s[key] is None:
        return default
    try:
        return parse_size(s[key])
    except ValueError as exc:
        r.error(s, key, where, str(exc))
        return default


def parse_size(value: object) -> int:
    """Parse 1048576, '512KB', '100MB' or '1GiB' (1024-based) into bytes; raise ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if m is None or isinstance(value, bool):
            raise ValueError(f"invalid size {value!r} (use e.g. 512KB, 100MB, 1GB)")
        size = int(m[1]) * _SIZE_UNITS[m[2].lower()]
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def http_url(text: str) -> URL | None:
    """Return text as an http(s) URL with a host, or None."""
    try:
        url = URL(text)
    except ValueError:
        return None
    return url if url.scheme in ("http", "https") and url.host else None
