"""The audit spool: a write-ahead file of one writer's records, so that none is lost.

Every record an AuditLog emits is appended here before any sink sees it. The append is a
write to the kernel, so it survives the process being killed; the flusher fsyncs in
batches, so it survives a power cut too, up to the last batch. Each sink has a cursor: how
many of the spooled records it has taken, kept in a small file next to the segments. A
segment is deleted once every sink is past it, and the whole directory when everything has
been delivered at a clean shutdown.

A directory whose lock nobody holds was left by a writer that crashed, or that stopped
while a sink was down. The next start adopts it and replays it to each sink from that
sink's cursor, before its own records. Delivery is at least once: a crash between a sink
taking a batch and its cursor being written sends that batch again (records keep their ids).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SEGMENT_BYTES = 16 << 20
_SEGMENT = re.compile(r"(\d{16})\.wal")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SpoolFull(OSError):
    """The spool reached its size limit."""


@dataclass
class _Segment:
    first: int  # line number of its first record
    path: Path
    size: int
    lines: int


class Spool:
    """One writer's spool directory: segments of JSON lines, one cursor per sink."""

    def __init__(self, directory: Path, sinks: Iterable[str], *, max_bytes: int) -> None:
        self.dir = directory
        self.writer = directory.name
        self.max_bytes = max_bytes
        self.segments: list[_Segment] = []
        self.total = 0  # records ever appended (line numbers 0 .. total-1)
        self.cursors = {name: 0 for name in sinks}
        self.torn = 0  # a crashed writer's last record, cut short: reported, not replayed
        self._lock: IO[bytes] | None = None
        self._fd: int | None = None
        self._dirty = False
        self._readers: dict[str, tuple[int, IO[bytes]]] = {}

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, writer: str, sinks: Iterable[str], *, max_bytes: int) -> Spool:
        """Create and lock this process's own spool directory.

        It is made under a hidden name and renamed once locked: a process starting at the
        same moment (another worker) must not take it, unlocked, for a crashed writer's.
        """
        staging = root / f".{writer}.new"
        staging.mkdir(parents=True, exist_ok=False)
        spool = cls(staging, sinks, max_bytes=max_bytes)
        if not spool._take_lock():  # pragma: no cover - a fresh random name
            raise OSError(f"spool {staging} is locked by another process")
        staging.rename(root / writer)
        spool.dir, spool.writer = root / writer, writer
        spool._new_segment()
        return spool

    @classmethod
    def adopt(cls, directory: Path, sinks: Iterable[str], *, max_bytes: int) -> Spool | None:
        """Lock and load a spool left behind by another writer; None while it is alive."""
        spool = cls(directory, sinks, max_bytes=max_bytes)
        if not spool._take_lock():
            return None
        for path in sorted(directory.iterdir()):
            m = _SEGMENT.fullmatch(path.name)
            if m is None:
                continue
            data = path.read_bytes()
            lines = data.count(b"\n")
            if data and not data.endswith(b"\n"):
                spool.torn += 1  # a write cut short by the crash: only the last segment
            spool.segments.append(_Segment(int(m[1]), path, len(data), lines))
        if spool.segments:
            last = spool.segments[-1]
            spool.total = last.first + last.lines
        for name in spool.cursors:
            try:
                spool.cursors[name] = min(spool.total, int((directory / _cursor(name)).read_text()))
            except (OSError, ValueError):
                # No cursor: this sink took nothing yet from here (or is new): replay all
                # that is still on disk.
                spool.cursors[name] = spool.segments[0].first if spool.segments else 0
        return spool

    @staticmethod
    def leftovers(root: Path, own: str) -> list[Path]:
        """Return other writers' spool directories under root, oldest first."""
        if not root.is_dir():
            return []
        # A hidden name is a spool being created (Spool.create), never a leftover.
        dirs = [d for d in root.iterdir() if d.is_dir() and d.name != own and d.name[0] != "."]
        return sorted(dirs, key=lambda d: d.stat().st_mtime)

    def _take_lock(self) -> bool:
        fh = (self.dir / "lock").open("ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._lock = fh
        return True

    # -- writing -------------------------------------------------------------------------

    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def append(self, line: str) -> int:
        """Append one record and return its line number; raise OSError (SpoolFull) if not."""
        data = (line + "\n").encode()
        if self.bytes() + len(data) > self.max_bytes:
            raise SpoolFull(f"audit spool {self.dir} is full ({self.max_bytes} bytes)")
        seg = self.segments[-1]
        if seg.size >= SEGMENT_BYTES:
            self._new_segment()
            seg = self.segments[-1]
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        seg.size += len(data)
        seg.lines += 1
        self.total += 1
        self._dirty = True
        return self.total - 1

    def _new_segment(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
        path = self.dir / f"{self.total:016d}.wal"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.segments.append(_Segment(self.total, path, 0, 0))

    def sync(self) -> None:
        """Make every appended record durable (called from a worker thread)."""
        if self._dirty and self._fd is not None:
            self._dirty = False
            os.fsync(self._fd)

    # -- reading and delivery ------------------------------------------------------------

    def pending(self, sink: str) -> int:
        return self.total - self.cursors.get(sink, self.total)

    def read(self, sink: str, start: int, count: int) -> list[str]:
        """Return up to count records from line number start on, in order."""
        out: list[str] = []
        at, fh = self._readers.pop(sink, (-1, None))
        if fh is not None and at != start:
            fh.close()
            fh = None
        while len(out) < count and start < self.total:
            if fh is None:
                seg = next((s for s in reversed(self.segments) if s.first <= start), None)
                if seg is None:
                    break
                fh = seg.path.open("rb")
                for _ in range(start - seg.first):
                    fh.readline()
            raw = fh.readline()
            if not raw.endswith(b"\n"):  # end of this segment (or a torn last record)
                fh.close()
                fh = None
                if not any(s.first == start for s in self.segments):
                    break  # no segment starts here: nothing more is readable
                continue
            out.append(raw[:-1].decode())
            start += 1
        if fh is not None:
            self._readers[sink] = (start, fh)
        return out

    def advance(self, sink: str, cursor: int) -> Callable[[], None]:
        """Record in memory that a sink has taken every record before line number cursor;
        return the disk work that follows (its cursor file, and deleting the segments every
        sink is past), for a worker thread: until it runs, a crash replays a little more."""
        self.cursors[sink] = cursor
        floor = min(self.cursors.values(), default=self.total)
        # Whole segments every sink is past go; the newest stays open for appends.
        gone: list[Path] = []
        while len(self.segments) > 1 and self.segments[1].first <= floor:
            gone.append(self.segments.pop(0).path)
        name, text = _cursor(sink), str(cursor)

        def save() -> None:
            tmp = self.dir / (name + ".tmp")
            with contextlib.suppress(FileNotFoundError):  # the spool was done and removed
                tmp.write_text(text)
                os.replace(tmp, self.dir / name)
            for path in gone:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        return save

    def done(self) -> bool:
        return all(self.pending(name) == 0 for name in self.cursors)

    def close(self) -> None:
        """Release the spool: removed when every sink has everything, else left for replay."""
        for _, fh in self._readers.values():
            fh.close()
        self._readers.clear()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self.done():
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _cursor(sink: str) -> str:
    return "cursor." + _SAFE.sub("_", sink)
