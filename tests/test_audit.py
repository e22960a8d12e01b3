"""The audit log: batching, retry of failing sinks, counted losses, flush on close."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import RedisServer
from redis.asyncio import Redis
from waiting import eventually

from proxy.audit import AuditLog, record
from proxy.audit.sinks import JsonlFileSink
from proxy.audit.store import AuditStore


class Counters:
    def __init__(self) -> None:
        self.written: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def log(self, sinks: list, **kw: object) -> AuditLog:  # type: ignore[type-arg]
        def add(d: dict[str, int]) -> object:
            return lambda sink, n: d.__setitem__(sink, d.get(sink, 0) + n)

        return AuditLog(
            sinks,
            on_written=add(self.written),  # type: ignore[arg-type]
            on_failed=add(self.failed),  # type: ignore[arg-type]
            on_dropped=add(self.dropped),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )


def test_record_shape() -> None:
    a, b = record("access.allow", user="alice", scope=None), record("access.deny")
    assert a["event"] == "access.allow" and a["user"] == "alice" and "scope" not in a
    assert a["id"] != b["id"] and len(a["id"]) == 28
    assert a["time"].endswith("+00:00") and isinstance(a["ts"], float)


async def test_batches_reach_file_and_stream_in_order(tmp_path: Path, redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    c = Counters()
    log = c.log(
        [AuditStore(client, "jit:audit"), JsonlFileSink(tmp_path / "a" / "audit.jsonl")],
        batch_size=7,
        flush_interval=0.05,
    )
    await log.start()
    ids = []
    for i in range(50):
        rec = record("access.allow", n=i)
        ids.append(rec["id"])
        log.emit(rec)
    await log.close()
    lines = [json.loads(x) for x in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ids
    entries = await client.xrange("jit:audit")
    assert [json.loads(e[1][b"record"])["id"] for e in entries] == ids
    assert c.written == {"redis": 50, "file": 50} and c.failed == {} and c.dropped == {}
    await client.aclose()


async def test_failing_sink_keeps_records_and_retries(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    c = Counters()
    log = c.log(
        [AuditStore(client, "jit:audit"), JsonlFileSink(tmp_path / "audit.jsonl")],
        flush_interval=0.02,
    )
    await log.start()
    own_redis.kill()
    for i in range(10):
        log.emit(record("access.allow", n=i))
    await eventually(lambda: c.failed.get("redis", 0) >= 10 and c.written.get("file") == 10)
    assert c.written == {"file": 10}  # the file sink is not held up by the failing one
    assert log.backlog() == 10
    own_redis.start()
    await eventually(lambda: log.backlog() == 0, what="the backlog to drain")
    with redis_sync.Redis(port=own_redis.port) as r:
        assert [json.loads(e[1][b"record"])["n"] for e in r.xrange("jit:audit")] == list(range(10))
    await log.close()
    await client.aclose()


async def test_full_queue_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = Counters()
    log = c.log([JsonlFileSink(tmp_path / "audit.jsonl")], queue_max=3, flush_interval=10)
    recs = [record("access.allow", n=i) for i in range(5)]
    for rec in recs:
        log.emit(rec)
    assert c.dropped == {"file": 2}
    assert recs[4]["id"] in caplog.text and "lost" in caplog.text
    await log.close()
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3


async def test_records_still_failing_at_close_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "broken"

        async def write(self, lines: list[str]) -> None:
            raise OSError("disk on fire")

        async def close(self) -> None:
            return None

    c = Counters()
    log = c.log([Broken()])
    log.emit(record("access.allow"))
    await log.close(grace=0.3)
    assert c.dropped == {"broken": 1}
    assert "still failing at shutdown" in caplog.text
