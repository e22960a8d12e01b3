"""The `metadata` section: whose recording it is, asked of the replay tool's own API.

An adapter per tool (proxy/metadata/) reads a recording's data subject, start URL, visited
URLs and chosen person properties with a service credential; `subject` says which id names
the person and how audit records carry it (a keyed HMAC, or the plain id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from .read import Reader, Secret, http_url, resolve, seconds
from .yamlsrc import Node

# The ids each adapter can name the data subject by (the first is the default).
SUBJECT_FIELDS: dict[str, tuple[str, ...]] = {
    "posthog": ("distinct_id", "person_id", "email"),
    "demo": ("distinct_id", "person_id", "email"),
    "sentry": ("user_id", "email", "username"),
    "openreplay": ("user_id", "user_uuid"),
}
ADAPTERS = tuple(SUBJECT_FIELDS)
SUBJECT_MODES = ("hash", "plain")


@dataclass(frozen=True)
class SubjectSettings:
    field: str
    audit: str = "hash"  # hash: HMAC-SHA256 of the id under `key`; plain: the id itself
    key: Secret | None = None


@dataclass(frozen=True)
class MetadataSettings:
    adapter: str
    subject: SubjectSettings
    url: URL | None = None  # the tool's API; None: upstream.url
    token: Secret | None = None  # the service credential (from token_file or token_env)
    ttl: float = 3600.0  # how long Redis keeps a recording's metadata
    timeout: float = 5.0  # one fetch from the tool, at most
    wait: float = 2.0  # how long an audit record waits for a fetch still under way
    properties: tuple[str, ...] = ()  # person properties kept with the metadata
    host_header: str | None = None


def metadata(
    r: Reader, raw: Node, s: Node, base: Path, audit_key: Secret | None
) -> MetadataSettings | None:
    """Read the `metadata` section; None when it is absent or null."""
    at = "metadata"
    if raw.get("metadata") is None:
        return None
    r.known(
        s,
        {"adapter", "url", "token_file", "token_env", "ttl", "timeout", "wait", "subject"}
        | {"properties", "host_header"},
        at,
    )
    adapter = r.get(s, "adapter", str, "", f"{at}.adapter")
    if adapter not in ADAPTERS:
        r.error(s, "adapter", f"{at}.adapter", f"must be one of {', '.join(ADAPTERS)}")
        adapter = ADAPTERS[0]
    url = None
    url_text = r.optional_str(s, "url", None, f"{at}.url")
    if url_text:
        url = http_url(url_text)
        if url is None:
            r.error(s, "url", f"{at}.url", f"must be an http(s) URL with a host, got {url_text!r}")
    token = _secret(r, s, base, "token", at)
    if token is None and adapter != "demo":
        r.error(s, "adapter", f"{at}.token_file", f"{adapter} needs token_file or token_env")
    return MetadataSettings(
        adapter=adapter,
        subject=_subject(r, r.section(s, "subject", f"{at}.subject"), base, adapter, audit_key),
        url=url,
        token=token,
        ttl=seconds(r, s, "ttl", 3600.0, at),
        timeout=seconds(r, s, "timeout", 5.0, at),
        wait=seconds(r, s, "wait", 2.0, at),
        properties=r.str_list(s, "properties", (), f"{at}.properties"),
        host_header=r.optional_str(s, "host_header", None, f"{at}.host_header"),
    )


def _subject(
    r: Reader, s: Node, base: Path, adapter: str, audit_key: Secret | None
) -> SubjectSettings:
    at = "metadata.subject"
    r.known(s, {"field", "audit", "key_file", "key_env"}, at)
    choices = SUBJECT_FIELDS[adapter]
    field = r.get(s, "field", str, choices[0], f"{at}.field")
    if field not in choices:
        r.error(s, "field", f"{at}.field", f"{adapter} names a subject by {', '.join(choices)}")
    mode = r.get(s, "audit", str, "hash", f"{at}.audit")
    if mode not in SUBJECT_MODES:
        r.error(s, "audit", f"{at}.audit", "must be hash or plain")
    key = _secret(r, s, base, "key", at) or audit_key
    if mode == "hash" and key is None:
        r.error(s, "audit", f"{at}.key_file", "hash needs key_file, key_env or audit.hmac_key")
    elif key is not None and len(key.reveal()) < 32:
        r.error(s, "key_file", f"{at}.key_file", "the key must be at least 32 characters")
    return SubjectSettings(field=field, audit=mode, key=key)


def _secret(r: Reader, s: Node, base: Path, name: str, at: str) -> Secret | None:
    """Read `{name}_file` (a path) or `{name}_env` (a variable's name): never the value inline."""
    path_text = r.optional_str(s, f"{name}_file", None, f"{at}.{name}_file")
    env = r.optional_str(s, f"{name}_env", None, f"{at}.{name}_env")
    if path_text and env:
        r.error(s, f"{name}_env", f"{at}.{name}_env", f"give {name}_file or {name}_env, not both")
        return None
    if path_text:
        path = resolve(base, path_text)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            r.error(s, f"{name}_file", f"{at}.{name}_file", f"cannot read {path}: {exc.strerror}")
            return None
        if not text:
            r.error(s, f"{name}_file", f"{at}.{name}_file", f"{path} is empty")
            return None
        return Secret(text)
    if env:
        value = r.environ.get(env, "").strip()
        if not value:
            r.error(s, f"{name}_env", f"{at}.{name}_env", f"${env} is not set")
            return None
        return Secret(value)
    return None
