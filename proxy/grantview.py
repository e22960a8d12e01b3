"""A local view of active grants: a grant check that needs no Redis round trip, kept honest.

The view remembers the answers Redis gave to grant checks that found a grant, and answers
the same check again from memory until that grant's expiry. It is trusted only while the
grant store's event feed is known to be current:

- The feed carries every change to a grant that could end or move it ("revoked",
  "extended", "granted"), and any such change empties the whole view.
- The feed is pinged every `lag / 2`. A ping's answer comes after every message published
  before it, so once the ping sent at time t is answered, every change announced before t
  has been seen. The view answers only while that t is at most `lag` ago: a revocation holds
  on this replica within `lag`, even when the feed stalls without breaking.
- Nor while anything the feed received waits unread (the subscription's buffer and socket
  are looked at): a change holds once its announcement reaches this host, and a Redis
  that just died is not trusted before the feed has noticed.
- Losing the feed empties the view and stops it answering until the feed is back: every
  check goes to Redis then, and a Redis in doubt refuses with 503 as before.
- A check that went to Redis while a change or a loss was seen is answered, but not
  remembered: its answer may predate the change.

Only found grants are remembered: a refusal always asks Redis, so a new grant works at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from .grants import GrantChecker

log = logging.getLogger("jitgate.grants")


class Feed(Protocol):
    """The grant store's event feed (RedisGrants.events): ("subscribed", ""), a change
    (kind, grant id), or ("heard", t) when the ping sent at monotonic time t was answered;
    `watch` gets a probe that says whether everything received has been yielded."""

    def __call__(
        self, ping_every: float, *, watch: Callable[[Callable[[], bool]], None]
    ) -> AsyncIterator[tuple[str, str]]: ...


class GrantView:
    """A GrantChecker in front of another that answers repeated found checks from memory."""

    def __init__(
        self,
        store: GrantChecker,
        *,
        lag: float = 0.1,
        max_entries: int = 100_000,
    ) -> None:
        if lag <= 0:
            raise ValueError(f"lag must be positive, not {lag}")
        self.store = store
        self.lag = lag
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}
        self._heard: float | None = None  # the send time of the latest answered ping
        self._quiet: Callable[[], bool] = lambda: False  # nothing unread on the feed
        self._generation = 0  # bumped by every change and every loss of the feed

    def current(self) -> bool:
        """Whether every change announced more than `lag` ago has been seen, and nothing
        the feed received (a change, or the end of a Redis that died) waits unread."""
        heard = self._heard
        return heard is not None and time.monotonic() - heard <= self.lag and self._quiet()

    def __len__(self) -> int:
        return len(self._entries)

    async def check(self, user: str, scopes: tuple[str, ...]) -> tuple[str, float] | None:
        """Return (grant id, expiry) of an active grant covering any scope, or None."""
        key = (user, scopes)
        if self.current():
            found = self._entries.get(key)
            if found is not None and found[1] > time.time():
                self.hits += 1
                return found
        self.misses += 1
        generation = self._generation
        found = await self.store.check(user, scopes)
        if found is not None and generation == self._generation and self._heard is not None:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # rare, and always safe: the next checks ask Redis
            self._entries[key] = found
        return found

    async def check_many(self, user: str, groups: list[tuple[str, ...]]) -> list[str | None]:
        """Per group of scopes, the grant covering any: always asked of the store, whose
        batch check is one round trip (a list's many ids would only crowd the memory)."""
        return await self.store.check_many(user, groups)  # type: ignore[attr-defined, no-any-return]

    # -- fed by the event feed -----------------------------------------------------------

    def heard(self, sent: float) -> None:
        """The ping sent at monotonic time `sent` was answered."""
        if self._heard is None or sent > self._heard:
            self._heard = sent

    def changed(self) -> None:
        """A grant changed somewhere: forget everything, and what is asked meanwhile."""
        self._generation += 1
        self._entries.clear()

    def lost(self) -> None:
        """The feed is gone: changes may be missed from now on, so trust nothing."""
        self._heard = None
        self._quiet = lambda: False
        self.changed()

    def _watch(self, quiet: Callable[[], bool]) -> None:
        self._quiet = quiet

    async def follow(self, feed: Feed, *, backoff_max: float = 5.0) -> None:
        """Keep the view current from `feed` until cancelled; resubscribe when it breaks."""
        delay = 0.1
        while True:
            try:
                async for kind, value in feed(self.lag / 2, watch=self._watch):
                    if kind == "heard":
                        self.heard(float(value))
                        delay = 0.1
                    else:
                        # On subscribing too: a check sent before it may have raced a
                        # change the feed missed, so its answer must not be kept.
                        self.changed()
            except asyncio.CancelledError:
                self.lost()
                raise
            except Exception as exc:
                log.warning("grant event feed lost (%r): grant checks go to Redis", exc)
            self.lost()
            await asyncio.sleep(delay)
            delay = min(backoff_max, delay * 2)
