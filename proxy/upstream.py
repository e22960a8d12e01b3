"""A lean HTTP/1.1 client to the one upstream: pooled connections, nothing else.

Forwarding needs none of what aiohttp's `ClientSession` adds around a request (cookies,
redirects, default headers, proxies from the environment, traces, URL building, a timer
per request), and that machinery cost about as much CPU as jitgate's own checks. This
client speaks HTTP/1.1 over aiohttp's own protocol (`ResponseHandler`, with the llhttp
response parser and its read timeout) and stream writer (chunked encoding, flow control),
so the bytes on the wire and the parsing are aiohttp's; only the pooling is here:

- at most `size` exchanges at once; the others wait for a slot;
- an idle connection is reused (the most recent first) unless it was idle longer than
  `idle_timeout` or the upstream closed it; a response that was not read to its end, or
  that asked to close, closes its connection;
- a GET, HEAD, OPTIONS or TRACE without a body that fails on a reused connection (the
  upstream closed it while idle) is tried once more on a new one; nothing else is ever
  sent twice.

WebSockets still go through aiohttp's client (forward.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no body expected; retried
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)


class ConnectTimeout(aiohttp.ConnectionTimeoutError):
    """The upstream did not accept a connection within the connect timeout."""


class BadAnswer(aiohttp.ClientError):
    """The upstream's answer is not HTTP that llhttp accepts (its head, e.g. a header)."""


class ConnectFailed(OSError):
    """The upstream refused or could not be reached; `strerror` says why."""


class Response:
    """One upstream answer: its head, and its body as a stream (`content`)."""

    def __init__(
        self,
        pool: Pool,
        proto: ResponseHandler,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: aiohttp.StreamReader,
        keep: bool,
        sending: asyncio.Task[None] | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._pool: Pool | None = pool
        self._proto = proto
        self._keep = keep
        self._sending = sending

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if it may be used again."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        sent = self._sending is None or (
            self._sending.done() and not self._sending.cancelled() and not self._sending.exception()
        )
        if self._keep and sent and self.content.is_eof() and not self._proto.should_close:
            pool._put(self._proto)
        else:
            self._stop_sending()
            self._proto.close()
            pool._free()

    def close(self) -> None:
        """Done with it, whatever state it is in: the connection is closed."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._stop_sending()
            self._proto.close()
            pool._free()

    def _stop_sending(self) -> None:
        sending = self._sending
        if sending is None:
            return
        if not sending.done():
            sending.cancel()
        elif not sending.cancelled():
            sending.exception()  # seen: its failure is why the connection closes


class Pool:
    """Connections to one upstream (scheme, host and port of `url`)."""

    def __init__(
        self,
        url: URL,
        *,
        size: int = 100,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        idle_timeout: float = 15.0,
    ) -> None:
        self.host = url.raw_host or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[ResponseHandler, float]] = []

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: aiohttp.StreamReader | None,
    ) -> Response:
        """Send one request (the body streamed as it comes); return the answer's head."""
        await self._slots.acquire()
        try:
            for attempt in (1, 2):
                proto, reused = await self._connection()
                try:
                    return await self._exchange(proto, method, target, headers, body)
                except _STALE:
                    proto.close()
                    if reused and body is None and method in _SAFE_METHODS and attempt == 1:
                        continue  # closed by the upstream while idle: once more, afresh
                    raise
                except BaseException:
                    proto.close()
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._free()
            raise

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for proto, _ in idle:
            proto.close()

    # -- connections ---------------------------------------------------------------------

    async def _connection(self) -> tuple[ResponseHandler, bool]:
        now = time.monotonic()
        while self._idle:
            proto, since = self._idle.pop()
            if proto.is_connected() and now - since < self.idle_timeout:
                return proto, True
            proto.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(exc.errno, exc.strerror or str(exc)) from exc
        return proto, False

    def _put(self, proto: ResponseHandler) -> None:
        self._idle.append((proto, time.monotonic()))
        self._slots.release()

    def _free(self) -> None:
        self._slots.release()

    # -- one exchange --------------------------------------------------------------------

    async def _exchange(
        self,
        proto: ResponseHandler,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: aiohttp.StreamReader | None,
    ) -> Response:
        loop = asyncio.get_running_loop()
        proto.set_response_params(
            skip_payload=method == hdrs.METH_HEAD,
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=self.read_timeout,
        )
        writer = StreamWriter(proto, loop)
        sending = None
        if body is None:
            if method not in _SAFE_METHODS and hdrs.CONTENT_LENGTH not in headers:
                headers[hdrs.CONTENT_LENGTH] = "0"
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
            await writer.write_eof()
            proto.start_timeout()
        else:
            if hdrs.CONTENT_LENGTH not in headers:
                headers[hdrs.TRANSFER_ENCODING] = "chunked"
                writer.enable_chunking()
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
            # The body goes up while the answer is awaited: an upstream may answer early.
            sending = asyncio.create_task(_send(writer, body, proto))
        try:
            while True:
                message, payload = await proto.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except BaseException as exc:
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
            if isinstance(exc, HttpProcessingError):  # as aiohttp's client says it, a ClientError
                raise BadAnswer(f"invalid response: {exc.message.strip()}") from exc
            raise
        return Response(
            self,
            proto,
            message.code,
            message.reason,
            message.headers,
            payload,
            not message.should_close,
            sending,
        )


async def _send(writer: StreamWriter, body: aiohttp.StreamReader, proto: ResponseHandler) -> None:
    try:
        async for chunk in body.iter_any():
            await writer.write(chunk)
        await writer.write_eof()
    except (OSError, aiohttp.ClientError, asyncio.CancelledError) as exc:
        if not isinstance(exc, asyncio.CancelledError):
            proto.set_exception(aiohttp.ClientOSError(f"cannot send the request body: {exc!r}"))
        raise
    proto.start_timeout()
