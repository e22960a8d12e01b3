"""Replaying a crashed writer's spool without writing a record twice.

A spool's cursor file is saved after a sink took a batch, so a crash in between leaves the
cursor behind what the sink holds: the next start would send those records again. Before a
replayed batch goes out, each sink that can be read back is asked which of its records it
already holds, by chain position (writer and seq) and mac; those are skipped.

- the JSON-lines file: its tail (the live file, then the newest rotated one), up to
  `TAIL_BYTES`;
- the Redis stream: its newest entries, back to the batch's first seq, up to `STREAM_SCAN`;
- an HTTP collector cannot be asked: each request carries an `Idempotency-Key` naming the
  writer and the seq range, and records their writer and seq, by which the receiver dedupes.

Records without chain fields (no `audit.hmac_key`) cannot be told apart this way and are
replayed as they are: delivery stays at least once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .sinks import JsonlFileSink, Position, position
from .store import AuditStore

TAIL_BYTES = 8 << 20
STREAM_SCAN = 50_000
_PAGE = 1000


async def unheld(sink: object, lines: list[str]) -> list[str]:
    """Return the lines of a replayed batch that the sink does not hold yet, in order."""
    wanted: dict[Position, str] = {}
    for line in lines:
        found = position(line)
        if found is not None:
            wanted[found[0]] = found[1]
    if not wanted:
        return lines
    writers = {w for w, _ in wanted}
    low = min(seq for _, seq in wanted)
    if isinstance(sink, JsonlFileSink):
        held = _file_held(sink, writers)
    elif isinstance(sink, AuditStore):
        held = await _stream_held(sink, writers, low)
    else:
        return lines
    out = []
    for line in lines:
        found = position(line)
        if found is not None and held.get(found[0]) == found[1]:
            continue  # the same record, already there: never appended twice
        out.append(line)
    return out


def _held_in(data: bytes, writers: set[str], held: dict[Position, str]) -> None:
    marks = [f'"writer":"{w}"'.encode() for w in writers]
    for raw in data.split(b"\n"):
        if not any(m in raw for m in marks):
            continue
        found = position(raw.decode("utf-8", "replace"))
        if found is not None and found[0][0] in writers:
            held.setdefault(found[0], found[1])


def _file_held(sink: JsonlFileSink, writers: set[str]) -> dict[Position, str]:
    held: dict[Position, str] = {}
    budget = TAIL_BYTES
    for path in reversed(sink.files()[-2:]):
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - budget)
                fh.seek(start)
                data = fh.read()
        except OSError:
            continue
        if start:
            data = data.split(b"\n", 1)[-1]  # from the first whole line on
        _held_in(data, writers, held)
        budget -= len(data)
        if budget <= 0:
            break
    return held


async def _stream_held(store: AuditStore, writers: set[str], low: int) -> dict[Position, str]:
    held: dict[Position, str] = {}
    end, scanned = "+", 0
    while scanned < STREAM_SCAN:
        entries: list[Any] = (
            await store.redis.xrevrange(store.key, max=end, min="-", count=_PAGE) or []
        )
        if not entries:
            break
        data = b"\n".join(
            raw for _, fields in entries if isinstance(raw := (fields or {}).get(b"record"), bytes)
        )
        _held_in(data, writers, held)
        scanned += len(entries)
        if any(seq <= low for (_, seq) in held):
            break  # back before the batch: older entries cannot hold any of it
        last = entries[-1][0]
        end = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        if len(entries) < _PAGE:
            break
    return held


def last_record(directory: Path) -> str | None:
    """Return the last whole line of a spool directory's newest segment that has one."""
    for path in sorted(directory.glob("*.wal"), reverse=True):
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                chunk = 1 << 16
                while True:
                    start = max(0, size - chunk)
                    fh.seek(start)
                    data = fh.read(size - start)
                    lines = data.split(b"\n")
                    whole = lines[:-1]  # after the last newline: empty, or a torn record
                    if start:
                        whole = whole[1:]  # the first may be cut by the window
                    if whole:
                        return whole[-1].decode("utf-8", "replace")
                    if not start:
                        break
                    chunk *= 4
        except OSError:
            continue
    return None
