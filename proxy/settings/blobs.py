"""The `blobs` section: where jitgate may fetch recording files that responses point at.

A policy route with `blobs:` names JSON fields holding presigned storage URLs; jitgate
rewrites them into its own short-lived URLs under `{prefix}/blob/` (blobs.py) and fetches
the file itself when one is opened (blobfetch.py). Only URLs on these origins are
rewritten and fetched: a URL anywhere else refuses the response that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .read import Reader, http_url, seconds, size
from .yamlsrc import Node

MAX_TTL = 3600.0  # a blob URL is a short-lived capability, never a long one


@dataclass(frozen=True)
class BlobSettings:
    origins: tuple[str, ...] = ()  # scheme://host:port, lower case, the port always written
    ttl: float = 300.0  # a blob URL's lifetime; never past the grant's end
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_bytes: int = 4 * 1024 * 1024  # a response with blob fields is held up to this
    # Origins fetched at another address (same Host sent, so the signature still holds):
    # storage behind the tool's own public host, which would otherwise be jitgate itself.
    connect: tuple[tuple[str, str], ...] = ()


def origin_of(text: str) -> str | None:
    """`scheme://host:port` of an absolute http(s) URL, lower case, or None."""
    url = http_url(text)
    if url is None or url.port is None:
        return None
    host = (url.raw_host or "").lower()
    host = f"[{host}]" if ":" in host else host
    return f"{url.scheme}://{host}:{url.port}"


def blobs(r: Reader, s: Node) -> BlobSettings:
    at = "blobs"
    r.known(s, {"origins", "ttl", "connect_timeout", "read_timeout", "max_bytes", "connect"}, at)
    origins: list[str] = []
    for i, text in enumerate(r.str_list(s, "origins", (), f"{at}.origins")):
        url = http_url(text)
        origin = origin_of(text)
        if url is None or origin is None or url.raw_path not in ("", "/") or url.query_string:
            message = (
                "must be a storage origin such as https://minio.example.com:9000 "
                f"(scheme, host and port only), got {text!r}"
            )
            r.error(s, "origins", f"{at}.origins[{i}]", message)
        elif url.user or url.password:
            r.error(s, "origins", f"{at}.origins[{i}]", "must not carry credentials")
        else:
            origins.append(origin)
    connect: list[tuple[str, str]] = []
    example = '{"https://replay.example.com": "http://replay-nginx:80"}'
    for origin_text, address in r.str_map(
        s, "connect", f"{at}.connect", "origins", example
    ).items():
        where = f"{at}.connect[{origin_text!r}]"
        origin, url = origin_of(origin_text), http_url(address)
        if origin is None or origin not in origins:
            r.error(s, "connect", where, "must name an origin listed in blobs.origins")
        elif url is None or url.raw_path not in ("", "/") or url.query_string or url.user:
            r.error(s, "connect", where, "must be an http(s) address such as http://host:port")
        else:
            connect.append((origin, str(url.origin())))
    ttl = seconds(r, s, "ttl", 300.0, at)
    if not 0 < ttl <= MAX_TTL:
        r.error(s, "ttl", f"{at}.ttl", f"must be more than 0 and at most {MAX_TTL:g}s")
        ttl = 300.0
    return BlobSettings(
        origins=tuple(dict.fromkeys(origins)),
        ttl=ttl,
        connect_timeout=r.positive(s, "connect_timeout", float, 5.0, f"{at}.connect_timeout"),
        read_timeout=r.positive(s, "read_timeout", float, 60.0, f"{at}.read_timeout"),
        max_bytes=size(r, s, "max_bytes", 4 * 1024 * 1024, at) or 4 * 1024 * 1024,
        connect=tuple(connect),
    )
