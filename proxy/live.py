"""Open streams and WebSockets that depend on a grant, and cutting them when it ends.

Every forwarded request under a grant registers here and gets the grant's stop event,
which is set when the grant is revoked (a message on Redis pub/sub reaches every
replica), when it expires (a timer per grant, confirmed against Redis before cutting, so
an extended grant lives on), and, failing closed, when the pub/sub connection is lost,
since a revocation may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("jitgate.live")

# Looks up a grant's current expiry (epoch seconds), or None if it no longer exists.
ExpiryLookup = Callable[[str], Awaitable[float | None]]


class _Grant:
    """The connections under one grant share one stop event and one expiry timer.

    The entry lives until the grant ends, even while no connection is open, so a busy
    grant costs a counter update per request rather than an event and a timer each.
    """

    __slots__ = ("expires_at", "open", "stop", "timer")

    def __init__(self, expires_at: float) -> None:
        self.stop = asyncio.Event()
        self.open = 0
        self.expires_at = expires_at
        self.timer: asyncio.TimerHandle | None = None


class LiveConnections:
    def __init__(
        self,
        lookup: ExpiryLookup,
        *,
        on_cut: Callable[[str, int], None] = lambda reason, n: None,
    ) -> None:
        self._lookup = lookup
        self._on_cut = on_cut
        self._grants: dict[str, _Grant] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(g.open for g in self._grants.values())

    def open(self, grant_id: str, expires_at: float) -> asyncio.Event:
        """Register one connection under a grant; the event is set when the grant ends."""
        entry = self._grants.get(grant_id)
        if entry is None:
            entry = self._grants[grant_id] = _Grant(expires_at)
            self._schedule(grant_id, entry)
        entry.open += 1
        return entry.stop

    def close(self, grant_id: str, stop: asyncio.Event) -> None:
        """Forget a connection that has ended."""
        entry = self._grants.get(grant_id)
        if entry is not None and entry.stop is stop:  # not a newer entry after a cut
            entry.open -= 1

    def cut(self, grant_id: str, reason: str) -> int:
        """Stop every connection under a grant at once; return how many."""
        entry = self._grants.pop(grant_id, None)
        if entry is None:
            return 0
        if entry.timer is not None:
            entry.timer.cancel()
        entry.stop.set()
        n = entry.open
        if n:
            self._on_cut(reason, n)
            log.info("cut %d live connection(s) of grant %s: %s", n, grant_id, reason)
        return n

    def cut_all(self, reason: str) -> int:
        return sum(self.cut(grant_id, reason) for grant_id in list(self._grants))

    async def recheck(self) -> None:
        """Confirm every live grant against Redis; cut those that are gone or expired."""
        for grant_id in list(self._grants):
            await self._confirm(grant_id)

    async def close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for grant in self._grants.values():
            if grant.timer is not None:
                grant.timer.cancel()
        self._grants.clear()

    def _schedule(self, grant_id: str, entry: _Grant) -> None:
        delay = max(0.0, entry.expires_at - time.time())
        entry.timer = asyncio.get_running_loop().call_later(delay, self._spawn_confirm, grant_id)

    def _spawn_confirm(self, grant_id: str) -> None:
        task = asyncio.create_task(self._confirm(grant_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm(self, grant_id: str) -> None:
        entry = self._grants.get(grant_id)
        if entry is None:
            return
        try:
            expires_at = await self._lookup(grant_id)
        except Exception as exc:  # cannot confirm the grant: fail closed
            log.warning("cannot confirm grant %s (%r): cutting its connections", grant_id, exc)
            self.cut(grant_id, "unverifiable")
            return
        if expires_at is None or expires_at <= time.time():
            self.cut(grant_id, "expired" if expires_at is not None else "ended")
            return
        if self._grants.get(grant_id) is entry:  # extended: wait for the new end
            entry.expires_at = expires_at
            if entry.timer is not None:
                entry.timer.cancel()
            self._schedule(grant_id, entry)


async def follow_revocations(
    feed: Callable[[], AsyncIterator[str | None]],
    live: LiveConnections,
    *,
    backoff_max: float = 5.0,
) -> None:
    """Cut the connections of revoked grants; `feed` yields None once subscribed, then ids.

    Messages sent while not subscribed are lost, so every (re)subscription confirms all
    live grants against Redis, and losing the feed cuts every live connection.
    """
    delay = 0.1
    while True:
        try:
            async for grant_id in feed():
                if grant_id is None:
                    await live.recheck()
                    delay = 0.1
                else:
                    live.cut(grant_id, "revoked")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cut = live.cut_all("redis_unavailable")
            log.warning("revocation feed lost (%r); cut %d live connection(s)", exc, cut)
        await asyncio.sleep(delay)
        delay = min(backoff_max, delay * 2)
