"""Forward one authorised request to the upstream: HTTP streamed both ways, or a websocket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .failures import failure_response, too_large
from .hygiene import HOP_BY_HOP, Hygiene, connection_tokens
from .reqbody import Capped, request_body
from .upstream import ConnectFailed, Pool, Response

# Every request goes through the maintained list, also where no configuration says more.
DEFAULT_HYGIENE = Hygiene.build()

# A refused upgrade is relayed without its body, which aiohttp has already dropped.
_REFUSED_DROP = HOP_BY_HOP | {"content-length", "content-type", "content-encoding"}
_LOCATION_KEYS = frozenset({"location", "content-location"})
_URL_PART_END = frozenset({"", "/", "?", "#"})
_NO_BODY_STATUS = frozenset({204, 304})

# Above this many bytes a held body is changed in a worker thread, off the event loop.
_REWRITE_INLINE_MAX = 256 * 1024

ClientWS = aiohttp.ClientWebSocketResponse[Literal[False]]
ServerWS = web.WebSocketResponse[Literal[False]]


@dataclass(frozen=True)
class UpstreamConfig:
    url: URL
    host_header: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    pool_size: int = 100
    keepalive: float = 15.0  # below the upstream's own idle timeout
    max_ws_message: int = 4 * 1024 * 1024  # a larger WebSocket message closes with 1009
    max_body: int = 64 * 1024 * 1024  # a larger request body is refused with 413


class BodyRewrite(Protocol):
    """A change to a whole response body (the status bar): held, changed, then sent."""

    @property
    def limit(self) -> int:
        """Bodies larger than this, as received, are streamed on untouched."""
        ...

    def wants(self, status: int, headers: MultiMapping[str]) -> bool:
        """Whether to hold this response's body for `apply`; decided from its headers."""
        ...

    def apply(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None:
        """Return the new headers and body, or None to send the response as it came."""
        ...


@runtime_checkable
class AsyncBodyRewrite(Protocol):
    """A change to a whole response body that awaits (a list's grants, lists.py)."""

    @property
    def limit(self) -> int: ...

    def wants(self, status: int, headers: MultiMapping[str]) -> bool: ...

    async def rewrite(
        self, headers: CIMultiDict[str], body: bytes
    ) -> tuple[CIMultiDict[str], bytes] | None: ...

    def fell_back(self, why: str) -> None:
        """The body went on as it came: `over_cap` when larger than `limit`.

        May raise RewriteRefused instead, to refuse the response.
        """


class RewriteRefused(Exception):
    """A held body that must not reach the client as it came and could not be changed.

    Raised by an AsyncBodyRewrite's `rewrite` or `fell_back` (blobs.py: a response with
    presigned URLs that cannot be rewritten); the client gets `status` with `reason`.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Outcome:
    status: int
    bytes_sent: int
    upstream_error: str | None  # the kind: connect, timeout, protocol
    detail: str = ""  # what went wrong, in words, for the log line
    cut: bool = False  # the upstream failed after the status line went out: the client is cut


class Forwarder:
    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None  # for WebSockets
        self._pool: Pool | None = None  # for everything else
        url = config.url
        scheme = url.scheme.lower()
        authority = url.host_port_subcomponent or ""
        base = url.raw_path.rstrip("/")
        self._ws_prefix = f"{'wss' if scheme == 'https' else 'ws'}://{authority}{base}"
        self._host = config.host_header or authority
        self._base = base
        self._read_timeout_text = f"jitgate: upstream timed out after {config.read_timeout:g}s"
        # Every spelling of the upstream origin a redirect may use, longest first.
        raw_host = (url.raw_host or "").lower()
        host = f"[{raw_host}]" if ":" in raw_host else raw_host
        origins = {f"{scheme}://{host}:{url.port}"}
        if url.is_default_port():
            origins.add(f"{scheme}://{host}")
        if config.host_header:
            origins |= {f"{s}://{config.host_header}" for s in ("http", "https")}
        self._origins = tuple(sorted((o.lower() for o in origins), key=len, reverse=True))
        self._origin_len = len(self._origins[0])

    async def start(self) -> None:
        """Open the connection pool, and the client session for WebSockets."""
        cfg = self._config
        self._pool = Pool(
            cfg.url,
            size=cfg.pool_size,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            idle_timeout=cfg.keepalive,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.pool_size),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=cfg.connect_timeout, sock_read=cfg.read_timeout
            ),
            auto_decompress=False,
            # Upstream cookies must never be shared between our clients.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send only what the client sent: no default Accept-Encoding, User-Agent, etc.
            skip_auto_headers=(
                hdrs.ACCEPT,
                hdrs.ACCEPT_ENCODING,
                hdrs.USER_AGENT,
                hdrs.CONTENT_TYPE,
            ),
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self,
        request: web.Request,
        path: str,
        query: str,
        *,
        drop_headers: frozenset[str] = frozenset(),
        drop_cookies: frozenset[str] = frozenset(),
        set_headers: Mapping[str, str] | None = None,
        stop: asyncio.Event | None = None,
        rewrite: BodyRewrite | AsyncBodyRewrite | None = None,
        hygiene: Hygiene = DEFAULT_HYGIENE,
        body: bytes | None = None,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Forward the request upstream; return the response to hand back and what happened.

        `body`, when given, is the request body already read whole (a body rule decided on
        it): those bytes are sent as they are.

        The client's headers go through `hygiene` (compiled once per configuration), then
        `set_headers` (what jitgate vouches for) are set.
        """
        session, pool = self._session, self._pool
        assert session is not None and pool is not None, "Forwarder.start() was not awaited"
        target = f"{path}?{query}" if query else path
        ws = _is_websocket(request)
        headers = hygiene.request_headers(
            request,
            self._host,
            websocket=ws,
            drop_headers=drop_headers,
            drop_cookies=drop_cookies,
        )
        if set_headers:
            headers.update(set_headers)
        if ws:
            return await self._websocket(session, request, target, headers, stop)

        limit = self._config.max_body
        if (request.content_length or 0) > limit:
            return too_large(request, limit), Outcome(413, 0, None)
        sent = request_body(request, body, limit)
        try:
            upstream = await pool.request(request.method, self._base + target, headers, sent)
        except Exception as exc:
            if isinstance(sent, Capped) and sent.over:
                return too_large(request, limit), Outcome(413, 0, None)
            return self._failure(request, exc)
        try:
            return await self._relay(request, upstream, stop, rewrite)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: Response,
        stop: asyncio.Event | None,
        rewrite: BodyRewrite | AsyncBodyRewrite | None = None,
    ) -> tuple[web.StreamResponse, Outcome]:
        status = upstream.status
        headers = self._response_headers(request, upstream.headers, HOP_BY_HOP)
        held: list[bytes] = []  # read before the status line is sent, written first
        if (
            rewrite is not None
            and request.method != hdrs.METH_HEAD
            and status not in _NO_BODY_STATUS
            and rewrite.wants(status, headers)
        ):
            held, end = await _hold(upstream.content, rewrite.limit, stop)
            # Nothing has been sent yet, so a failing upstream still gets a clean 502/504.
            if end == "timeout":
                upstream.close()
                return self._failure(request, TimeoutError())
            if end == "protocol":
                upstream.close()
                return self._failure(request, aiohttp.ClientPayloadError("upstream body cut"))
            try:
                if end == "eof":
                    body = b"".join(held)
                    changed = await apply_rewrite(rewrite, headers, body)
                    if changed is not None:
                        headers, body = changed
                    held = [body]
                elif end == "over" and isinstance(rewrite, AsyncBodyRewrite):
                    rewrite.fell_back("over_cap")
                elif end == "expired" and isinstance(rewrite, AsyncBodyRewrite):
                    # Never half a body that was to be changed: the grant ended first.
                    raise RewriteRefused(403, "the grant ended while the response was read")
            except RewriteRefused as exc:
                upstream.close()
                text = f"jitgate: {exc.reason}\n"
                return web.Response(status=exc.status, text=text), Outcome(
                    exc.status, len(text), "rewrite", text
                )
            # "over" (too large) and "expired" go on as a plain stream: the held part first.
        resp = web.StreamResponse(status=status, reason=upstream.reason, headers=headers)
        outcome = Outcome(status, 0, None)
        try:
            await resp.prepare(request)
        except ConnectionError:
            upstream.close()
            return resp, outcome
        if request.method == hdrs.METH_HEAD or status in _NO_BODY_STATUS:
            return resp, outcome
        content = upstream.content
        watcher = None
        cut = False
        deadline = asyncio.timeout(None)
        try:
            async with deadline:
                # A body already read to its end cannot outlive a grant by more than the
                # time to copy it; only an unfinished one needs a watcher.
                if stop is not None and not content.is_eof():
                    watcher = asyncio.create_task(_expire_on(stop, deadline))
                for chunk in held:
                    try:
                        await resp.write(chunk)
                    except ConnectionError:
                        cut = True
                        break
                    outcome.bytes_sent += len(chunk)
                while not cut:
                    try:
                        chunk = await content.readany()
                    except TimeoutError:
                        outcome.upstream_error = "timeout"
                        outcome.detail = self._read_timeout_text + " in the body"
                        break
                    except (aiohttp.ClientError, OSError) as exc:
                        outcome.upstream_error = "protocol"
                        outcome.detail = f"jitgate: upstream body cut ({type(exc).__name__})"
                        break
                    if not chunk:
                        break
                    try:
                        await resp.write(chunk)
                    except ConnectionError:
                        cut = True
                        break
                    outcome.bytes_sent += len(chunk)
        except TimeoutError:
            if not deadline.expired():
                raise
            cut = True
        finally:
            if watcher is not None:
                watcher.cancel()
        if cut or outcome.upstream_error:
            outcome.cut = True
            # The status line is gone: abort so a truncated body cannot look complete.
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
        return resp, outcome

    async def _websocket(
        self,
        session: aiohttp.ClientSession,
        request: web.Request,
        target: str,
        headers: CIMultiDict[str],
        stop: asyncio.Event | None,
    ) -> tuple[web.StreamResponse, Outcome]:
        protocols = [
            p.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
            for p in value.split(",")
            if p.strip()
        ]
        try:
            upstream = await session.ws_connect(
                URL(self._ws_prefix + target, encoded=True),
                protocols=protocols,
                headers=headers,
                autoclose=False,
                autoping=False,
                decode_text=False,
                max_msg_size=self._config.max_ws_message,
                timeout=aiohttp.ClientWSTimeout(
                    ws_receive=None, ws_close=self._config.connect_timeout
                ),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101 or exc.headers is None:
                return self._failure(request, exc)
            # Relay the refusal (403, 404, ...) as a plain HTTP answer.
            text = f"jitgate: upstream refused the websocket upgrade ({exc.status})"
            refused = web.Response(
                status=exc.status,
                headers=self._response_headers(request, exc.headers, _REFUSED_DROP),
                text=text,
            )
            return refused, Outcome(exc.status, len(text), None)
        except Exception as exc:
            return self._failure(request, exc)

        client: ServerWS = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            compress=False,
            decode_text=False,
            max_msg_size=self._config.max_ws_message,
        )
        try:
            await client.prepare(request)
        except web.HTTPException as exc:
            await upstream.close(code=1001)
            return exc, Outcome(exc.status, 0, None)
        except BaseException:
            await upstream.close(code=1001)
            raise
        counter = [0]
        # A side that vanishes without a close frame: the client is "going away" (1001); the
        # upstream is a "bad gateway" (1014) to the client.
        to_up = asyncio.create_task(_pump(client, upstream, counter, 1001))
        to_client = asyncio.create_task(_pump(upstream, client, counter, 1014))
        waiting: set[asyncio.Future[Any]] = {to_up, to_client}
        stopper = None
        if stop is not None:
            stopper = asyncio.create_task(stop.wait())
            waiting.add(stopper)
        upstream_error = None
        # Upstream first: closing the client's transport may cancel this handler (aiohttp's
        # handler_cancellation), which must not leave the upstream side open.
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if stopper is not None and stopper in done:
                await upstream.close(code=1001)
                await client.close(code=1008, message=b"access revoked")
            elif to_client in done:
                code, message, clean = to_client.result()
                if not clean:
                    upstream_error = "protocol"
                await upstream.close(code=code)
                await client.close(code=code, message=message)
            else:
                code, message, _clean = to_up.result()
                await upstream.close(code=code, message=message)
                await client.close(code=code)
        finally:
            pending = [t for t in (to_up, to_client, stopper) if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if not upstream.closed:
                await upstream.close(code=1001)
            if not client.closed:
                await client.close(code=1011)
        return client, Outcome(101, counter[0], upstream_error)

    def _response_headers(
        self,
        request: web.Request,
        src: MultiMapping[str],
        drop: frozenset[str],
    ) -> CIMultiDict[str]:
        named = connection_tokens(src)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in src.items():
            key = name.lower()
            if key in drop or key in named:
                continue
            if key in _LOCATION_KEYS:
                value = self._rewrite_location(request, value)
            out.add(name, value)
        return out

    def _rewrite_location(self, request: web.Request, value: str) -> str:
        """Point an absolute URL on the upstream origin at the origin the client used."""
        if hdrs.HOST not in request.headers:
            return value
        lowered = value[: self._origin_len].lower()
        for origin in self._origins:
            n = len(origin)
            if lowered.startswith(origin) and value[n : n + 1] in _URL_PART_END:
                rest = value[n:]
                break
        else:
            return value
        base = self._base
        if base:
            # Outside the base path the URL names nothing this proxy serves.
            n = len(base)
            if not rest.startswith(base) or rest[n : n + 1] not in _URL_PART_END:
                return value
            rest = rest[n:]
        if not rest.startswith("/"):
            rest = "/" + rest
        return f"{request.scheme}://{request.host}{rest}"

    def _failure(
        self, request: web.Request, exc: BaseException
    ) -> tuple[web.StreamResponse, Outcome]:
        """The upstream failed before anything was sent: 502 or 504, as JSON or a page."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            status, kind, text = 504, "connect", "jitgate: upstream connect timed out"
        elif isinstance(exc, TimeoutError):
            status, kind, text = 504, "timeout", self._read_timeout_text
        elif isinstance(exc, ConnectFailed):
            status, kind = 502, "connect"
            text = f"jitgate: upstream unreachable (connect failed: {exc.strerror})"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            reason = exc.os_error.strerror or str(exc.os_error)
            status, kind = 502, "connect"
            text = f"jitgate: upstream unreachable (connect failed: {reason})"
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            status, kind = 502, "protocol"
            text = f"jitgate: upstream protocol error ({type(exc).__name__})"
        else:
            raise exc
        response = failure_response(request, status, kind, text)
        return response, Outcome(status, response.content_length or 0, kind, text)


async def apply_rewrite(
    rewrite: BodyRewrite | AsyncBodyRewrite, headers: CIMultiDict[str], body: bytes
) -> tuple[CIMultiDict[str], bytes] | None:
    """One rewrite of a whole body: awaited, or run in a thread when the body is large."""
    if isinstance(rewrite, AsyncBodyRewrite):
        return await rewrite.rewrite(headers, body)
    if len(body) > _REWRITE_INLINE_MAX:
        return await asyncio.to_thread(rewrite.apply, headers, body)
    return rewrite.apply(headers, body)


def _is_websocket(request: web.Request) -> bool:
    headers = request.headers
    return (
        request.method == hdrs.METH_GET
        and headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and "upgrade" in connection_tokens(headers)
    )


async def _hold(
    content: aiohttp.StreamReader, limit: int, stop: asyncio.Event | None
) -> tuple[list[bytes], str]:
    """Read a body up to just past limit; return the chunks and how reading ended.

    The end is "eof" (all of it), "over" (more than limit), "expired" (the grant ended
    while reading), "timeout" or "protocol" (the upstream failed).
    """
    held: list[bytes] = []
    size = 0
    deadline = asyncio.timeout(None)
    watcher = None
    try:
        async with deadline:
            if stop is not None:
                watcher = asyncio.create_task(_expire_on(stop, deadline))
            while size <= limit:
                try:
                    chunk = await content.readany()
                except TimeoutError:
                    return held, "timeout"
                except (aiohttp.ClientError, OSError):
                    return held, "protocol"
                if not chunk:
                    return held, "eof"
                held.append(chunk)
                size += len(chunk)
    except TimeoutError:
        if not deadline.expired():
            raise
        return held, "expired"
    finally:
        if watcher is not None:
            watcher.cancel()
    return held, "over"


async def _expire_on(stop: asyncio.Event, deadline: asyncio.Timeout) -> None:
    await stop.wait()
    with contextlib.suppress(RuntimeError):  # the block already ended
        deadline.reschedule(0)


async def _pump(
    src: ServerWS | ClientWS, dst: ServerWS | ClientWS, counter: list[int], lost: int
) -> tuple[int, bytes, bool]:
    """Copy messages from src to dst; return (close code, reason, closed cleanly)."""
    while True:
        msg = await src.receive()
        kind = msg.type
        try:
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                data: bytes = msg.data
                await dst.send_frame(data, kind)
                counter[0] += len(data)
            elif kind is WSMsgType.PING:
                await dst.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await dst.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                return _sendable(msg.data), (msg.extra or "").encode(), True
            elif kind is WSMsgType.ERROR:
                # aiohttp already closed src with the code matching the error (1009, 1002, ...).
                return _sendable(getattr(msg.data, "code", lost)), b"", False
            else:  # CLOSED or CLOSING: src went away without a close frame
                return lost, b"", False
        except ConnectionError:  # dst is gone; src is still fine
            return 1001, b"", True


def _sendable(code: int) -> int:
    """Map close codes that must not appear in a close frame to the nearest that may."""
    if code == 0 or code == 1005:
        return 1000
    if code in (1006, 1015) or not 1000 <= code < 5000:
        return 1001
    return code
