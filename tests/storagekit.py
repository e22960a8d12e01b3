"""A real local "S3" for blob tests: presigned GET URLs it signs itself and checks itself.

The query looks like S3's (`X-Amz-Algorithm`, `X-Amz-Credential` with its encoded `/`,
`X-Amz-Date`, `X-Amz-Expires`, `X-Amz-SignedHeaders`, `X-Amz-Signature`). The signature is
an HMAC over the method, the raw path and the raw query before it, so a URL changed in any
byte (re-encoded `%2F` included) or past its expiry is refused with 403, like S3 does.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_KEY = b"storage-secret-of-the-test"


@dataclass
class Storage:
    url: str = ""  # the origin, http://127.0.0.1:PORT
    objects: dict[str, bytes] = field(default_factory=dict)  # raw path -> bytes
    hits: list[tuple[str, int]] = field(default_factory=list)  # (raw path, status)
    headers: list[dict[str, str]] = field(default_factory=list)  # what each request carried
    # Raw paths whose body is sent in two halves, the second once the event is set.
    held: dict[str, asyncio.Event] = field(default_factory=dict)

    def presign(self, path: str, expires: int = 900) -> str:
        """A presigned GET URL of `path`, valid for `expires` seconds from now."""
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=minio%2F20261204%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
        )
        return f"{self.url}{path}?{query}&X-Amz-Signature={_sign('GET', path, query)}"

    def presign_all(self, doc: Any, origin: str) -> Any:
        """`doc` with each URL on `origin` (a fixture's made-up host) presigned here instead."""
        if isinstance(doc, dict):
            return {k: self.presign_all(v, origin) for k, v in doc.items()}
        if isinstance(doc, list):
            return [self.presign_all(v, origin) for v in doc]
        if isinstance(doc, str) and doc.startswith(origin + "/"):
            path = doc[len(origin) :].partition("?")[0]
            self.objects.setdefault(path, f"file {path}".encode())
            return self.presign(path)
        return doc

    def config(self, more: str = "") -> str:
        """The `blobs:` section of a jitgate config that lets jitgate fetch from here."""
        return f'blobs: {{origins: ["{self.url}"], ttl: 5m{more}}}\n'


def _sign(method: str, path: str, query: str) -> str:
    return hmac.new(_KEY, f"{method}\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()


def _check(request: web.Request) -> str | None:
    """Why the request's presigned query is refused, or None."""
    path, _, query = request.raw_path.partition("?")
    unsigned, _, signature = query.rpartition("&X-Amz-Signature=")
    if not hmac.compare_digest(_sign(request.method, path, unsigned), signature):
        return "SignatureDoesNotMatch"
    issued = calendar.timegm(time.strptime(request.query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    if time.time() > issued + int(request.query["X-Amz-Expires"]):
        return "AccessDenied: Request has expired"
    return None


async def start_storage(aiohttp_server: Any) -> Storage:
    store = Storage()

    async def get(request: web.Request) -> web.StreamResponse:
        raw = request.raw_path.partition("?")[0]
        store.headers.append(dict(request.headers))
        why = _check(request)
        if why is not None:
            store.hits.append((raw, 403))
            return web.Response(status=403, text=f"<Error><Code>{why}</Code></Error>")
        body = store.objects.get(raw)
        if body is None:
            store.hits.append((raw, 404))
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        store.hits.append((raw, 200))
        if raw not in store.held:
            return web.Response(body=body, content_type="application/octet-stream")
        out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        out.content_length = len(body)
        await out.prepare(request)
        half = len(body) // 2
        await out.write(body[:half])
        await store.held[raw].wait()
        await out.write(body[half:])
        return out

    app = web.Application()
    app.router.add_get("/{tail:.*}", get)
    server = await aiohttp_server(app)
    store.url = str(server.make_url("")).rstrip("/")
    return store
