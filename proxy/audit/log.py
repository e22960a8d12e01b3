"""Audit records: one per decision and per grant change, written in batches to every sink.

`AuditLog.emit` never blocks the request: it serialises the record once, appends it to
the spool (spool.py: a write-ahead file that survives a crash) and to each sink's
queue. A background task fsyncs the spool and flushes batches; a sink that fails keeps
its batch and is retried with backoff, and beyond `queue_max` reads the spool instead of
memory. A record that can be neither delivered nor spooled is counted, logged and told
in an `audit.gap` record: never lost silently.

With an HMAC key each AuditLog is one writer of a hash chain (see chain.py): every
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
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import replay
from .sinks import position
from .spool import Spool

log = logging.getLogger("jitgate.audit")

CHECKPOINT = "audit.checkpoint"
RECOVERED = "writer.recovered"

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

    async def maintain(self) -> object:
        """Trim, rotate or expire old records as the sink's retention says."""

    async def close(self) -> None: ...


class _Lane:
    """One sink with its own queue and cursor, so a slow or failing sink holds up nobody else.

    Records reach a sink from, in order: spools adopted from earlier runs, then this run's
    records in memory (each with its spool line number, -1 if the spool refused it), then,
    once memory held `queue_max`, this run's spool from the cursor on.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name
        self.queue: deque[tuple[int, str]] = deque()
        self.on_disk = False  # newer records are only in the spool
        self.cursor = 0  # own spool: line number of the first record not yet taken
        self.adopted: list[Spool] = []
        self.past: list[Spool] = []  # adopted spools replayed past what the sink held
        self.inflight: list[str] | None = None  # a batch read from a spool, kept for retry
        self.failures = 0
        self.retry_at = 0.0
        self.lost = 0  # records this sink will never get, not yet told in an audit.gap
        self.lost_since: float | None = None


class AuditLog:
    """Fan records out to sinks in batches, off the request path, through a spool."""

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
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1 << 30,
        maintain_interval: float = 60.0,
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
        self._flushing = asyncio.Lock()  # one writer per lane: a batch is taken only once
        self._key = hmac_key
        self.key_id = key_id
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.maintain_interval = maintain_interval
        self._last_maintain = time.monotonic()
        # Random per start: two processes (or two logs in one) never share a chain.
        self.writer = secrets.token_hex(6)
        self._seq = 0
        self._prev = ""
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._final = False
        self.spool_dir = spool_dir
        self.spool_max_bytes = spool_max_bytes
        self.spool: Spool | None = None
        self.spool_error: str | None = None  # why the last append failed; None when fine

    def emit(self, rec: Record) -> None:
        """Spool one record and queue it for every sink; never blocks."""
        if self._key is None:
            line = json.dumps(rec, separators=(",", ":"))
        else:
            line = self._chain(rec, self._key)
        lineno = self._spool(line, rec)
        for lane in self.lanes:
            if lane.on_disk and lineno >= 0:
                continue  # the lane reads this from the spool when it gets there
            if lane.on_disk or len(lane.queue) >= self.queue_max:
                if lineno >= 0:
                    lane.on_disk = True
                    continue
                self._lose(lane, rec)
                continue
            lane.queue.append((lineno, line))
            if len(lane.queue) >= self.batch_size:
                self._wake.set()
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()

    def _spool(self, line: str, rec: Record) -> int:
        if self.spool is None:
            return -1
        try:
            lineno = self.spool.append(line)
        except OSError as exc:
            if self.spool_error is None:
                log.error(
                    "audit spool %s cannot be written (%s): records are held in memory only",
                    self.spool.dir, exc,
                )  # fmt: skip
            self.spool_error = str(exc)
            return -1
        if self.spool_error is not None:
            log.warning("audit spool %s writable again", self.spool.dir)
            self.spool_error = None
        return lineno

    def _lose(self, lane: _Lane, rec: Record) -> None:
        self._on_dropped(lane.name, 1)
        if lane.lost == 0:
            lane.lost_since = time.time()
        lane.lost += 1
        log.error(
            "audit sink %s: record %s (%s) lost: its queue is full and the spool refused it",
            lane.name, rec.get("id"), rec.get("event"),
        )  # fmt: skip

    def writable(self) -> bool:
        """Return whether records can be kept now (what strict mode asks before forwarding)."""
        if self.spool_dir is not None:
            return self.spool is not None and self.spool_error is None
        return all(lane.failures == 0 and lane.lost == 0 for lane in self.lanes)

    def why_unwritable(self) -> str:
        """Say why writable() is False, for refusals and readiness."""
        if self.spool_dir is not None:
            return f"spool: {self.spool_error or 'not open'}"
        failing = [lane.name for lane in self.lanes if lane.failures or lane.lost]
        return f"sink {', '.join(failing) or 'none'} failing and no spool"

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

    def stats(self) -> dict[str, tuple[int, int]]:
        """Return, per sink, (records not yet delivered, of those held only in a spool)."""
        out = {}
        for lane in self.lanes:
            spooled = sum(s.pending(lane.name) for s in lane.adopted)
            if lane.on_disk and self.spool is not None:
                own = self.spool.total - lane.cursor
                spooled += own - len(lane.queue)
            out[lane.name] = (len(lane.queue) + spooled, spooled)
        return out

    def backlog(self) -> int:
        return sum(total for total, _ in self.stats().values())

    async def start(self) -> None:
        """Open the spool, adopt what earlier runs left, and start flushing."""
        if self.spool_dir is not None:
            names = [lane.name for lane in self.lanes]
            # Own spool first: the records told about adopted ones are spooled like any other.
            try:
                self.spool = Spool.create(
                    self.spool_dir, self.writer, names, max_bytes=self.spool_max_bytes
                )
            except OSError as exc:
                self.spool_error = str(exc)
                log.error("audit spool cannot be created in %s: %s", self.spool_dir, exc)
            for directory in Spool.leftovers(self.spool_dir, self.writer):
                self._adopt(directory, names)
        self._task = asyncio.create_task(self._run(), name="audit-flush")

    def _adopt(self, directory: Path, names: list[str]) -> None:
        try:
            old = Spool.adopt(directory, names, max_bytes=self.spool_max_bytes)
        except OSError as exc:
            log.error("audit spool %s left by an earlier run cannot be read: %s", directory, exc)
            return
        if old is None:
            return  # another live process owns it
        waiting = {lane.name: old.pending(lane.name) for lane in self.lanes}
        log.warning(
            "audit spool %s left by writer %s: replaying %s",
            directory, old.writer, ", ".join(f"{n} to {k}" for k, n in waiting.items()) or "none",
        )  # fmt: skip
        for lane in self.lanes:
            if old.pending(lane.name):
                lane.adopted.append(old)
        self._recovered(old)
        if old.torn:
            self.emit(
                record(
                    "audit.gap",
                    writer=old.writer,
                    lost=old.torn,
                    reasons=["the last record of a writer that crashed was cut short"],
                )
            )
        if old.done():
            old.close()

    def _recovered(self, old: Spool) -> None:
        """Tell, in this writer's chain, where a crashed writer's chain ends."""
        last = replay.last_record(old.dir)
        found = position(last) if last is not None else None
        if found is None:
            return  # nothing chained in it
        (writer, seq), _ = found
        try:
            closed = json.loads(last or "").get("final") is True
        except (ValueError, AttributeError):
            closed = False
        if closed:
            return  # it shut down cleanly, with a sink down: only its delivery was left
        self.emit(
            record(
                RECOVERED,
                recovered_writer=writer,
                last_seq=seq,
                torn=old.torn or None,
                reasons=[f"writer {writer} stopped without closing its chain; its spool "
                         f"was adopted and replayed, its last record is seq {seq}"],
            )
        )  # fmt: skip

    async def close(self, grace: float = 10.0) -> None:
        """Stop flushing and deliver everything, within grace seconds; keep the rest spooled."""
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
        for name, (left, _) in self.stats().items():
            if not left:
                continue
            if self.spool is not None and self.spool_error is None:
                log.warning(
                    "audit sink %s still failing at shutdown: %d records stay in the spool "
                    "for the next start", name, left,
                )  # fmt: skip
            else:
                self._on_dropped(name, left)
                log.error(
                    "audit sink %s still failing at shutdown: %d records not written", name, left
                )
        for spool in {id(s): s for lane in self.lanes for s in lane.adopted}.values():
            spool.close()
        if self.spool is not None:
            self.spool.close()
        for lane in self.lanes:
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
            if self.spool is not None:
                try:
                    await asyncio.to_thread(self.spool.sync)
                except OSError as exc:
                    self.spool_error = f"fsync: {exc}"
                    log.error("audit spool %s cannot be synced: %s", self.spool.dir, exc)
            await self.flush()
            self._report_gaps()
            if time.monotonic() - self._last_maintain >= self.maintain_interval:
                self._last_maintain = time.monotonic()
                await self.maintain()

    async def maintain(self) -> None:
        """Let each sink trim, rotate and apply its retention."""
        for lane in self.lanes:
            try:
                await lane.sink.maintain()
            except Exception as exc:  # a sink's housekeeping never stops the others
                log.warning("audit sink %s maintenance failed: %s", lane.name, exc)

    def _report_gaps(self) -> None:
        for lane in self.lanes:
            if lane.lost and lane.failures == 0:
                lost, since = lane.lost, lane.lost_since
                lane.lost, lane.lost_since = 0, None
                self.emit(
                    record(
                        "audit.gap",
                        sink=lane.name,
                        lost=lost,
                        since=since,
                        until=round(time.time(), 3),
                        reasons=["records could be neither delivered nor spooled"],
                    )
                )

    async def flush(self, *, force: bool = False) -> bool:
        """Deliver every queued and spooled batch now; return True if all sinks took theirs."""
        async with self._flushing:
            results = [await self._flush_lane(lane, force) for lane in self.lanes]
            return all(results)

    async def _flush_lane(self, lane: _Lane, force: bool) -> bool:
        saves: list[Callable[[], None]] = []
        try:
            return await self._deliver(lane, force, saves)
        finally:
            if saves:
                # Cursor files and spent segments, off the event loop: a disk that is slow
                # to rename must not hold up requests.
                try:
                    await asyncio.to_thread(_run_all, saves)
                except OSError as exc:  # the records went out; at worst they are sent again
                    log.warning("audit spool cursor for %s not saved: %s", lane.name, exc)

    async def _deliver(self, lane: _Lane, force: bool, saves: list[Callable[[], None]]) -> bool:
        while True:
            if not force and time.monotonic() < lane.retry_at:
                return False
            source, batch = self._next_batch(lane)
            if not batch:
                return True
            fresh = batch
            try:
                if source is not None and source is not self.spool and source not in lane.past:
                    # A crashed writer's spool: what the sink took before the crash, once.
                    fresh = await replay.unheld(lane.sink, batch)
                if fresh:
                    await lane.sink.write(fresh)
            except Exception as exc:  # any sink error: keep the batch and retry later
                lane.failures += 1
                lane.retry_at = time.monotonic() + min(5.0, 0.1 * 2 ** min(lane.failures, 6))
                self._on_failed(lane.name, len(batch))
                log.warning(
                    "audit sink %s failed (%s); %d records kept for retry",
                    lane.name, exc, self.stats()[lane.name][0],
                )  # fmt: skip
                return False
            lane.failures = 0
            lane.inflight = None
            if (
                fresh
                and source is not None
                and source is not self.spool
                and source not in lane.past
            ):
                # The sink took records in order: once one was new, so are all after it.
                lane.past.append(source)
            self._on_written(lane.name, len(fresh))
            save = self._advance(lane, source, len(batch))
            if save is not None:
                saves.append(save)

    def _next_batch(self, lane: _Lane) -> tuple[Spool | None, list[str]]:
        """Return where the next batch comes from (a spool, or None for memory) and it."""
        while lane.adopted:
            old = lane.adopted[0]
            if lane.inflight is None:
                lane.inflight = old.read(lane.name, old.cursors[lane.name], self.batch_size)
            if lane.inflight:
                return old, lane.inflight
            lane.inflight = None
            lane.adopted.pop(0)
            if old in lane.past:
                lane.past.remove(old)
            if old.done() or not any(old in other.adopted for other in self.lanes):
                old.close()
        if lane.queue:
            return None, [lane.queue[i][1] for i in range(min(self.batch_size, len(lane.queue)))]
        if lane.on_disk and self.spool is not None:
            if lane.inflight is None:
                lane.inflight = self.spool.read(lane.name, lane.cursor, self.batch_size)
            if lane.inflight:
                return self.spool, lane.inflight
            lane.inflight = None
            lane.on_disk = False  # caught up: new records go through memory again
        return None, []

    def _advance(self, lane: _Lane, source: Spool | None, count: int) -> Callable[[], None] | None:
        """Move the lane past `count` delivered records; return the spool's disk work."""
        if source is None:
            last = -1
            for _ in range(count):
                lineno, _line = lane.queue.popleft()
                last = max(last, lineno)
            if last < 0 or self.spool is None:
                return None
            lane.cursor = last + 1
            source = self.spool
        elif source is self.spool:
            lane.cursor += count
        else:
            return source.advance(lane.name, source.cursors[lane.name] + count)
        return source.advance(lane.name, lane.cursor)


def _run_all(work: list[Callable[[], None]]) -> None:
    for step in work:
        step()
