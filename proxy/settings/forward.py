"""The `forward` section: what jitgate does to the requests it forwards upstream.

Beside the identity it vouches for (`assertion`, `user_headers`) and the client headers it
strips, the section says what the upstream receives (hygiene.py, docs/upstream.md): extra
headers to drop, the proxies whose client-address chain is believed, and the Host sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from yarl import URL

from . import identity as identitysettings
from .identity import AssertionSettings
from .read import Reader, as_node
from .yamlsrc import Node


@dataclass(frozen=True)
class ForwardSettings:
    pass_authorization: bool = False
    pass_identity_cookie: bool = False
    reject_semicolons: bool = True
    reject_underscore_headers: bool = True  # 400 for X_Forwarded_User and its kind
    assertion: AssertionSettings | None = None
    user_headers: bool = False  # also send X-Forwarded-User, -Email and -Groups
    status_bar: bool = False  # inject the grant's countdown bar into HTML pages (statusbar.py)
    identity_headers: tuple[str, ...] = (
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-jitgate-user",
        "x-jitgate-assertion",
    )
    # What the upstream receives (hygiene.py, docs/upstream.md): names or `X-Prefix-*`
    # patterns dropped beside the maintained list; the proxies whose X-Forwarded-For and
    # Forwarded chain is kept and appended to; the client's Host sent upstream, checked.
    drop_headers: tuple[str, ...] = ()
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    preserve_host: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024  # a body a body rule reads is held up to this (413 over)


def forward(
    r: Reader,
    s: Node,
    base: Path,
    state_dir: Path,
    upstream_url: URL,
    host_header: str | None = None,
) -> ForwardSettings:
    at = "forward"
    r.known(
        s,
        {"pass_authorization", "pass_identity_cookie", "reject_semicolons", "identity_headers"}
        | {"reject_underscore_headers", "assertion", "user_headers", "status_bar"}
        | {"drop_headers", "trusted_proxies", "preserve_host", "allowed_hosts"}
        | {"max_body_bytes"},
        at,
    )
    defaults = ForwardSettings()
    assertion = None
    raw = s.get("assertion")
    if raw is True or isinstance(raw, dict):
        node = r.section(s, "assertion", f"{at}.assertion") if raw is not True else as_node({}, 0)
        assertion = identitysettings.assertion(r, node, base, state_dir, upstream_url)
    elif raw not in (None, False):
        r.error(s, "assertion", f"{at}.assertion", "must be true, false or a mapping")
    return ForwardSettings(
        pass_authorization=r.get(s, "pass_authorization", bool, False, f"{at}.pass_authorization"),
        pass_identity_cookie=r.get(
            s, "pass_identity_cookie", bool, False, f"{at}.pass_identity_cookie"
        ),
        reject_semicolons=r.get(s, "reject_semicolons", bool, True, f"{at}.reject_semicolons"),
        reject_underscore_headers=r.get(
            s, "reject_underscore_headers", bool, True, f"{at}.reject_underscore_headers"
        ),
        assertion=assertion,
        user_headers=r.get(s, "user_headers", bool, False, f"{at}.user_headers"),
        status_bar=r.get(s, "status_bar", bool, False, f"{at}.status_bar"),
        max_body_bytes=_max_body(r, s),
        identity_headers=tuple(
            h.lower().replace("_", "-")
            for h in r.str_list(
                s, "identity_headers", defaults.identity_headers, f"{at}.identity_headers"
            )
        ),
        **_upstream_headers(r, s, host_header),
    )


def _upstream_headers(r: Reader, s: Node, host_header: str | None) -> dict[str, Any]:
    """forward.drop_headers, trusted_proxies, preserve_host and allowed_hosts."""
    at = "forward"
    drop = r.str_list(s, "drop_headers", (), f"{at}.drop_headers")
    for name in drop:
        why = _pattern_error(name)
        if why is not None:
            r.error(s, "drop_headers", f"{at}.drop_headers", f"{name!r} {why}")
    where = f"{at}.trusted_proxies"
    nets = r.networks(s, "trusted_proxies", where)
    preserve = r.get(s, "preserve_host", bool, False, f"{at}.preserve_host")
    hosts = tuple(
        h.strip().lower() for h in r.str_list(s, "allowed_hosts", (), f"{at}.allowed_hosts")
    )
    for host in hosts:
        if not host or hostname(host) != host or "*" in host or "/" in host:
            message = f"{host!r} is not a host name (no port, scheme or wildcard)"
            r.error(s, "allowed_hosts", f"{at}.allowed_hosts", message)
    if preserve and not hosts:
        message = (
            "is required with preserve_host: the host names users reach jitgate by, e.g. "
            "[replay.example.com]; any other Host is refused rather than sent upstream"
        )
        r.error(s, "allowed_hosts", f"{at}.allowed_hosts", message)
    if preserve and host_header:
        message = "and upstream.host_header both name the Host sent upstream: set one"
        r.error(s, "preserve_host", f"{at}.preserve_host", message)
    return {
        "drop_headers": tuple(drop),
        "trusted_proxies": tuple(nets),
        "preserve_host": preserve,
        "allowed_hosts": hosts,
    }


_TOKEN = frozenset("!#$%&'+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _pattern_error(name: str) -> str | None:
    """Why `name` is no header name or `X-Prefix-*` pattern, or None if it is one."""
    body = name[:-1] if name.endswith("*") else name
    if not body or not all(c in _TOKEN for c in body):
        return "is not a header name or a prefix such as X-Remote-*"
    if name.endswith("*") and len(body) < 3:
        return "is too short a prefix: it would drop headers the upstream needs"
    return None


def hostname(host: str) -> str:
    """A Host header's name without its port, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _max_body(r: Reader, s: Node) -> int:
    """forward.max_body_bytes: how much of a body a body rule holds (policy `body:`)."""
    where = "forward.max_body_bytes"
    value = r.get(s, "max_body_bytes", int, ForwardSettings.max_body_bytes, where)
    if not 1 <= value <= 64 * 1024 * 1024:
        r.error(s, "max_body_bytes", where, "must be between 1 and 67108864 (64 MiB)")
        return ForwardSettings.max_body_bytes
    return value
