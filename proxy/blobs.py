"""Presigned storage URLs in responses, rewritten into grant-bound jitgate URLs.

Session-replay tools hand the player presigned S3/MinIO URLs for a recording's files
(OpenReplay's `domURL`, Highlight's `direct_download_url`): whoever holds such a URL can
fetch the file until the storage's own expiry, whatever happens to the grant. A protected
route with `blobs: {fields: [...]}` (policy.py) has each URL in those JSON fields replaced
by `{prefix}/blob/{token}`, where the token is encrypted and authenticated (Fernet) and
names the storage URL, the caller, the scope, the grant and an expiry: `blobs.ttl` from
now, never past the grant's end. The storage URL itself is never seen by the client.
blobfetch.py serves those URLs, checking the grant again, live, on each fetch.

The key is one random value in Redis (SET NX), so every replica agrees on it without
configuration; it is cached, and read again once when a token does not open (another
replica may have made a new one after Redis was emptied).

Fail closed: when a route has `blobs:`, a 2xx body that cannot be rewritten never goes
out as it came. It is refused instead: 502 when it is not JSON, is larger than
`blobs.max_bytes`, has a field of an unexpected type or a URL on an origin not in
`blobs.origins`; 503 when the key cannot be read from Redis. An empty body, a body
without the fields, and non-2xx answers pass unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from multidict import CIMultiDict, MultiMapping
from redis.asyncio import Redis

from .authorize import Decision
from .forward import RewriteRefused
from .lists import changed_headers, decode, dump
from .policy import Blobs
from .settings.blobs import BlobSettings, origin_of

log = logging.getLogger("jitgate.blobs")

_INLINE_MAX = 256 * 1024  # larger bodies are parsed in a worker thread
_INFO = b"jitgate blob url v1"
Count = Callable[[str], None]  # counts one outcome


class BadTicket(Exception):
    """A blob token that does not open (`invalid`) or has expired (`expired`)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Ticket:
    """What a blob URL grants: one storage URL, for one user under one scope, until `expires`."""

    url: str
    user: str
    scope: str
    grant_id: str
    expires: float
    route: str


class BlobKeys:
    """The blob URL key, from one random secret in Redis shared by every replica."""

    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self._redis = redis
        self._name = f"{key_prefix}blob:key"
        self._fernet: Fernet | None = None

    async def get(self, *, fresh: bool = False) -> Fernet:
        if self._fernet is not None and not fresh:
            return self._fernet
        await self._redis.set(self._name, secrets.token_hex(32), nx=True)
        raw = await self._redis.get(self._name)
        if raw is None:
            raise RuntimeError("the blob key vanished from Redis while it was read")
        secret = raw if isinstance(raw, bytes) else str(raw).encode()
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
        self._fernet = Fernet(base64.urlsafe_b64encode(hkdf.derive(secret)))
        return self._fernet


class BlobSigner:
    """Seals storage URLs into blob tokens and opens them again."""

    def __init__(self, keys: BlobKeys, prefix: str, settings: BlobSettings, count: Count) -> None:
        self.keys = keys
        self.base = f"{prefix}/blob/"
        self.settings = settings
        self.count = count  # rewrites, by outcome (jitgate_blob_rewrites)

    def seal(self, fernet: Fernet, ticket: Ticket) -> str:
        """The jitgate URL of one storage URL: a path on jitgate's own origin."""
        body = {
            "u": ticket.url, "s": ticket.user, "c": ticket.scope, "g": ticket.grant_id,
            "e": round(ticket.expires, 3), "r": ticket.route,
        }  # fmt: skip
        return self.base + fernet.encrypt(json.dumps(body, separators=(",", ":")).encode()).decode()

    async def open(self, token: str, now: float | None = None) -> Ticket:
        """The ticket a token seals; raise BadTicket if it was not made here, or has expired."""
        data = token.encode("ascii", "replace")
        try:
            raw = (await self.keys.get()).decrypt(data)
        except InvalidToken:
            try:  # the key may have changed under us: read it again, once
                raw = (await self.keys.get(fresh=True)).decrypt(data)
            except InvalidToken:
                raise BadTicket(
                    "invalid", "blob URL is not valid (altered, or not made here)"
                ) from None
        try:
            body = json.loads(raw)
            ticket = Ticket(
                str(body["u"]), str(body["s"]), str(body["c"]), str(body["g"]),
                float(body["e"]), str(body["r"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise BadTicket("invalid", "blob URL is not valid (unreadable)") from None
        if (time.time() if now is None else now) >= ticket.expires:
            raise BadTicket("expired", "blob URL has expired: reload the recording")
        return ticket

    def rewrite(self, decision: Decision) -> BlobRewrite | None:
        """The rewrite of an allowed response whose route names blob fields, or None."""
        if decision.blobs is None or decision.identity is None or decision.scope is None:
            return None
        if decision.grant_id is None:
            return None
        expires = time.time() + self.settings.ttl
        if decision.grant_expires_at is not None:
            expires = min(expires, decision.grant_expires_at)
        template = Ticket(
            "",
            decision.identity.subject,
            decision.scope,
            decision.grant_id,
            expires,
            decision.route,
        )
        return BlobRewrite(self, decision.blobs, template)


class BlobRewrite:
    """One response's rewrite (forward.AsyncBodyRewrite): its presigned URLs, sealed."""

    def __init__(self, signer: BlobSigner, blobs: Blobs, template: Ticket) -> None:
        self.signer = signer
        self.blobs = blobs
        self.template = template
        self.limit = signer.settings.max_bytes
        self.note: str | None = None  # what was done, for the request's audit reasons

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        return 200 <= status < 300

    def fell_back(self, why: str) -> None:
        """Over `limit`: the body cannot be checked, so it is refused, never passed."""
        self._refuse(502, why, f"response over blobs.max_bytes ({self.limit} bytes)")

    def _refuse(self, status: int, outcome: str, why: str) -> NoReturn:
        self.note = f"presigned URLs not rewritten: {why}; refused"
        self.signer.count(outcome)
        log.warning("route %s: %s", self.template.route, self.note)
        raise RewriteRefused(status, f"{self.note} (route {self.template.route})")

    async def rewrite(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        """Return the new headers and body, None when there is nothing to rewrite."""
        decoded = decode(headers, body, self.limit)
        if isinstance(decoded, str):
            self._refuse(502, decoded, f"body could not be decoded ({decoded})")
        if not decoded.strip():
            self.signer.count("empty")
            return None
        big = len(decoded) > _INLINE_MAX
        parsed = await asyncio.to_thread(_parse, decoded) if big else _parse(decoded)
        if parsed is _MALFORMED:
            self._refuse(502, "malformed", "the body is not JSON")
        try:
            slots = [slot for path in self.blobs.fields for slot in _slots(parsed, path)]
        except _Shape as exc:
            self._refuse(502, "shape", str(exc))
        if not slots:
            self.signer.count("none")
            return None
        allowed = self.signer.settings.origins
        for _, _, url in slots:
            origin = origin_of(url)
            if origin is None or origin not in allowed:
                shown = origin or "a URL that is not absolute http(s)"
                self._refuse(502, "origin", f"{shown} is not in blobs.origins")
        try:
            fernet = await self.signer.keys.get()
        except Exception as exc:  # Redis down: no key, no URL, and never the raw one
            self._refuse(503, "unavailable", f"blob key unavailable ({type(exc).__name__})")
        ticket = self.template
        for holder, key, url in slots:
            holder[key] = self.signer.seal(fernet, Ticket(url, *_rest(ticket)))
        out = await asyncio.to_thread(dump, parsed) if big else dump(parsed)
        self.note = f"{len(slots)} presigned URL(s) rewritten to blob URLs"
        self.signer.count("rewritten")
        return changed_headers(headers, len(out)), out


def _rest(t: Ticket) -> tuple[str, str, str, float, str]:
    return t.user, t.scope, t.grant_id, t.expires, t.route


_MALFORMED = object()


class _Shape(Exception):
    pass


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return _MALFORMED


Slot = tuple[Any, Any, str]  # the dict or list holding a URL, its key or index, the URL


def _slots(node: Any, path: tuple[str, ...]) -> Iterator[Slot]:
    """Every URL string at a key path; lists on the way and at the end are walked."""
    if isinstance(node, list):
        for item in node:
            yield from _slots(item, path)
        return
    if not isinstance(node, dict) or path[0] not in node:
        return  # not there: nothing to rewrite
    if len(path) > 1:
        yield from _slots(node[path[0]], path[1:])
        return
    yield from _values(node, path[0], path[0])


def _values(holder: Any, key: Any, name: str) -> Iterator[Slot]:
    value = holder[key]
    if isinstance(value, str):
        if value:
            yield holder, key, value
    elif isinstance(value, list):
        for i in range(len(value)):
            yield from _values(value, i, name)
    elif value is not None:
        raise _Shape(f"field {name!r} holds a {type(value).__name__}, not a URL")
