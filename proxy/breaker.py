"""A breaker in front of the grant check: a Redis in trouble costs a quick 503, not a wait.

- Closed: checks go to the grant store. A check that fails on Redis (refused, reset,
  timed out) opens the breaker, and so does a stall: a check waiting longer than
  `trip_after` while no other check got an answer meanwhile. A frozen Redis accepts
  connections and answers nothing, which the socket timeout alone finds only after
  `redis.timeout`; the stall finds it within `trip_after`, and every check waiting then
  fails at once.
- Open: every check fails at once with `BreakerOpen`, which the authorizer answers with a
  503 like any grant-store trouble. A probe PINGs Redis, at most every `probe_every`; the
  first answer closes the breaker.

The breaker only ever refuses: it never answers a check in the store's place, so it cannot
let a request through that the store would not. A pool that is merely full
(`MaxConnectionsError`, many checks at once) refuses that check alone and opens nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import MaxConnectionsError, RedisError

from .grants import GrantChecker

log = logging.getLogger("jitgate.redis")

_TROUBLE = (RedisError, OSError, TimeoutError)
_SETTLE_STEPS = 8  # loop iterations a suspected stall waits for answers already received


class BreakerOpen(RedisError):
    """Refused without asking Redis: the breaker is open."""


class Breaker:
    """A GrantChecker in front of another that refuses at once while Redis is in trouble."""

    def __init__(
        self,
        store: GrantChecker,
        ping: Callable[[], Awaitable[Any]],
        *,
        trip_after: float = 0.05,
        probe_every: float = 0.1,
        probe_timeout: float = 1.0,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        if trip_after <= 0 or probe_every <= 0 or probe_timeout <= 0:
            raise ValueError("trip_after, probe_every and probe_timeout must be positive")
        self.store = store
        self.ping = ping
        self.trip_after = trip_after
        self.probe_every = probe_every
        self.probe_timeout = probe_timeout
        self.on_change = on_change
        self.is_open = False
        self.trips = 0
        self.probes = 0
        self._why = ""
        # The checks waiting for Redis, by their timeout (to end them early), oldest first.
        self._waiting: dict[asyncio.Timeout, float] = {}
        self._answered = 0.0  # loop time of the latest check Redis answered

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (grant id, expiry) of an active grant covering any scope, or None."""
        found: tuple[str, float] | None = await self._ask(self.store.check, user, scopes)
        return found

    async def check_many(self, user: str, groups: list[tuple[str, ...]]) -> list[str | None]:
        """Per group of scopes, the id of a grant covering any (the store's batch check)."""
        many = self.store.check_many  # type: ignore[attr-defined]
        found: list[str | None] = await self._ask(many, user, groups)
        return found

    async def _ask(self, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self.is_open:
            raise BreakerOpen(f"Redis in trouble ({self._why}); waiting for it to answer")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as waiting:
                self._waiting[waiting] = loop.time()
                try:
                    answer = await call(*args)
                finally:
                    del self._waiting[waiting]
        except TimeoutError:
            if self.is_open:  # ended by a stall found meanwhile
                raise BreakerOpen(f"Redis in trouble ({self._why})") from None
            self.trip("a check timed out")
            raise
        except MaxConnectionsError:
            raise
        except _TROUBLE as exc:
            self.trip(f"{type(exc).__name__}: {exc}")
            raise
        self._answered = loop.time()
        return answer

    def trip(self, why: str) -> None:
        """Open the breaker (if closed) and end every check waiting for Redis."""
        if self.is_open:
            return
        self.is_open, self._why = True, why
        self.trips += 1
        log.warning("grant checks refused (503) until Redis answers again: %s", why)
        self.on_change(True)
        now = asyncio.get_running_loop().time()
        for waiting in self._waiting:
            waiting.reschedule(now)

    def _close(self) -> None:
        self.is_open, self._why = False, ""
        log.warning("Redis answers again: grant checks resumed")
        self.on_change(False)

    def stalled(self, now: float, lag: float = 0.0) -> bool:
        """Whether the oldest waiting check has waited over `trip_after` with no answer
        since, not counting `lag` (how late the event loop itself runs)."""
        oldest = next(iter(self._waiting.values()), None)
        limit = now - self.trip_after - lag
        return oldest is not None and oldest < limit and self._answered < limit

    async def run(self) -> None:
        """Watch for stalls while closed and probe while open, until cancelled."""
        loop = asyncio.get_running_loop()
        tick = self.trip_after / 2
        while True:
            if self.is_open:
                started = loop.time()
                await self._probe()
                await asyncio.sleep(max(0.0, started + self.probe_every - loop.time()))
                continue
            planned = loop.time() + tick
            await asyncio.sleep(tick)
            now = loop.time()
            # A late wake-up means the event loop itself is busy, which delays answers as
            # much as it delays this watch: that much more wait is not Redis's.
            lag = now - planned
            if self.stalled(now, lag):
                # Answers that reached the socket may still be on their way through the
                # loop (a busy process, not a silent Redis): let them arrive, then look again.
                for _ in range(_SETTLE_STEPS):
                    await asyncio.sleep(0)
                if self.stalled(now, lag):
                    self.trip(f"no answer within {self.trip_after * 1000:g} ms")

    async def _probe(self) -> None:
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout):
                await self.ping()
        except _TROUBLE:
            return
        self._close()
