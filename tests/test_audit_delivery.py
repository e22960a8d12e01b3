"""Nothing lost: outages of Redis and of an HTTP collector under load, SIGKILL, strict mode."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import (
    ROOT,
    ProxyFactory,
    RedisServer,
    Upstream,
    bearer,
    free_port,
    write_config,
)
from waiting import eventually, eventually_sync

from proxy.state import STATE

JITGATE = str(Path(sys.executable).parent / "jitgate")
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"


class Collector:
    """A real HTTP collector for JSON lines that can go down and come back on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lines: list[dict[str, object]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    async def start(self) -> None:
        async def ingest(request: web.Request) -> web.Response:
            body = await request.text()
            self.lines.extend(json.loads(x) for x in body.splitlines() if x)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/ingest", ingest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def ids(self) -> list[str]:
        return [str(x["id"]) for x in self.lines]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A Redis that keeps its data across kill and restart (append-only file, fsync always)."""
    server = RedisServer(persist=True)
    server.start()
    yield server
    server.close()


def file_ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def sink_config(collector: Collector, *more: str) -> str:
    return "\n".join(
        [f"  http: [{{name: siem, url: '{collector.url}', format: jsonl, timeout: 1}}]", *more]
    )


async def test_outages_under_load_lose_nothing_and_keep_order(
    aof_redis: RedisServer, make_proxy: ProxyFactory, collector: Collector, tmp_path: Path
) -> None:
    client = await make_proxy(redis=aof_redis.url, extra=sink_config(collector))
    sent = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal sent
        while not stop.is_set():
            # Public and protected paths: each gives one decision, whatever Redis does.
            responses = await asyncio.gather(
                client.get("/static/app.css"), client.get(SNAPSHOTS, headers=bearer())
            )
            sent += len(responses)
            # Paced: the backlog an outage leaves (and the file checked at teardown) grows
            # with the load, and the sink drains it 32 records per fsync'd call here.
            await asyncio.sleep(0.005)

    log = client.app[STATE].audit

    def failing(sink: str) -> bool:
        return any(lane.failures for lane in log.lanes if lane.name == sink)

    async def phase(what: str, reached: Callable[[], bool], more: int = 20) -> None:
        """Go on under load until `more` requests were sent in this phase and `reached`."""
        mark = sent
        # The backlog an outage leaves grows with the load: a busy machine needs longer.
        await eventually(lambda: sent >= mark + more and reached(), within=60, what=what)

    task = asyncio.create_task(load())
    await phase("records delivered before the outage", lambda: bool(collector.lines))
    aof_redis.kill()  # the grant store and the audit stream go down together
    # Outages long enough for backlogs of several batches (256 records each).
    await phase("the audit stream to fail", lambda: failing("redis"), more=600)
    await collector.stop()
    await phase("the collector to fail", lambda: failing("http:siem"), more=600)
    aof_redis.start()
    await phase("the audit stream to take records again", lambda: not failing("redis"))
    await collector.start()
    await phase("the collector to take records again", lambda: not failing("http:siem"))
    stop.set()
    await task

    async def drained() -> bool:
        await log.flush(force=True)
        return log.backlog() == 0

    await eventually(drained, interval=0.05, what="the backlog to drain")
    assert log.backlog() == 0

    reference = file_ids(tmp_path / "audit.jsonl")  # the file sink never went down
    access = [
        json.loads(x)
        for x in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(x)["event"] in ("access.allow", "access.deny")
    ]
    assert len(access) == sent  # one decision each
    assert collector.ids() == reference
    with aof_redis.client() as r:
        stream = [json.loads(e[1][b"record"])["id"] for e in r.xrange("jit:audit")]
    assert stream == reference


async def test_strict_mode_refuses_protected_requests_while_audit_cannot_be_kept(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    client = await make_proxy(extra="  strict: true\n  spool: {max_bytes: 4KB}")
    await client.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "INC-1", "pytest")
    assert (await client.get(SNAPSHOTS, headers=bearer())).status == 200
    for _ in range(40):  # fill the spool: each record is a few hundred bytes
        await client.get("/static/app.css")
    before = len(upstream.hits)
    r = await client.get(SNAPSHOTS, headers=bearer())
    assert r.status == 503
    body = await r.json()
    assert body["error"] == "unavailable" and "audit trail cannot be written" in body["reasons"][-1]
    assert len(upstream.hits) == before  # never forwarded
    assert (await client.get("/static/app.css")).status == 200  # public paths carry on
    ready = await client.get("/_jit/readyz")
    assert ready.status == 503 and "spool" in (await ready.json())["checks"]["audit"]
    metrics = await (await client.get("/_jit/metrics")).text()
    assert "jitgate_audit_writable 0.0" in metrics


async def test_without_strict_mode_a_full_spool_does_not_refuse(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    client = await make_proxy(extra="  spool: {max_bytes: 4KB}")
    await client.app[STATE].grants.add("alice", "recording:1/demo-1", 60, "INC-1", "pytest")
    for _ in range(40):
        await client.get("/static/app.css")
    assert (await client.get(SNAPSHOTS, headers=bearer())).status == 200


async def test_metrics_show_backlog_and_spool_per_sink(
    make_proxy: ProxyFactory, collector: Collector
) -> None:
    client = await make_proxy(extra=sink_config(collector, "  queue_max: 5"))
    await collector.stop()
    for _ in range(6):  # a decision and a completion each: 12 records
        await client.get("/static/app.css")
    await client.app[STATE].audit.flush(force=True)
    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_audit_backlog{sink="http:siem"} 12.0' in metrics
    assert 'jitgate_audit_spooled{sink="http:siem"} 7.0' in metrics  # beyond queue_max
    assert 'jitgate_audit_backlog{sink="file"} 0.0' in metrics
    assert 'jitgate_audit_records_delivered_total{sink="file"} 12.0' in metrics
    assert 'jitgate_audit_write_failures_total{sink="http:siem"}' in metrics
    assert "jitgate_audit_writable 1.0" in metrics
    await collector.start()
    await client.app[STATE].audit.flush(force=True)
    assert len(collector.lines) == 12


def test_sigkill_then_restart_replays_the_spool(
    tmp_path: Path, aof_redis: RedisServer, upstream_process: str
) -> None:
    collector_port = free_port()
    cfg = write_config(
        tmp_path,
        upstream_url=upstream_process,
        redis_url=aof_redis.url,
        extra=f"  http: [{{name: siem, url: 'http://127.0.0.1:{collector_port}/ingest'}}]",
    )
    port = free_port()
    env = {**os.environ, "JITGATE_LISTEN__PORT": str(port), "JITGATE_AUDIT__FLUSH_INTERVAL": "30"}

    def serve() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [JITGATE, "serve", "--config", str(cfg)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_ready(port, proc)
        return proc

    first = serve()
    try:
        for _ in range(30):
            assert http_get(port, "/static/app.css") == 404  # public, answered by the replay app
        # Each decision is spooled before its response, its completion after: wait for all.
        spool = tmp_path / "state" / "audit-spool"

        def spooled() -> int:
            return sum(p.read_text().count('"access.done"') for p in spool.glob("*/*.wal"))

        eventually_sync(lambda: spooled() >= 30, what="the 30 completions in the spool")
    finally:
        first.send_signal(signal.SIGKILL)  # nothing flushed: the flusher waits 30 s
        first.wait()
    assert not (tmp_path / "audit.jsonl").exists() or not file_ids(tmp_path / "audit.jsonl")

    # The collector is up now; a new process adopts the dead one's spool and replays it.
    collector = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "collector.py"), str(collector_port)],
        stdout=subprocess.PIPE,
    )
    env["JITGATE_AUDIT__FLUSH_INTERVAL"] = "0.05"
    second: subprocess.Popen[bytes] | None = None
    try:
        second = serve()
        path = tmp_path / "audit.jsonl"
        eventually_sync(
            lambda: path.exists() and len(file_ids(path)) >= 60,
            within=20,
            interval=0.1,
            what="the spool replayed to the file",
        )
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    finally:
        if second is not None and second.poll() is None:
            second.kill()
        collector.terminate()
        out, _ = collector.communicate(timeout=10)
    lines = [json.loads(x) for x in out.decode().splitlines() if x]
    replayed = file_ids(tmp_path / "audit.jsonl")
    assert [str(x["id"]) for x in lines] == replayed  # same records, same order, everywhere
    with aof_redis.client() as r:
        stream = [json.loads(e[1][b"record"])["id"] for e in r.xrange("jit:audit")]
    assert stream == replayed
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    decided = [r["id"] for r in recs[:60] if r["event"] == "access.allow"]
    assert len(decided) == 30  # and each completion after its decision:
    assert sorted(r["decision_id"] for r in recs[:60] if r["event"] == "access.done") == sorted(
        decided
    )
    where = {r["id"]: i for i, r in enumerate(recs)}
    assert all(where[r["decision_id"]] < i for i, r in enumerate(recs) if "decision_id" in r)
    assert not list((tmp_path / "state" / "audit-spool").iterdir())  # all delivered


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    def ready() -> bool:
        if http_get(port, "/_jit/healthz") == 200:
            return True
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        return False

    eventually_sync(ready, within=20, interval=0.1, what="jitgate to start")


def http_get(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0


@pytest.fixture
def upstream_process() -> Iterator[str]:
    """The demo replay app as a process (a SIGKILLed jitgate must not take it along)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "demo" / "replay_app.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        if http_get(port, "/") != 0:
            return True
        assert proc.poll() is None, "replay app did not start"
        return False

    eventually_sync(up, within=20, interval=0.1, what="the replay app to start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)
