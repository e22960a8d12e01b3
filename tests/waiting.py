"""Wait for a condition, never for a fixed time: a slow CI machine only waits longer."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    within: float = 15.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Call (and await) `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T], *, within: float = 15.0, interval: float = 0.02, what: str = "it"
) -> T:
    """The same for code outside the event loop (processes, threads, files)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(interval)


async def past(deadline: float) -> None:
    """Wait until the wall clock is past `deadline` (epoch seconds): for lifetimes under test."""
    delay = deadline - time.time()
    if delay > 0:
        await asyncio.sleep(delay + 0.02)  # the loop's clock is not the wall clock
