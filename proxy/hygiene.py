"""What the upstream receives: the request headers dropped, the client address and Host set.

Upstreams behind an SSO proxy trust headers such as `Remote-User` or `X-Original-URL`, so a
client's copies of a maintained list of identity and routing headers (`DROPPED`, prefix
families included, any case and `_` spelling) never go upstream, with `forward.drop_headers`
added. `X-Real-IP`, `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto`/`-Host` are
jitgate's: set from the TCP peer, or appended to the chain a peer in
`forward.trusted_proxies` sent. `forward.preserve_host` sends the client's Host (checked
against `forward.allowed_hosts`) instead of the upstream's.

Everything is compiled once from the settings into an immutable `Hygiene`: a request pays
one set lookup and one `str.startswith` per header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping

from .settings.forward import hostname

HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    ]
)
# Set by jitgate on every forwarded request; a client's copies go first.
CLIENT_ADDRESS = ("x-real-ip", "x-forwarded-for", "forwarded", "x-forwarded-proto")
# Expect is answered by our own server (100 Continue) before the handler runs.
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-forwarded-host", *CLIENT_ADDRESS}
# ws_connect makes its own key and version; the subprotocols go through `protocols=`.
_WS_DROP = frozenset(
    [
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    ]
)

# The maintained list: names an upstream may read as who the user is, or as where the
# request goes (a path, a method, a scheme or host other than the one decided on).
# A name ending in "*" is a prefix family. Compared in lower case with "_" read as "-".
DROPPED = (
    # SSO proxies' identity headers (Django RemoteUserMiddleware, Apache, Authelia, ...)
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-remote-*",
    "x-auth-request-*",  # oauth2-proxy
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-webauth-*",  # Grafana's auth proxy
    "x-user",
    # routing: a path or method other than the one decided on (Symfony, IIS, Rails, ...)
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    # where the request came from and was addressed to, other than what jitgate sets
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-original-host",
    "x-host",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PEER_CACHE = 1024

Network = IPv4Network | IPv6Network


def header_key(name: str) -> str:
    """A header name as the drop lists hold it: lower case, '_' read as '-'."""
    return name.lower().replace("_", "-")


def compile_names(names: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Split names and `prefix-*` patterns into (exact names, prefixes), normalised."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for name in names:
        key = header_key(name.strip())
        if key.endswith("*"):
            prefixes.add(key[:-1])
        else:
            exact.add(key)
    # A name already covered by a prefix needs no lookup of its own.
    exact = {n for n in exact if not n.startswith(tuple(prefixes))}
    return frozenset(exact), tuple(sorted(prefixes))


class TrustedPeers:
    """Which TCP peers are in a set of networks, parsed once per peer (the proxies in front
    are few; at most `_PEER_CACHE` answers are kept)."""

    def __init__(self, nets: tuple[Network, ...]) -> None:
        self.nets = nets
        self._known: dict[str, bool] = {}

    def __contains__(self, peer: str | None) -> bool:
        if not peer or not self.nets:
            return False
        known = self._known.get(peer)
        if known is None:
            if len(self._known) >= _PEER_CACHE:
                self._known.clear()
            known = self._known[peer] = bool(_in(peer, self.nets))
        return known


@dataclass(frozen=True)
class Hygiene:
    """The compiled request-header rules of one configuration; shared by every request."""

    drop: frozenset[str] = frozenset()  # exact names beside the hop-by-hop ones
    prefixes: tuple[str, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()
    preserve_host: bool = False
    allowed_hosts: frozenset[str] = frozenset()  # empty: any Host
    http_drop: frozenset[str] = field(init=False)
    ws_drop: frozenset[str] = field(init=False)
    _peers: TrustedPeers = field(init=False, compare=False)

    def __post_init__(self) -> None:
        http_drop = _REQUEST_DROP | self.drop
        object.__setattr__(self, "http_drop", http_drop)
        object.__setattr__(self, "ws_drop", http_drop | _WS_DROP)
        object.__setattr__(self, "_peers", TrustedPeers(self.trusted_proxies))

    @classmethod
    def build(
        cls,
        extra: Iterable[str] = (),
        *,
        also_exact: Iterable[str] = (),
        trusted_proxies: tuple[Network, ...] = (),
        preserve_host: bool = False,
        allowed_hosts: Iterable[str] = (),
    ) -> Hygiene:
        """The maintained list plus `extra` (names or prefix patterns) and `also_exact`."""
        exact, prefixes = compile_names((*DROPPED, *extra))
        more = {header_key(n) for n in also_exact}
        return cls(
            drop=exact | {n for n in more if not n.startswith(prefixes)},
            prefixes=prefixes,
            trusted_proxies=trusted_proxies,
            preserve_host=preserve_host,
            allowed_hosts=frozenset(h.lower() for h in allowed_hosts),
        )

    def host_allowed(self, request: web.Request) -> bool:
        """Whether the request's Host names one of `allowed_hosts` (any, if none are set)."""
        if not self.allowed_hosts:
            return True
        host = request.headers.get(hdrs.HOST)
        return host is not None and hostname(host) in self.allowed_hosts

    def trusts(self, peer: str | None) -> bool:
        """Whether the TCP peer is a proxy whose client-address chain is believed."""
        return peer in self._peers

    def client_ip(self, request: web.Request) -> str | None:
        """The client a trusted proxy names (what X-Real-IP gets); None: the TCP peer."""
        remote = request.remote
        if not remote or not self.trusts(remote):
            return None
        chain = [
            a.strip()
            for v in request.headers.getall(hdrs.X_FORWARDED_FOR, ())
            for a in v.split(",")
            if a.strip()
        ]
        return self._client_of([*chain, remote])

    def request_headers(
        self,
        request: web.Request,
        upstream_host: str,
        *,
        websocket: bool,
        drop_headers: frozenset[str],
        drop_cookies: frozenset[str],
    ) -> CIMultiDict[str]:
        """The headers to send upstream for `request`, before jitgate's own are set."""
        src = request.headers
        named = connection_tokens(src)
        drop = self.ws_drop if websocket else self.http_drop
        prefixes = self.prefixes
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in src.items():
            # Compare as a CGI-style upstream would read the name: '_' and '-' are the same
            # (header_key, inlined: this loop runs for every header of every request).
            key = name.lower().replace("_", "-")
            if key in drop or key.startswith(prefixes) or key in named or key in drop_headers:
                continue
            if drop_cookies and key == "cookie":
                value = strip_cookies(value, drop_cookies)
                if not value:
                    continue
            out.add(name, value)
        client_host = src.get(hdrs.HOST)
        out[hdrs.HOST] = client_host if self.preserve_host and client_host else upstream_host
        self._client_address(request, out, client_host)
        return out

    def _client_address(
        self, request: web.Request, out: CIMultiDict[str], host: str | None
    ) -> None:
        """Set X-Real-IP, X-Forwarded-For, Forwarded and X-Forwarded-Proto/-Host."""
        src = request.headers
        remote = request.remote
        scheme = request.scheme
        chain: list[str] = []
        earlier = ""
        trusted = self.trusts(remote)
        if trusted:
            # A trusted proxy's view of the client comes first; this hop is appended.
            chain = [a.strip() for v in src.getall(hdrs.X_FORWARDED_FOR, ()) for a in v.split(",")]
            chain = [a for a in chain if a]
            earlier = ", ".join(src.getall(hdrs.FORWARDED, ()))
            if not earlier and chain:
                earlier = ", ".join(f"for={_quote(_node(a))}" for a in chain)
            proto = (_single(src, hdrs.X_FORWARDED_PROTO) or "").lower()
            scheme = proto if proto in ("http", "https") else scheme
            host = _single(src, hdrs.X_FORWARDED_HOST) or host
        element = f"proto={scheme}"  # http or https: a token
        if remote:
            chain.append(remote)
            element = f"for={_quote(_node(remote))};{element}"
            out["X-Real-IP"] = self._client_of(chain) if trusted else remote
        if chain:
            out[hdrs.X_FORWARDED_FOR] = ", ".join(chain)
        out[hdrs.X_FORWARDED_PROTO] = scheme
        if host:
            out[hdrs.X_FORWARDED_HOST] = host
            element = f"{element};host={_quote(host)}"
        out[hdrs.FORWARDED] = f"{earlier}, {element}" if earlier else element

    def _client_of(self, chain: list[str]) -> str:
        """The right-most address in the chain that is not a trusted proxy."""
        for i in range(len(chain) - 1, -1, -1):
            trusted = _in(chain[i], self.trusted_proxies)
            if trusted is None:
                # An entry that is no address: the hop after it is the last one known.
                return chain[min(i + 1, len(chain) - 1)]
            if not trusted:
                return chain[i]
        return chain[0]


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    if hdrs.CONNECTION not in headers:
        return frozenset()
    values = headers.getall(hdrs.CONNECTION)
    return frozenset(header_key(t.strip()) for v in values for t in v.split(",") if t.strip())


def strip_cookies(value: str, names: frozenset[str]) -> str:
    kept = [c for c in value.split(";") if c.split("=", 1)[0].strip() not in names]
    return ";".join(kept).lstrip()


def _single(headers: MultiMapping[str], name: str) -> str | None:
    """A trusted proxy's one value of name (the first of a list), or None."""
    value = headers.get(name)
    if value is None:
        return None
    return value.split(",", 1)[0].strip() or None


def _node(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def _quote(value: str) -> str:
    """Return an RFC 7239 value: a token as is, anything else as a quoted-string."""
    if _TOKEN.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _in(peer: str, nets: tuple[Network, ...]) -> bool | None:
    """Whether the address is in one of nets; None if it is no address."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in nets)


def wants_html(request: web.Request) -> bool:
    """A browser's navigation, told from an API client by its Accept header."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept.split(",")[0]
