"""Audit settings: the `audit` section, one part per sink.

The Redis stream, the JSON-lines file, stdout and HTTP collectors, the write-ahead spool,
batching and the HMAC chain. Read with the reading layer of read.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .read import Reader, Secret, http_url, resolve, seconds, size
from .yamlsrc import Node

AUDIT_HTTP_FORMATS = ("jsonl", "splunk", "elastic", "loki")


@dataclass(frozen=True)
class RedisSinkSettings:
    stream: str = "audit"  # key after redis.key_prefix; its indexes live under <key>:idx:
    maxlen: int | None = 1_000_000  # oldest records (and their index entries) trimmed beyond
    retention: float | None = None  # seconds a record is kept; None: until maxlen trims it


@dataclass(frozen=True)
class FileSinkSettings:
    path: Path
    rotate_bytes: int | None = None  # rotate when the file would grow past this size
    rotate_daily: bool = False  # rotate when the UTC day changes
    retention: float | None = None  # delete rotated files older than this many seconds
    fsync: bool = True


@dataclass(frozen=True)
class HttpSinkSettings:
    name: str
    url: Secret  # an ingest URL may carry a token
    format: str = "jsonl"  # jsonl | splunk | elastic | loki
    headers: tuple[tuple[str, Secret], ...] = ()
    timeout: float = 10.0
    gzip: bool = False


@dataclass(frozen=True)
class AuditSettings:
    redis: RedisSinkSettings | None = field(default_factory=RedisSinkSettings)  # None: off
    file: FileSinkSettings | None = None
    stdout: bool = False
    http: tuple[HttpSinkSettings, ...] = ()
    spool_dir: Path | None = None  # default: <state_dir>/audit-spool; `spool: null` turns it off
    spool: bool = True
    spool_max_bytes: int = 1 << 30
    strict: bool = False  # refuse protected requests with 503 while audit cannot be written
    maintain_interval: float = 60.0  # seconds between trims, rotations and retention runs
    batch_size: int = 256
    flush_interval: float = 0.25
    queue_max: int = 100_000
    hmac_key: Secret | None = None  # set: records form a tamper-evident HMAC chain
    key_id: str = "k1"
    checkpoint_every: int = 1000  # records between signed checkpoints
    checkpoint_interval: float = 60.0  # or seconds, whichever comes first


def audit(r: Reader, s: Node, base: Path, state_dir: Path) -> AuditSettings:
    at = "audit"
    r.known(
        s,
        {"redis", "file", "stdout", "http", "spool", "strict", "maintain_interval"}
        | {"batch_size", "flush_interval", "queue_max", "hmac_key", "key_id"}
        | {"checkpoint_every", "checkpoint_interval"},
        at,
    )
    hmac_key = s.get("hmac_key")
    if hmac_key is not None and not isinstance(hmac_key, str):
        # Never echo the value: it is a secret (an all-digit key parses as a number).
        r.error(s, "hmac_key", f"{at}.hmac_key", "must be a string (quote it)")
        hmac_key = None
    elif hmac_key is not None and len(hmac_key) < 32:
        r.error(s, "hmac_key", f"{at}.hmac_key", "must be at least 32 characters")
    key_id = r.get(s, "key_id", str, "k1", f"{at}.key_id")
    if not key_id:
        r.error(s, "key_id", f"{at}.key_id", "must not be empty")

    redis: RedisSinkSettings | None = RedisSinkSettings()
    if "redis" in s and s["redis"] is None:
        redis = None
    else:
        node = r.section(s, "redis", f"{at}.redis")
        r.known(node, {"stream", "maxlen", "retention"}, f"{at}.redis")
        stream = r.get(node, "stream", str, "audit", f"{at}.redis.stream")
        if not stream:
            r.error(node, "stream", f"{at}.redis.stream", "must not be empty")
        maxlen = None if "maxlen" in node and node["maxlen"] is None else (
            r.positive(node, "maxlen", int, 1_000_000, f"{at}.redis.maxlen")
        )  # fmt: skip
        redis = RedisSinkSettings(
            stream=stream,
            maxlen=maxlen,
            retention=seconds(r, node, "retention", None, f"{at}.redis"),
        )

    file: FileSinkSettings | None = None
    raw_file = s.get("file")
    if isinstance(raw_file, str):  # a bare path: no rotation
        file = FileSinkSettings(path=resolve(base, raw_file))
    elif raw_file is not None:
        node = r.section(s, "file", f"{at}.file")
        r.known(node, {"path", "rotate_bytes", "rotate_daily", "retention", "fsync"}, f"{at}.file")
        path = r.get(node, "path", str, "", f"{at}.file.path")
        if not path:
            r.error(node, "path", f"{at}.file.path", "is required")
        retention = seconds(r, node, "retention", None, f"{at}.file")
        rotate_bytes = size(r, node, "rotate_bytes", None, f"{at}.file")
        rotate_daily = r.get(node, "rotate_daily", bool, False, f"{at}.file.rotate_daily")
        if retention is not None and rotate_bytes is None and not rotate_daily:
            message = "needs rotate_bytes or rotate_daily: only rotated files are deleted"
            r.error(node, "retention", f"{at}.file.retention", message)
        file = FileSinkSettings(
            path=resolve(base, path or "audit.jsonl"),
            rotate_bytes=rotate_bytes,
            rotate_daily=rotate_daily,
            retention=retention,
            fsync=r.get(node, "fsync", bool, True, f"{at}.file.fsync"),
        )

    spool, spool_dir, spool_max = True, state_dir / "audit-spool", 1 << 30
    if "spool" in s and s["spool"] is None:
        spool = False
    else:
        node = r.section(s, "spool", f"{at}.spool")
        r.known(node, {"dir", "max_bytes"}, f"{at}.spool")
        spool_path = r.optional_str(node, "dir", None, f"{at}.spool.dir")
        if spool_path:
            spool_dir = resolve(base, spool_path)
        spool_max = size(r, node, "max_bytes", spool_max, f"{at}.spool") or spool_max

    defaults = AuditSettings()
    return AuditSettings(
        redis=redis,
        file=file,
        stdout=r.get(s, "stdout", bool, False, f"{at}.stdout"),
        http=_http_sinks(r, s),
        spool=spool,
        spool_dir=spool_dir,
        spool_max_bytes=spool_max,
        strict=r.get(s, "strict", bool, False, f"{at}.strict"),
        maintain_interval=seconds(r, s, "maintain_interval", defaults.maintain_interval, at),
        batch_size=r.positive(s, "batch_size", int, 256, f"{at}.batch_size"),
        flush_interval=r.positive(s, "flush_interval", float, 0.25, f"{at}.flush_interval"),
        queue_max=r.positive(s, "queue_max", int, 100_000, f"{at}.queue_max"),
        hmac_key=Secret(hmac_key) if hmac_key else None,
        key_id=key_id,
        checkpoint_every=r.positive(s, "checkpoint_every", int, 1000, f"{at}.checkpoint_every"),
        checkpoint_interval=r.positive(
            s, "checkpoint_interval", float, 60.0, f"{at}.checkpoint_interval"
        ),
    )


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _http_sinks(r: Reader, s: Node) -> tuple[HttpSinkSettings, ...]:
    sinks: list[HttpSinkSettings] = []
    for where, node in r.mappings(
        s, "http", "audit.http", "{name, url, format, headers, timeout, gzip}",
        "a mapping with a name and a url",
    ):  # fmt: skip
        r.known(node, {"name", "url", "format", "headers", "timeout", "gzip"}, where)
        name = r.get(node, "name", str, "", f"{where}.name")
        if not _ID_RE.fullmatch(name):
            message = "is required: letters, digits, '.', '_' or '-' (it names the metrics)"
            r.error(node, "name", f"{where}.name", message)
        elif any(x.name == name for x in sinks):
            r.error(node, "name", f"{where}.name", f"{name!r} is used twice")
        url = r.get(node, "url", str, "", f"{where}.url")
        if http_url(url) is None:
            scheme = url.partition(":")[0] if ":" in url else ""
            r.error(node, "url", f"{where}.url", f"must be an http(s) URL, got scheme {scheme!r}")
        fmt = r.get(node, "format", str, "jsonl", f"{where}.format")
        if fmt not in AUDIT_HTTP_FORMATS:
            message = f"must be one of {', '.join(AUDIT_HTTP_FORMATS)}, got {fmt!r}"
            r.error(node, "format", f"{where}.format", message)
        headers: list[tuple[str, Secret]] = []
        raw_headers = r.str_map(
            node, "headers", f"{where}.headers", "header names", "{Authorization: '${TOKEN}'}"
        )
        for key, value in raw_headers.items():
            # ${VAR} takes the value from the environment: header values are credentials.
            missing = [v for v in _ENV_REF.findall(value) if v not in r.environ]
            if missing:
                message = f"header {key}: environment variable {missing[0]} is not set"
                r.error(node, "headers", f"{where}.headers", message)
                continue
            headers.append((key, Secret(_ENV_REF.sub(lambda m: r.environ[m[1]], value))))
        sinks.append(
            HttpSinkSettings(
                name=name,
                url=Secret(url),
                format=fmt,
                headers=tuple(headers),
                timeout=r.positive(node, "timeout", float, 10.0, f"{where}.timeout"),
                gzip=r.get(node, "gzip", bool, False, f"{where}.gzip"),
            )
        )
    return tuple(sinks)
