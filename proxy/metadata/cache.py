"""Recording metadata, kept where the hot path can read it without waiting.

`MetadataCache.prefetch` starts a fetch in the background (at grant time, and on a
recording's first access); `lookup` answers from memory, else from Redis, else from the
tool's API, and waits for a fetch under way at most `wait` seconds. Redis keeps each answer
for `ttl` under `{key_prefix}meta:{scope}`, shared by every replica; memory keeps it for
the same time at most. Failures are not kept: the next lookup asks again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
from redis.asyncio import Redis
from yarl import URL

from .adapters import Adapter, Metadata, MetadataError

log = logging.getLogger("jitgate.metadata")

# Lookup: the metadata, or None with the reason it is not known.
Lookup = tuple[Metadata | None, str | None]
_MEMORY_MAX = 10_000
_LIST_FETCH = 32  # background fetches one list starts at most


class MetadataCache:
    """Fetch, keep and answer recording metadata for one tool."""

    def __init__(
        self,
        adapter: Adapter,
        redis: Redis,
        http: aiohttp.ClientSession,
        base_url: URL,
        *,
        key_prefix: str = "jit:",
        ttl: float = 3600.0,
        timeout: float = 5.0,
        counted: Callable[[str], None] = lambda source: None,
    ) -> None:
        self.adapter = adapter
        self.redis = redis
        self.http = http
        self.base_url = base_url
        self.key_prefix = key_prefix + "meta:"
        self.ttl = ttl
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.counted = counted
        self._memory: OrderedDict[str, Metadata] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[Lookup]] = {}

    @property
    def subject_field(self) -> str:
        return self.adapter.settings.subject.field

    def applies(self, scope: str | None) -> bool:
        """Whether `scope` names one recording of this tool."""
        return scope is not None and self.adapter.target(scope) is not None

    def known(self, scope: str) -> Metadata | None:
        """Return the metadata held in memory, if it is still fresh."""
        meta = self._memory.get(scope)
        if meta is None:
            return None
        if time.time() - meta.fetched_at >= self.ttl:
            del self._memory[scope]
            return None
        self._memory.move_to_end(scope)
        return meta

    def prefetch(self, scope: str | None) -> asyncio.Task[Lookup] | None:
        """Start fetching a recording's metadata in the background, unless known or under way."""
        if scope is None or not self.applies(scope) or self.known(scope) is not None:
            return None
        task = self._fetching.get(scope)
        if task is None:
            task = asyncio.create_task(self._load(scope), name=f"metadata {scope}")
            self._fetching[scope] = task
            task.add_done_callback(lambda _: self._fetching.pop(scope, None))
        return task

    async def cached(
        self, scopes: list[str], fetch: int = _LIST_FETCH
    ) -> dict[str, Metadata | None]:
        """What is already known of each recording of `scopes` (only those of this tool), from
        memory, else from Redis in one round trip; None where nothing is known yet, or Redis
        cannot say. Never waits for the tool: for up to `fetch` of the unknown ones a
        background fetch starts, so that they are known next time."""
        mine = [s for s in dict.fromkeys(scopes) if self.applies(s)]
        found: dict[str, Metadata | None] = {s: self.known(s) for s in mine}
        missing = [s for s, meta in found.items() if meta is None]
        if missing:
            try:
                raws = await self.redis.mget([self.key_prefix + s for s in missing])
            except Exception as exc:  # unknown, then: the caller fails closed
                log.warning("metadata: cannot read %d entries from Redis: %r", len(missing), exc)
                raws = [None] * len(missing)
            for scope, raw in zip(missing, raws, strict=True):
                found[scope] = self._parse(scope, raw)
        unknown = [s for s, meta in found.items() if meta is None]
        for scope in unknown[:fetch]:
            self.prefetch(scope)
        return found

    def _parse(self, scope: str, raw: bytes | str | None) -> Metadata | None:
        if raw is None:
            return None
        try:
            meta = Metadata.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("metadata: bad entry for %s in Redis: %r", scope, exc)
            return None
        if time.time() - meta.fetched_at >= self.ttl:
            return None
        self.counted("redis")
        return self._keep(meta)

    async def lookup(self, scope: str, wait: float | None = None) -> Lookup:
        """Return a recording's metadata, waiting at most `wait` seconds (None: the fetch)."""
        meta = self.known(scope)
        if meta is not None:
            self.counted("memory")
            return meta, None
        task = self.prefetch(scope)
        if task is None:
            return None, f"{scope} does not name a {self.adapter.name} recording"
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return None, f"metadata of {scope} not fetched within {wait:g}s"

    async def close(self) -> None:
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)

    async def _load(self, scope: str) -> Lookup:
        key = self.key_prefix + scope
        try:
            raw = await self.redis.get(key)
            if raw is not None:
                meta = Metadata.from_json(json.loads(raw))
                self.counted("redis")
                return self._keep(meta), None
        except Exception as exc:  # Redis trouble or a bad entry: ask the tool instead
            log.warning("metadata: cannot read %s from Redis: %r", key, exc)
        try:
            meta = await self._fetch(scope)
        except MetadataError as exc:
            self.counted("error")
            log.warning("metadata: %s", exc)
            return None, str(exc)
        self.counted("upstream")
        try:
            data = json.dumps(meta.to_json(), separators=(",", ":"))
            await self.redis.set(key, data, px=max(int(self.ttl * 1000), 1))
        except Exception as exc:  # kept in memory all the same
            log.warning("metadata: cannot keep %s in Redis: %r", key, exc)
        return self._keep(meta), None

    async def _fetch(self, scope: str) -> Metadata:
        path = self.adapter.target(scope)
        assert path is not None
        meta = self.adapter.read(scope, await self._ask(scope, path, None))
        urls = self.adapter.urls_query(scope)
        if urls is None:
            return meta
        visited = self.adapter.read_urls(await self._ask(scope, *urls))
        return replace(meta, urls=tuple(dict.fromkeys((*meta.urls, *visited))))

    async def _ask(self, scope: str, path: str, query: dict[str, Any] | None) -> Any:
        """GET `path` (or POST the JSON `query` to it) and return the JSON answer."""
        url = self.base_url.with_path(self.base_url.path.rstrip("/") + path, encoded=True)
        name = self.adapter.name
        try:
            async with self.http.request(
                "GET" if query is None else "POST", url, json=query,
                headers=self.adapter.headers(), timeout=self.timeout, allow_redirects=False,
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    raise MetadataError(f"{name} answered {resp.status} for {scope}'s metadata")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            raise MetadataError(f"cannot fetch {scope}'s metadata from {name}: {why}") from None

    def _keep(self, meta: Metadata) -> Metadata:
        self._memory[meta.scope] = meta
        self._memory.move_to_end(meta.scope)
        while len(self._memory) > _MEMORY_MAX:
            self._memory.popitem(last=False)
        return meta
