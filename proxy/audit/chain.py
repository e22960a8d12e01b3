"""Verify the audit trail's HMAC chains: `jitgate audit verify`.

Each AuditLog is a writer; its records carry `writer`, `seq` (1, 2, ...), `prev` (the mac
of the writer's previous record, "" for seq 1), `kid` and `mac`, the hex HMAC-SHA256 of the
record without `mac` as canonical JSON (sorted keys, no spaces). Records are checked per
writer in the order they appear; writers may interleave freely.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from .log import CHECKPOINT, RECOVERED

# How many of a writer's latest records are remembered to tell a duplicate: a replay after
# a crash repeats at most a few batches from the end of what a sink took. A writer that
# closed its chain forgets them (only a crashed writer's spool is replayed).
DUPLICATE_WINDOW = 10_000

CHAIN_FIELDS = {"writer": str, "seq": int, "prev": str, "kid": str, "mac": str}


def canonical(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def mac_of(key: bytes, rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "mac"}
    return hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()


@dataclass
class Problem:
    severity: str  # error | warning
    kind: str  # unparseable, unchained, unknown_key, modified, inserted, reordered, ...
    location: str
    message: str
    id: str | None = None
    writer: str | None = None
    seq: int | None = None

    def line(self) -> str:
        where = ", ".join(
            f"{k} {v}"
            for k, v in (("id", self.id), ("writer", self.writer), ("seq", self.seq))
            if v is not None
        )
        return f"{self.location}: {self.severity}: {self.message}" + (
            f" ({where})" if where else ""
        )


@dataclass
class Writer:
    writer: str
    first_seq: int
    last_seq: int
    last_mac: str
    last_ts: float | None
    last_location: str
    records: int = 0
    checkpoints: int = 0
    closed: bool = False  # the last record is the final checkpoint
    at_checkpoint: bool = False
    # A record whose mac is wrong but which fits the chain: a modified record (then the
    # next one continues from it) or a forged one (then the next one has the same seq).
    tentative: tuple[int, str] | None = None
    recovered_at: int | None = None  # crashed; another writer adopted it at this seq
    duplicates: int = 0
    # seq -> (mac, hash of the line, where it was) of the latest records, for duplicates
    seen: dict[int, tuple[str, int, str]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("last_mac", "last_ts", "last_location", "tentative", "at_checkpoint", "seen"):
            out.pop(key)
        return out

    def state(self) -> str:
        if self.closed:
            return "closed"
        if self.recovered_at is not None:
            return f"crashed, recovered at seq {self.recovered_at}"
        return "open"


@dataclass
class Verifier:
    key: bytes
    key_id: str
    checkpoint_interval: float
    strict: bool = False  # every writer must have shut down cleanly
    writers: dict[str, Writer] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0
    recovered: dict[str, tuple[int, str]] = field(default_factory=dict)  # writer: (seq, where)

    def _problem(self, kind: str, loc: str, message: str, rec: dict[str, Any] | None = None,
                 severity: str = "error") -> None:  # fmt: skip
        rec = rec or {}
        rid, writer, seq = rec.get("id"), rec.get("writer"), rec.get("seq")
        self.problems.append(
            Problem(
                severity, kind, loc, message,
                rid if isinstance(rid, str) else None,
                writer if isinstance(writer, str) else None,
                seq if isinstance(seq, int) else None,
            )
        )  # fmt: skip

    def feed(self, loc: str, text: str) -> None:
        self.lines += 1
        try:
            rec = json.loads(text)
        except ValueError:
            self._problem("unparseable", loc, "not a JSON record (corrupted or truncated)")
            return
        if not isinstance(rec, dict):
            self._problem("unparseable", loc, "not a JSON object")
            return
        if not all(
            isinstance(rec.get(k), t) and not isinstance(rec.get(k), bool)
            for k, t in CHAIN_FIELDS.items()
        ):
            self._problem(
                "unchained", loc, "unchained record: no valid chain fields (inserted)", rec
            )
            return
        if rec["kid"] != self.key_id:
            message = f"signed with key id {rec['kid']!r}, not the configured {self.key_id!r}"
            self._problem("unknown_key", loc, message, rec)
            return
        ok = hmac.compare_digest(mac_of(self.key, rec), rec["mac"])
        self._chain(loc, rec, ok, hash(text.strip()))

    def _chain(self, loc: str, rec: dict[str, Any], ok: bool, digest: int) -> None:
        seq: int = rec["seq"]
        st = self.writers.get(rec["writer"])
        if st is None:
            if not ok:
                self._problem("inserted", loc, "mac mismatch on a writer's first record "
                              "(forged or modified)", rec)  # fmt: skip
                return
            # The first seq seen may be > 1: the stream is trimmed, files are rotated.
            st = Writer(rec["writer"], seq, seq - 1, rec["prev"], None, loc)
            self.writers[st.writer] = st
            self._advance(st, loc, rec, digest)
            return
        if st.tentative is not None:
            t_seq, t_mac = st.tentative
            st.tentative = None
            if seq == t_seq + 1 and rec["prev"] == t_mac:
                st.last_seq, st.last_mac = t_seq, t_mac  # that record was modified in place
        expected = st.last_seq + 1
        if seq == expected:
            if not ok:
                if rec["prev"] == st.last_mac:
                    self._problem("modified", loc, "mac mismatch: record modified", rec)
                    st.tentative = (seq, rec["mac"])
                else:
                    self._problem("inserted", loc, "mac mismatch: forged record (inserted)", rec)
                return
            if rec["prev"] != st.last_mac:
                message = f"chain broken: prev is not the mac of seq {st.last_seq}"
                self._problem("chain_broken", loc, message, rec)
            self._advance(st, loc, rec, digest)
        elif seq > expected:
            if not ok:
                self._problem("inserted", loc, "mac mismatch: forged record (inserted)", rec)
                return
            gap = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
            message = f"deleted records {gap} (after {st.last_location})"
            self._problem("deleted", loc, message, rec)
            self._advance(st, loc, rec, digest)
        elif not ok:
            self._problem("inserted", loc, "mac mismatch: forged record (inserted)", rec)
        elif (first := st.seen.get(seq)) is not None and first[:2] == (rec["mac"], digest):
            # Delivered twice (at least once after a crash): the same bytes, not tampering.
            st.duplicates += 1
            message = f"duplicate of seq {seq} at {first[2]} (byte-identical)"
            self._problem("duplicate", loc, message, rec, severity="warning")
        else:
            message = f"inserted or reordered: seq {seq} after seq {st.last_seq}"
            self._problem("reordered", loc, message, rec)

    def _advance(self, st: Writer, loc: str, rec: dict[str, Any], digest: int) -> None:
        st.last_seq, st.last_mac, st.last_location = rec["seq"], rec["mac"], loc
        st.seen[rec["seq"]] = (rec["mac"], digest, loc)
        if len(st.seen) > 2 * DUPLICATE_WINDOW:
            floor = st.last_seq - DUPLICATE_WINDOW
            st.seen = {k: v for k, v in st.seen.items() if k > floor}
        if rec.get("event") == RECOVERED:
            crashed, at = rec.get("recovered_writer"), rec.get("last_seq")
            if isinstance(crashed, str) and type(at) is int:
                self.recovered[crashed] = (max(at, self.recovered.get(crashed, (at, ""))[0]), loc)
        ts = rec.get("ts")
        st.last_ts = float(ts) if isinstance(ts, int | float) else None
        st.records += 1
        st.at_checkpoint = rec.get("event") == CHECKPOINT
        st.checkpoints += st.at_checkpoint
        st.closed = st.at_checkpoint and rec.get("final") is True
        if st.closed:
            st.seen.clear()  # a long trail of many writers must not fill memory

    def finish(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for st in self.writers.values():
            if st.closed:
                continue
            if st.writer in self.recovered:
                at, where = self.recovered[st.writer]
                st.recovered_at = at
                if st.last_seq >= at:
                    continue  # crashed: its chain ends where the adopting writer said it does
                gap = f"{st.last_seq + 1}" if at == st.last_seq + 1 else f"{st.last_seq + 1}..{at}"
                message = (
                    f"ends after seq {st.last_seq}, but crashed at seq {at} ({where}): "
                    f"deleted records {gap}"
                )
                self.problems.append(
                    Problem("error", "deleted", st.last_location, message, None, st.writer,
                            st.last_seq)
                )  # fmt: skip
                continue
            message = (
                f"ends after seq {st.last_seq} without a closing checkpoint "
                "(truncated, or the writer crashed or is still running)"
            )
            # A running writer checkpoints within checkpoint_interval of any record, so an
            # older open tail means records after it are missing.
            stale = (
                not st.at_checkpoint
                and st.last_ts is not None
                and now - st.last_ts > 2 * self.checkpoint_interval
            )
            severity = "error" if self.strict or stale else "warning"
            self.problems.append(
                Problem(severity, "truncated", st.last_location, message, None, st.writer,
                        st.last_seq)
            )  # fmt: skip

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    def report(self, source: str) -> dict[str, Any]:
        return {
            "source": source,
            "clean": self.errors == 0,
            "records": self.lines,
            "errors": self.errors,
            "warnings": len(self.problems) - self.errors,
            "problems": [asdict(p) for p in self.problems],
            "writers": [st.summary() for st in self.writers.values()],
        }

    def text(self, source: str) -> list[str]:
        out = [p.line() for p in self.problems]
        for st in self.writers.values():
            dup = f", {st.duplicates} duplicates" if st.duplicates else ""
            out.append(
                f"writer {st.writer}: seq {st.first_seq}..{st.last_seq}, {st.records} records, "
                f"{st.checkpoints} checkpoints{dup}, {st.state()}"
            )
        verdict = "clean" if self.errors == 0 else f"{self.errors} errors"
        warnings = len(self.problems) - self.errors
        out.append(
            f"{source}: {self.lines} records from {len(self.writers)} writers: {verdict}"
            + (f", {warnings} warnings" if warnings else "")
        )
        return out


def file_lines(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (file:line, text) for each non-empty line; OSError if unreadable."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, text in enumerate(fh, 1):
            if text.strip():
                yield f"{path}:{n}", text


async def stream_entries(
    redis: Redis, key: str, page: int = 1000
) -> AsyncIterator[tuple[str, str]]:
    """Yield (key entry id, record) for every stream entry, oldest first, in pages."""
    start = "-"
    while True:
        entries = await redis.xrange(key, min=start, max="+", count=page) or []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            raw = (fields or {}).get(b"record")
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
            yield f"{key} entry {eid}", text
            start = "(" + eid
        if len(entries) < page:
            return
