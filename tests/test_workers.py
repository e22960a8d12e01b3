"""`jitgate serve --workers N` as processes: the supervisor, its workers, their port.

Everything is real: `jitgate serve --workers 2` runs as a child of the test with the
embedded redis-server (no `redis.url`), in front of an aiohttp upstream of the test's own.
Which worker served what is read from where production keeps it: each worker's own
prometheus-client multiprocess file, named after its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, make_token, write_config
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from waiting import eventually, eventually_sync

from proxy import settings as settings_mod
from proxy.errors import ConfigErrors
from proxy.settings.config import usable_cores

pytestmark = pytest.mark.timeout(90)


def children(pid: int) -> list[int]:
    """Return the pids whose parent is pid, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Jitgate:
    """`jitgate serve` as a process, with its log."""

    proc: subprocess.Popen[bytes]
    dir: Path
    log_file: Path
    port: int = 0

    @property
    def cfg(self) -> Path:
        return self.dir / "jitgate.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def workers(self) -> list[int]:
        return [p for p in children(self.proc.pid) if "--worker-slot" in cmdline(p)]

    def redis_servers(self) -> list[int]:
        """The redis-server processes that jitgate (the supervisor or a worker) started."""
        parents = [self.proc.pid, *self.workers()]
        return [p for parent in parents for p in children(parent) if comm(p) == "redis-server"]

    def served(self) -> dict[int, float]:
        """Requests the gate counted, per process, from the multiprocess files."""
        out: dict[int, float] = {}
        for path in (self.dir / "state" / "metrics").glob("counter_*.db"):
            pid = int(path.stem.split("_")[1])
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                if json.loads(key)[1] == "jitgate_requests_total":
                    out[pid] = out.get(pid, 0.0) + value
        return out

    def spools(self) -> set[str]:
        root = self.dir / "state" / "audit-spool"
        return {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(
    tmp: Path, upstream_url: str, *args: str, extra: str = "", port: int = 0, watch: bool = True
) -> Jitgate:
    """Start `jitgate serve ARGS` (listen.port 0: on a port it picks); not yet waited on."""
    cfg = write_config(tmp, upstream_url=upstream_url, redis_url=None, extra=extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITGATE_", "PROMETHEUS_"))}
    env["JITGATE_LISTEN__PORT"] = str(port)
    env["JITGATE_POLICY__WATCH"] = str(watch).lower()
    log_file = tmp / "jitgate.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Jitgate(proc, tmp, log_file)


def serving(j: Jitgate) -> Jitgate:
    """Wait until jitgate says where it listens; fail at once if it exits first."""

    def listening() -> int | None:
        assert j.proc.poll() is None, f"jitgate exited with {j.proc.returncode}:\n{j.log()}"
        m = re.search(r"jitgate listening on http://127\.0\.0\.1:(\d+)", j.log())
        return int(m[1]) if m else None

    j.port = eventually_sync(listening, within=30, what="jitgate to listen")
    return j


@dataclass
class Upstream:
    url: str
    slow_started: asyncio.Event
    release: asyncio.Event


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="slow and complete\n")

    async def anything(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/static/slow", slow)
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    return Upstream(str(server.make_url("")).rstrip("/"), started, release)


@pytest.fixture
def cluster(tmp_path: Path, upstream: Upstream) -> Iterator[Jitgate]:
    j = start(tmp_path, upstream.url, "--workers", "2")
    try:
        yield serving(j)
    finally:
        j.stop()


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection per request, so the kernel picks a worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def get_all(session: aiohttp.ClientSession, url: str, n: int) -> list[int]:
    async def one(i: int) -> int:
        async with session.get(f"{url}/static/x{i}") as resp:
            await resp.read()
            return resp.status

    statuses: list[int] = []
    for start_at in range(0, n, 20):  # 20 at a time: many connections, none refused
        statuses += await asyncio.gather(*(one(i) for i in range(start_at, min(n, start_at + 20))))
    return statuses


async def scrape(session: aiohttp.ClientSession, j: Jitgate) -> dict[str, float]:
    """Return every sample of one /metrics answer, summed over labels, by sample name."""
    async with session.get(f"{j.url}/_jit/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def test_both_workers_serve_and_metrics_add_up(
    cluster: Jitgate, fresh: aiohttp.ClientSession
) -> None:
    workers = cluster.workers()
    assert len(workers) == 2
    # One embedded redis-server, the supervisor's; no worker started one.
    assert len(cluster.redis_servers()) == 1
    assert all(not children(w) for w in workers)
    assert cluster.log().count("started redis-server") == 1

    k = 200
    assert await get_all(fresh, cluster.url, k) == [200] * k
    # Each worker's own file counts what it served: both served, and nothing else did.
    served = await eventually(lambda: sum(cluster.served().values()) == k and cluster.served())
    assert set(served) == set(workers) and all(n > 0 for n in served.values()), served
    # Whichever worker answers a scrape (a new connection each), the total is all k.
    for _ in range(8):
        samples = await scrape(fresh, cluster)
        assert samples["jitgate_requests_total"] == k
        assert samples["jitgate_request_duration_seconds_count"] == k
        assert samples["jitgate_workers"] == 2
        assert samples["jitgate_worker_restarts_total"] == 0
        assert samples["jitgate_audit_writable"] == 1  # the lowest of the two workers'


async def test_a_revocation_holds_on_every_worker(
    cluster: Jitgate, fresh: aiohttp.ClientSession
) -> None:
    """Each worker follows the grant event feed: a grant serves on both, its revocation
    ends it on both (neither answers from a stale grant view)."""

    def cli(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JITGATE_")}
        argv = [sys.executable, "-m", "proxy.cli", "grants", *args, "--config", str(cluster.cfg)]
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    url = f"{cluster.url}/api/projects/1/session_recordings/demo-1/snapshots"
    headers = {"Authorization": f"Bearer {make_token('alice')}"}

    async def statuses(n: int) -> list[int]:
        async def one() -> int:
            async with fresh.get(url, headers=headers) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(n))))

    assert set(await statuses(10)) == {403}
    grant = cli("add", "--user", "alice", "--scope", "recording:1/demo-1", "--ttl", "5m",
                "--reason", "workers test")  # fmt: skip
    before = cluster.served()
    assert await statuses(40) == [200] * 40
    after = cluster.served()
    assert all(after.get(w, 0) > before.get(w, 0) for w in cluster.workers())  # both served

    async def fifty_checks() -> bool:
        return (await scrape(fresh, cluster)).get("jitgate_grant_checks_total") == 50

    # Each worker's grant view counts, copied into its files every second, add up.
    await eventually(fifty_checks, what="50 grant checks counted")
    cli("revoke", grant)

    async def refused() -> bool:
        return await statuses(1) == [403]

    await eventually(refused, what="the revocation")
    assert await statuses(40) == [403] * 40


async def test_a_killed_worker_is_restarted(cluster: Jitgate, fresh: aiohttp.ClientSession) -> None:
    before = cluster.workers()
    assert await get_all(fresh, cluster.url, 40) == [200] * 40
    spools = cluster.spools()
    assert len(spools) == 2  # one writer directory per worker
    # A request's record is written just after its response: a SIGKILL in between loses
    # it, with one process as with several (docs/operations.md). Kill after that point.
    await eventually(lambda: audited(cluster) == 40, what="40 access.allow records")
    os.kill(before[0], signal.SIGKILL)

    def replaced() -> list[int] | None:
        now = cluster.workers()
        return now if len(now) == 2 and before[0] not in now and before[1] in now else None

    after = await eventually(replaced, within=30, what="a new worker")
    assert "exited unexpectedly (code -9)" in cluster.log()

    async def both_serving() -> dict[str, float] | None:
        samples = await scrape(fresh, cluster)
        return samples if samples["jitgate_workers"] == 2 else None

    # The restart is counted; service goes on, on both workers.
    samples = await eventually(both_serving, what="the new worker to serve")
    assert samples["jitgate_worker_restarts_total"] == 1
    assert await get_all(fresh, cluster.url, 60) == [200] * 60
    # The dead worker's spool was adopted by its replacement and replayed, then removed;
    # the requests it served are all in the audit file.
    await eventually(lambda: len(cluster.spools()) == 2 and len(cluster.spools() & spools) == 1)
    served = cluster.served()
    assert set(after) <= set(served) and before[0] in served  # its counts stay in the total
    await eventually(lambda: audited(cluster) == 100, what="100 access.allow records")


def audited(j: Jitgate) -> int:
    """Distinct allow records in the file: delivery is at least once, a replay keeps ids."""
    path = j.dir / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return len({r["id"] for r in records if r["event"] == "access.allow"})


async def test_sigterm_drains_every_worker(
    cluster: Jitgate, upstream: Upstream, fresh: aiohttp.ClientSession
) -> None:
    workers = cluster.workers()
    (redis,) = cluster.redis_servers()

    async def get_slow() -> tuple[int, str]:
        async with fresh.get(f"{cluster.url}/static/slow") as resp:
            return resp.status, await resp.text()

    slow = asyncio.create_task(get_slow())
    await eventually(upstream.slow_started.is_set, what="the slow request upstream")
    cluster.proc.send_signal(signal.SIGTERM)
    # Both workers stop listening and one waits for the request in flight.
    draining = re.compile(r"worker \d \(pid \d+\) draining")
    await eventually(lambda: len(draining.findall(cluster.log())) == 2, what="both draining")
    upstream.release.set()
    assert await slow == (200, "slow and complete\n")
    code = await asyncio.to_thread(cluster.proc.wait, 60)
    assert code == 0, cluster.log()
    assert not any(map(alive, workers))
    # The embedded Redis stopped last, once every worker had closed its audit log.
    assert not alive(redis)
    text = cluster.log()
    assert 0 < text.index("all workers stopped") < text.index("stopped redis-server")
    # Each audit log closed cleanly: everything delivered, no spool left behind.
    assert cluster.spools() == set()
    records = (cluster.dir / "audit.jsonl").read_text()
    assert '"path":"/static/slow"' in records


async def test_sighup_reloads_the_policy_in_every_worker(
    tmp_path: Path, upstream: Upstream, fresh: aiohttp.ClientSession
) -> None:
    j = serving(start(tmp_path, upstream.url, "--workers", "2", watch=False))
    try:
        workers = j.workers()
        versions = await scrape_versions(fresh, j)
        assert len(versions) == 1
        (old,) = versions
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy.read_text() + "\n# a new version\n")
        os.kill(j.proc.pid, signal.SIGHUP)

        async def reloaded() -> dict[str, float] | None:
            found = await scrape_versions(fresh, j)
            new = [v for v, ts in found.items() if v != old and ts > 0]
            return found if new and found[old] == 0 else None

        # Both workers run the new version (the old one's series is the highest value a
        # live worker holds for it: 0 once both moved), each counted its reload, and no
        # process was signalled to death.
        found = await eventually(reloaded, what="both workers on the new version")
        assert len(found) == 2
        samples = await scrape(fresh, j)
        assert samples["jitgate_policy_reloads_total"] == 2
        assert j.workers() == workers
    finally:
        assert j.stop() == 0


async def scrape_versions(session: aiohttp.ClientSession, j: Jitgate) -> dict[str, float]:
    async with session.get(f"{j.url}/_jit/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["version"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "jitgate_policy_loaded_timestamp_seconds"
    }


def test_workers_stop_when_the_supervisor_is_killed(cluster: Jitgate) -> None:
    """A SIGKILLed supervisor leaves no worker serving: each notices and drains."""
    workers = cluster.workers()
    (redis,) = cluster.redis_servers()
    try:
        cluster.proc.kill()
        cluster.proc.wait()
        eventually_sync(lambda: not any(map(alive, workers)), what="the workers gone")
        assert len(re.findall(r"the supervisor \(pid \d+\) is gone: draining", cluster.log())) == 2
    finally:
        # Its embedded redis-server outlives it (a next start adopts it): stop it here.
        if alive(redis):
            os.kill(redis, signal.SIGTERM)


def test_a_worker_that_cannot_start_fails_the_start_once(tmp_path: Path) -> None:
    """A start-up error in the workers is reported, not retried: exit 1, nothing left."""
    (tmp_path / "bad.pem").write_text("not a key\n")
    j = start(
        tmp_path,
        "http://127.0.0.1:9",
        "--workers",
        "2",
        extra="forward: {assertion: {key_file: bad.pem}}",
    )
    assert j.proc.wait(timeout=60) == 1, j.log()
    assert "workers could not start" in j.log()
    assert "restarting" not in j.log()
    assert "stopped redis-server" in j.log()


def test_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        j = start(tmp_path, "http://127.0.0.1:9", "--workers", "2", port=port)
        j.proc.wait(timeout=60)
    assert j.proc.returncode == 1, j.log()
    assert f"cannot listen on 127.0.0.1:{port}" in j.log()
    assert not j.workers()


def test_one_worker_is_one_process(tmp_path: Path, redis_url: str) -> None:
    """--workers 1 is jitgate as before: no supervisor, no multiprocess files."""
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITGATE_", "PROMETHEUS_"))}
    with (tmp_path / "jitgate.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--workers", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    j = Jitgate(proc, tmp_path, tmp_path / "jitgate.log")
    try:
        eventually_sync(lambda: "jitgate listening on" in j.log(), within=30, what="listening")
        assert children(proc.pid) == []
        assert not (tmp_path / "state" / "metrics").exists()
    finally:
        assert j.stop() == 0


_WRITER = """
import asyncio, json, sys
from pathlib import Path
from proxy.audit.sinks import JsonlFileSink

async def main(tag: str) -> None:
    sink = JsonlFileSink(Path(sys.argv[1]), rotate_bytes=20_000, fsync=False)
    for i in range(300):
        lines = [json.dumps({"w": tag, "i": i, "j": j, "pad": "x" * 100}) for j in range(5)]
        await sink.write(lines)

asyncio.run(main(sys.argv[2]))
"""


def test_workers_share_one_audit_file_through_its_rotations(tmp_path: Path) -> None:
    """Two processes append to one rotating audit file at once: every line arrives whole,
    once, whichever file it ended up in."""
    path = tmp_path / "audit.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag], cwd=ROOT)
        for tag in ("a", "b")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    files = sorted(tmp_path.glob("audit*.jsonl"))
    assert len(files) > 10  # it rotated, many times
    seen = [
        (r["w"], r["i"], r["j"]) for f in files for r in map(json.loads, f.read_text().splitlines())
    ]
    assert len(seen) == len(set(seen)) == 2 * 300 * 5


@pytest.mark.parametrize(
    ("value", "want"), [("auto", usable_cores()), ("3", 3), ("1", 1), (None, 1)]
)
def test_listen_workers_setting(tmp_path: Path, value: str | None, want: int) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=None)
    environ = {} if value is None else {"JITGATE_LISTEN__WORKERS": value}
    assert settings_mod.load(cfg, environ=environ).listen.workers == want


@pytest.mark.parametrize("value", ["0", "-2", "many", "true", "1.5"])
def test_bad_listen_workers_is_refused(tmp_path: Path, value: str) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=None)
    with pytest.raises(ConfigErrors) as exc:
        settings_mod.load(cfg, environ={"JITGATE_LISTEN__WORKERS": value})
    assert "listen.workers: must be a positive integer or auto" in str(exc.value)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_workers_option_is_a_usage_error(tmp_path: Path, value: str) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=None)
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--workers", value]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--workers: must be a positive integer or auto" in out.stderr
