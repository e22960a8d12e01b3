"""A request's body as the upstream pool sends it: held whole, or streamed with a cap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import aiohttp
from aiohttp import web


def request_body(
    request: web.Request, held: bytes | None, limit: int
) -> aiohttp.StreamReader | None:
    # The pool only iterates the body (iter_any), which Held and Capped provide.
    if held is not None:
        return cast(aiohttp.StreamReader, Held(held))
    if not request.body_exists:
        return None
    return cast(aiohttp.StreamReader, Capped(request.content, limit))


class Capped:
    """A client's streamed body, cut off (the upstream request fails) past `limit` bytes."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._left = limit
        self.over = False

    async def iter_any(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():
            self._left -= len(chunk)
            if self._left < 0:
                self.over = True
                raise aiohttp.ClientPayloadError("request body over the limit")
            yield chunk


class Held:
    """A request body already read whole, sent upstream as the client's stream would be."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def iter_any(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data
