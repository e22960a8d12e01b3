"""The audit spool: records survive failing sinks, full queues, shutdowns and crashes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from waiting import eventually

from proxy.audit import AuditLog, record
from proxy.audit.spool import Spool, SpoolFull


class ListSink:
    """An in-process sink that can be switched off: the spool logic, not a wire, is tested."""

    def __init__(self, name: str = "list") -> None:
        self.name = name
        self.lines: list[str] = []
        self.down = False
        self.calls = 0

    async def write(self, lines: list[str]) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError(f"{self.name} is down")
        self.lines.extend(lines)

    async def maintain(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def ids(self) -> list[str]:
        return [json.loads(line)["id"] for line in self.lines]

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self.lines]


def make_log(sinks: list[ListSink], spool: Path | None, **kw: object) -> AuditLog:
    kw.setdefault("flush_interval", 0.02)
    return AuditLog(sinks, spool_dir=spool, **kw)  # type: ignore[arg-type]


async def until(check: Callable[[], object], within: float = 15.0) -> None:
    await eventually(check, within=within)


def entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def emit_many(log: AuditLog, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        rec = record("access.allow", n=i)
        ids.append(rec["id"])
        log.emit(rec)
    return ids


# -- Spool on its own ------------------------------------------------------------------


def test_spool_append_read_commit_and_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.audit.spool.SEGMENT_BYTES", 100)
    spool = Spool.create(tmp_path, "w1", ["a", "b"], max_bytes=1 << 20)
    lines = [json.dumps({"n": i, "pad": "x" * 20}) for i in range(20)]
    for i, line in enumerate(lines):
        assert spool.append(line) == i
    assert len(spool.segments) > 3
    assert spool.read("a", 0, 5) == lines[:5]
    assert spool.read("a", 5, 100) == lines[5:]  # across segments, continuing the reader
    assert spool.read("b", 7, 3) == lines[7:10]  # any start
    spool.advance("a", 20)()
    assert spool.pending("a") == 0 and spool.pending("b") == 20
    files = sorted(p.name for p in spool.dir.glob("*.wal"))
    spool.advance("b", 12)()
    # Segments both sinks are past are gone; the rest stays readable.
    assert len(sorted(spool.dir.glob("*.wal"))) < len(files)
    assert spool.read("b", 12, 100) == lines[12:]
    spool.advance("b", 20)()
    assert spool.done()
    spool.close()
    assert not spool.dir.exists()  # everything delivered: nothing left behind


def test_spool_full_raises(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, "w1", ["a"], max_bytes=50)
    spool.append("x" * 30)
    with pytest.raises(SpoolFull):
        spool.append("y" * 30)
    assert spool.total == 1
    spool.close()


def test_a_live_spool_is_not_adopted_a_left_one_is(tmp_path: Path) -> None:
    live = Spool.create(tmp_path, "live", ["a"], max_bytes=1 << 20)
    live.append('{"n":1}')
    assert Spool.adopt(live.dir, ["a"], max_bytes=1 << 20) is None  # locked by its owner
    left = Spool.create(tmp_path, "left", ["a", "b"], max_bytes=1 << 20)
    for i in range(5):
        left.append(json.dumps({"n": i}))
    left.advance("a", 3)()
    left.close()  # not done: stays on disk
    assert left.dir.exists()
    assert Spool.leftovers(tmp_path, "live") == [left.dir]
    old = Spool.adopt(left.dir, ["a", "b", "c"], max_bytes=1 << 20)
    assert old is not None
    # Each sink continues from its own cursor; a sink new since then gets everything.
    assert old.read("a", old.cursors["a"], 10) == ['{"n": 3}', '{"n": 4}']
    assert old.cursors == {"a": 3, "b": 0, "c": 0}
    old.close()
    live.close()


def test_a_torn_last_record_is_counted_not_replayed(tmp_path: Path) -> None:
    left = Spool.create(tmp_path, "w", ["a"], max_bytes=1 << 20)
    left.append('{"n":1}')
    left.close()
    seg = next(left.dir.glob("*.wal"))
    with seg.open("ab") as fh:
        fh.write(b'{"n":2,"cut')  # a crash in the middle of a write
    old = Spool.adopt(left.dir, ["a"], max_bytes=1 << 20)
    assert old is not None and old.torn == 1 and old.total == 1
    assert old.read("a", 0, 10) == ['{"n":1}']
    old.close()


# -- AuditLog with its spool -----------------------------------------------------------


async def test_failing_sink_gets_everything_in_order_when_it_returns(tmp_path: Path) -> None:
    good, bad = ListSink("good"), ListSink("bad")
    bad.down = True
    log = make_log([good, bad], tmp_path, batch_size=16, queue_max=50)
    await log.start()
    ids = emit_many(log, 300)  # far more than queue_max: most wait only in the spool
    await until(lambda: len(good.lines) == 300)
    assert good.ids() == ids
    assert log.stats()["bad"][0] == 300 and log.stats()["bad"][1] >= 250
    assert log.writable()  # the spool keeps them: strict mode need not refuse
    bad.down = False
    more = emit_many(log, 20, 300)
    # Both: the bad lane may read the 20 from the spool in a flush that took good's earlier.
    await until(lambda: len(bad.lines) == 320 and len(good.lines) == 320, within=10)
    assert bad.ids() == ids + more
    assert log.stats() == {"good": (0, 0), "bad": (0, 0)}
    await log.close()
    assert not entries(tmp_path)  # all delivered: the spool is gone


async def test_shutdown_with_a_sink_down_keeps_the_rest_for_the_next_start(tmp_path: Path) -> None:
    sink = ListSink("s")
    sink.down = True
    first = make_log([sink], tmp_path, batch_size=8)
    await first.start()
    ids = emit_many(first, 40)
    await first.close(grace=0.3)
    assert sink.lines == [] and len(entries(tmp_path)) == 1

    sink.down = False
    second = make_log([sink], tmp_path, batch_size=8)
    await second.start()
    later = emit_many(second, 5, 40)
    await until(lambda: len(sink.lines) == 45)
    assert sink.ids() == ids + later  # the earlier run's records first, in order
    await second.close()
    assert not entries(tmp_path)


async def test_records_survive_the_process_dying_without_close(tmp_path: Path) -> None:
    sink = ListSink("s")
    sink.down = True
    dead = make_log([sink], tmp_path)
    await dead.start()
    ids = emit_many(dead, 25)
    # A crash: the flusher stops, nothing is closed or flushed; only the lock goes with
    # the process, which closing its file stands in for here.
    assert dead._task is not None
    dead._task.cancel()
    assert dead.spool is not None and dead.spool._lock is not None
    dead.spool._lock.close()
    dead.spool._lock = None

    sink.down = False
    heir = make_log([sink], tmp_path)
    await heir.start()
    await until(lambda: len(sink.lines) == 25)
    assert sink.ids() == ids
    await heir.close()


async def test_without_a_spool_a_full_queue_loses_records_and_says_so(tmp_path: Path) -> None:
    dropped: dict[str, int] = {}
    sink = ListSink("s")
    sink.down = True
    log = make_log(
        [sink],
        None,
        queue_max=10,
        on_dropped=lambda name, n: dropped.__setitem__(name, dropped.get(name, 0) + n),
    )
    await log.start()
    emit_many(log, 15)
    assert dropped == {"s": 5}
    assert not log.writable()  # strict mode refuses protected requests now
    sink.down = False
    await until(lambda: "audit.gap" in sink.events())
    gap = json.loads(sink.lines[sink.events().index("audit.gap")])
    assert gap["sink"] == "s" and gap["lost"] == 5 and gap["until"] >= gap["since"]
    assert log.writable()
    await log.close()


async def test_a_spool_that_cannot_be_written_makes_audit_unwritable(tmp_path: Path) -> None:
    sink = ListSink("s")
    log = make_log([sink], tmp_path, spool_max_bytes=2000)
    await log.start()
    assert log.writable()
    emit_many(log, 30)  # about 100 bytes each: the spool fills up
    assert not log.writable() and log.spool_error and "full" in log.spool_error
    await until(lambda: len(sink.lines) == 30)  # memory still delivers them
    await log.close()


async def test_unwritable_spool_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = make_log([ListSink()], blocker / "spool")
    await log.start()
    assert not log.writable() and log.spool is None
    await log.close()


async def test_a_crash_with_records_beyond_memory_replays_them_all_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.audit.spool.SEGMENT_BYTES", 2000)  # many segments
    sink = ListSink("s")
    sink.down = True
    dead = make_log([sink], tmp_path, queue_max=20, batch_size=7)
    await dead.start()
    ids = emit_many(dead, 150)
    await dead.flush(force=True)  # fails: the sink is down
    assert dead.stats()["s"] == (150, 130)
    assert dead._task is not None and dead.spool is not None and dead.spool._lock is not None
    dead._task.cancel()
    dead.spool._lock.close()  # the process dies: its lock goes with it
    dead.spool._lock = None

    sink.down = False
    heir = make_log([sink], tmp_path, queue_max=20, batch_size=7)
    await heir.start()
    later = emit_many(heir, 10, 150)
    await until(lambda: len(sink.lines) == 160)
    assert sink.ids() == ids + later
    await heir.close()
    assert not entries(tmp_path)
