"""Audit records: one per decision and per grant change, written in batches to every sink.

`AuditLog.emit` never blocks the request: it serialises the record once and appends the
JSON line to each sink's queue. A background
task flushes batches; a sink that fails keeps its batch and is retried with backoff. If a
queue is full the record cannot be kept: that is counted and logged, never silent.

With an HMAC key each AuditLog is one writer of a hash chain (see auditchain.py): every
record carries writer, seq, prev, kid and mac, and signed checkpoints mark how far the
chain went, so `jitgate audit verify` can tell edits, deletions, insertions and truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

log = logging.getLogger("jitgate.audit")

CHECKPOINT = "audit.checkpoint"

Record = dict[str, Any]

# Record ids: a random per-process prefix and a counter; unique without a syscall each.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def record(event: str, **fields: Any) -> Record:
    """Build an audit record with id, time and event; None fields are left out."""
    now = time.time()
    out: Record = {
        "id": new_id(),
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "ts": round(now, 3),
        "event": event,
    }
    out.update((k, v) for k, v in fields.items() if v is not None)
    return out


class Sink(Protocol):
    name: str

    async def write(self, lines: list[str]) -> None:
        """Write serialised records (JSON without newline), in order, or raise."""

    async def close(self) -> None: ...


class RedisStreamSink:
    """Append records to a Redis stream, trimmed to about maxlen entries."""

    def __init__(self, redis: Redis, key: str, maxlen: int) -> None:
        self.name = "redis"
        self.redis = redis
        self.key = key
        self.maxlen = maxlen

    async def write(self, lines: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(self.key, {"record": line}, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        return None


class JsonlFileSink:
    """Append records as JSON lines to a file, writing from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.name = "file"
        self.path = path

    def _append(self, lines: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()

    async def write(self, lines: list[str]) -> None:
        await asyncio.to_thread(self._append, "\n".join(lines) + "\n")

    async def close(self) -> None:
        return None


class StdoutSink:
    """Print records as JSON lines on standard output."""

    def __init__(self) -> None:
        self.name = "stdout"

    async def write(self, lines: list[str]) -> None:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    async def close(self) -> None:
        return None


class _Lane:
    """One sink with its own queue, so a slow or failing sink holds up nobody else."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.queue: deque[str] = deque()
        self.failures = 0
        self.retry_at = 0.0


class AuditLog:
    """Fan records out to sinks in batches, off the request path."""

    def __init__(
        self,
        sinks: Iterable[Sink],
        *,
        batch_size: int = 256,
        flush_interval: float = 0.25,
        queue_max: int = 100_000,
        on_written: Callable[[str, int], None] | None = None,
        on_failed: Callable[[str, int], None] | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
        hmac_key: bytes | None = None,
        key_id: str = "k1",
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
    ) -> None:
        self.lanes = [_Lane(s) for s in sinks]
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_max = queue_max
        self._on_written = on_written or (lambda sink, n: None)
        self._on_failed = on_failed or (lambda sink, n: None)
        self._on_dropped = on_dropped or (lambda sink, n: None)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._flushing = asyncio.Lock()  # one writer per lane: a batch is popped only once
        self._key = hmac_key
        self.key_id = key_id
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        # Random per start: two processes (or two logs in one) never share a chain.
        self.writer = secrets.token_hex(6)
        self._seq = 0
        self._prev = ""
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._final = False

    def emit(self, rec: Record) -> None:
        """Queue one record for every sink; never blocks."""
        if self._key is None:
            line = json.dumps(rec, separators=(",", ":"))
        else:
            line = self._chain(rec, self._key)
        for lane in self.lanes:
            if len(lane.queue) >= self.queue_max:
                self._on_dropped(lane.sink.name, 1)
                log.error(
                    "audit queue for sink %s is full (%d records): record %s event %s lost",
                    lane.sink.name, self.queue_max, rec.get("id"), rec.get("event"),
                )  # fmt: skip
                continue
            lane.queue.append(line)
            if len(lane.queue) >= self.batch_size:
                self._wake.set()
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()

    def _chain(self, rec: Record, key: bytes) -> str:
        self._seq += 1
        rec = {**rec, "writer": self.writer, "seq": self._seq, "prev": self._prev}
        rec["kid"] = self.key_id
        rec.pop("mac", None)
        body = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        self._prev = mac
        if rec.get("event") == CHECKPOINT:
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
        else:
            self._since_checkpoint += 1
        # The canonical body with mac appended: the same bytes verify re-creates, one dumps.
        return f'{body[:-1]},"mac":"{mac}"}}'

    def checkpoint(self, *, final: bool = False) -> None:
        """Emit a signed checkpoint: how far this writer's chain went (final at shutdown)."""
        if self._key is None:
            return
        self.emit(record(CHECKPOINT, checkpoint_seq=self._seq + 1, head=self._prev, final=final))

    def backlog(self) -> int:
        return sum(len(lane.queue) for lane in self.lanes)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-flush")

    async def close(self, grace: float = 10.0) -> None:
        """Stop the flusher and write out everything still queued, within grace seconds."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._seq and not self._final:
            self._final = True
            self.checkpoint(final=True)  # a clean end: verify sees nothing was cut off
        deadline = time.monotonic() + grace
        while self.backlog() and time.monotonic() < deadline:
            if not await self.flush(force=True):
                await asyncio.sleep(0.1)
        for lane in self.lanes:
            if lane.queue:
                self._on_dropped(lane.sink.name, len(lane.queue))
                log.error(
                    "audit sink %s still failing at shutdown: %d records not written",
                    lane.sink.name, len(lane.queue),
                )  # fmt: skip
            await lane.sink.close()

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            if (
                self._since_checkpoint
                and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval
            ):
                self.checkpoint()
            await self.flush()

    async def flush(self, *, force: bool = False) -> bool:
        """Write every queued batch now; return True if all sinks took their records."""
        async with self._flushing:
            return await self._flush(force)

    async def _flush(self, force: bool) -> bool:
        ok = True
        for lane in self.lanes:
            while lane.queue:
                if not force and time.monotonic() < lane.retry_at:
                    ok = False
                    break
                batch = [lane.queue[i] for i in range(min(self.batch_size, len(lane.queue)))]
                try:
                    await lane.sink.write(batch)
                except Exception as exc:  # any sink error: keep the batch and retry later
                    ok = False
                    lane.failures += 1
                    lane.retry_at = time.monotonic() + min(5.0, 0.1 * 2 ** min(lane.failures, 6))
                    self._on_failed(lane.sink.name, len(batch))
                    log.warning(
                        "audit sink %s failed (%s); %d records kept for retry",
                        lane.sink.name, exc, len(lane.queue),
                    )  # fmt: skip
                    break
                for _ in batch:
                    lane.queue.popleft()
                lane.failures = 0
                self._on_written(lane.sink.name, len(batch))
        return ok
