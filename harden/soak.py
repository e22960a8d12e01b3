"""Soak: jitgate under steady load for a long while, with grants and the policy changing.

    make soak                                   # 30 minutes, as documented
    .venv/bin/python harden/soak.py --minutes 2 # a short one

Starts its own redis-server, an upstream (nginx serving files when installed, else
bench/upstream.py) and one jitgate with bench/run.py's full-enforcement configuration
(RS256 tokens via JWKS, audit to the Redis stream and the file with the HMAC chain), and a
soak policy whose grants last 10 to 30 seconds. Then:

1. **Maximum rate:** a closed-loop run of this script's own client for `--probe` seconds
   over the whole mix of users and recordings; the soak then sends at `--load` (default
   50%) of that rate, open loop.
2. **The soak:** every request is for a random (user, recording) out of 5 x 8. Meanwhile
   grants are requested through the API (auto-approved, 10 s, 20 s or 30 s), revoked by an
   admin through the API, or left to expire in Redis; the policy file is rewritten every
   `--reload` seconds and the script waits until jitgate runs the new version.
3. **The figures:** jitgate's resident memory (VmRSS), sampled every 5 s, from the end
   of the first tenth of the run (the baseline) to the end; its open file descriptors when
   idle, after the maximum-rate probe and after the soak, not counting its pooled
   connections to the upstream and Redis (a pool keeps as many as were once in use at the
   same time, up to its configured size, so they say nothing of a leak); the errors (an
   exception, or a status other than 200 and 403); and the decisions that differ from the
   expected ones. The script knows which grants exist: a request is expected to
   get 200 if a grant for its (user, recording) was active when it was sent, else 403. A
   request in flight while that grant changed (from the moment the change was asked for,
   while it is under way and until `--slack` after it was answered, or within `--slack` of
   its expiry) is ambiguous and counted apart, not judged.

It prints one line, `soak: ... PASS|FAIL`, writes the figures to .jitgate/soak-latest.json
and exits 1 if a target is missed: RSS growth over 10%, more than 5 idle descriptors more
after than before, any error, any wrong decision, or a reload that was not picked up.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import random
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # ahead of harden/, whose run.py is the checks' runner
bench = importlib.import_module("run")  # bench/run.py: processes, config, tokens
percentile = importlib.import_module("loadgen").percentile

USERS = [f"soak-user-{i}" for i in range(5)]
RECORDINGS = [f"rec-{i}" for i in range(8)]
ADMIN = "soak-admin"
DURATIONS = (10, 20, 30)  # seconds a grant lasts; the soak policy offers these
RESULTS = bench.ROOT / ".jitgate" / "soak-latest.json"
RSS_GROWTH_MAX = 0.10
FD_GROWTH_MAX = 5

POLICY = """\
version: 1
default: identity
routes:
  - id: health
    path: /healthz
    access: public
  - id: recording
    path: /api/projects/{project}/session_recordings/{recording}
    subpaths: true
    access: protected
    scope: "recording:{project}/{recording}"
entitlements:
  - id: soak
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [10s, 20s, 30s], default: 10s, max: 30s}
    reason: required
    approval: {mode: auto}
"""


def path_of(recording: str) -> str:
    return f"/api/projects/1/session_recordings/{recording}/snapshots"


def scope_of(recording: str) -> str:
    return f"recording:1/{recording}"


@dataclass
class Key:
    """What the script knows of one (user, recording)'s grant."""

    active: list[tuple[float, float]] = field(default_factory=list)  # [from, to)
    unsure: list[tuple[float, float]] = field(default_factory=list)  # no judging here
    grant: str | None = None  # the grant in force, if any
    until: float = 0.0  # when it expires
    busy: bool = False  # a change is under way
    changing: float | None = None  # when the change under way was asked for
    events: list[tuple[float, str]] = field(default_factory=list)  # what happened when

    def expected(self, sent: float, answered: float) -> bool | None:
        """200 expected (True), 403 (False), or None when the grant changed meanwhile."""
        if self.changing is not None and self.changing <= answered:
            return None  # a change was asked for and is not answered yet
        if any(a <= answered and sent <= b for a, b in self.unsure):
            return None
        return any(a <= sent < b for a, b in self.active)


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0
    wrong: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Soak:
    def __init__(self, args: argparse.Namespace, base: str, tokens: dict[str, str]) -> None:
        self.args = args
        self.base = base
        self.tokens = tokens
        self.keys = {(u, r): Key() for u in USERS for r in RECORDINGS}
        self.tally = Tally()
        self.grant_events: dict[str, int] = {"added": 0, "revoked": 0, "expired": 0}
        self.reloaded: list[float] = []  # when each policy version was taken up
        self.stop = False

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    async def one(self, http: aiohttp.ClientSession, due: float | None = None) -> None:
        user, rec = random.choice(USERS), random.choice(RECORDINGS)
        sent = time.monotonic()
        try:
            async with http.get(self.base + path_of(rec), headers=self.auth(user)) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.tally.error(type(exc).__name__)
            return
        answered = time.monotonic()
        self.tally.latencies.append(answered - (due if due is not None else sent))
        if status not in (200, 403):
            self.tally.error(f"status {status}")
            return
        self.tally.ok += status == 200
        self.tally.refused += status == 403
        want = self.keys[(user, rec)].expected(sent, answered)
        if want is None:
            self.tally.ambiguous += 1
        elif want != (status == 200):
            key = self.keys[(user, rec)]
            near = [(round(t - sent, 3), what) for t, what in key.events if abs(t - sent) < 60]
            reload = min((round(t - sent, 3) for t in self.reloaded), key=abs, default=None)
            self.tally.wrong.append(
                {"user": user, "recording": rec, "status": status, "expected": 200 if want else 403,
                 "latency_ms": round(1000 * (answered - sent), 1),
                 "grant_events_s": near, "nearest_reload_s": reload}
            )  # fmt: skip

    async def closed_loop(self, http: aiohttp.ClientSession, seconds: float) -> float:
        """Requests per second that this client gets through, closed loop."""
        done = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                await self.one(http)
                done += 1

        started = time.monotonic()
        # As many in flight as the soak may have, so that every pool reaches its size here.
        await asyncio.gather(*(worker() for _ in range(self.args.connections * 4)))
        return done / (time.monotonic() - started)

    async def open_loop(self, http: aiohttp.ClientSession, rate: float, seconds: float) -> int:
        """Request i is due at start + i/rate, whatever happened before it."""
        gate = asyncio.Semaphore(self.args.connections * 4)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        end = start + seconds
        # Until the end, however far behind: a sender that cannot keep up sends less.
        while (due := start + i / rate) < end and time.monotonic() < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.create_task(self.one(http, due))
            task.add_done_callback(lambda _t: gate.release())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
        return i

    async def grant(self, http: aiohttp.ClientSession, user: str, rec: str) -> None:
        key = self.keys[(user, rec)]
        ttl = random.choice(DURATIONS)
        asked = key.changing = time.monotonic()
        key.events.append((asked, f"grant asked for {ttl} s"))
        body = {"scope": scope_of(rec), "reason": "soak", "duration": f"{ttl}s"}
        async with http.post(
            self.base + "/_jit/api/requests", json=body, headers=self.auth(user)
        ) as resp:
            data = await resp.json()
            if resp.status != 201 or data.get("state") != "active":
                self.tally.error(f"grant request {resp.status}")
                return
        answered = time.monotonic()
        left = float(data["expires_at"]) - time.time()  # wall clock, as the API gives it
        key.grant, key.until = str(data["id"]), answered + left
        key.unsure.append((key.until - self.args.slack, key.until + self.args.slack))
        key.active.append((answered, key.until))
        key.events += [(answered, "grant active"), (key.until, "grant expires")]
        self.grant_events["added"] += 1

    async def revoke(self, http: aiohttp.ClientSession, user: str, rec: str) -> None:
        key = self.keys[(user, rec)]
        asked = key.changing = time.monotonic()
        key.events.append((asked, "revoke asked"))
        url = f"{self.base}/_jit/api/grants/{key.grant}/revoke"
        async with http.post(url, json={"comment": "soak"}, headers=self.auth(ADMIN)) as resp:
            await resp.read()
            key.events.append((time.monotonic(), f"revoke answered {resp.status}"))
            if resp.status != 200:
                self.tally.error(f"revoke {resp.status}")
                return
        frm, _ = key.active[-1]
        key.active[-1] = (frm, asked)
        key.grant, key.until = None, 0.0
        self.grant_events["revoked"] += 1

    async def churn(self, http: aiohttp.ClientSession) -> None:
        """Grants come and go all the time: requested, revoked, or left to expire."""
        while not self.stop:
            await asyncio.sleep(self.args.churn)
            (user, rec), key = random.choice(list(self.keys.items()))
            now = time.monotonic()
            if key.busy:
                continue
            key.busy = True
            try:
                if key.grant is not None and now >= key.until + self.args.slack:
                    key.grant = None  # Redis expired it
                    self.grant_events["expired"] += 1
                if key.grant is None:
                    await self.grant(http, user, rec)
                elif now < key.until - self.args.slack and random.random() < 0.5:
                    await self.revoke(http, user, rec)  # not when it may be expiring
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                self.tally.error(f"churn {type(exc).__name__}")
            finally:
                if key.changing is not None:  # done, or failed: in doubt until `slack` after
                    key.unsure.append((key.changing, time.monotonic() + self.args.slack))
                key.busy, key.changing = False, None


def sample(pid: int) -> tuple[int, int]:
    """jitgate's resident memory in KiB and its open file descriptors."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def counters(base: str, names: tuple[str, ...]) -> dict[str, float]:
    """The named counters of jitgate's metrics, each summed over its labels."""
    async with aiohttp.ClientSession() as http, http.get(f"{base}/_jit/metrics") as resp:
        text = await resp.text()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def pooled(pid: int, ports: tuple[int, ...]) -> int:
    """jitgate's sockets to `ports` (the upstream's and Redis's): kept by its pools, which
    hold as many as were once in use at the same time, up to their configured sizes."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = 0
    for table in ("tcp", "tcp6"):
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                found += fields[9] in inodes and remote_port in ports
    return found


async def quiet_fds(pid: int, ports: tuple[int, ...]) -> int:
    """jitgate's open descriptors a moment after the client has closed its connections,
    not counting the pools' connections to `ports`."""
    await asyncio.sleep(1.0)
    return sample(pid)[1] - pooled(pid, ports)


async def reloads(
    policy: Path, metrics_url: str, every: float, stop: asyncio.Event, taken_at: list[float]
) -> tuple[int, int]:
    """Rewrite the policy every `every` seconds; return (versions written, taken up)."""
    asked = taken = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            break
        except TimeoutError:
            pass
        asked += 1
        text = POLICY + f"# reload {asked} at {time.time():.3f}\n"
        await asyncio.to_thread(policy.write_text, text)
        try:
            await asyncio.to_thread(bench.wait_policy, metrics_url, text, 30.0)
            taken += 1
            taken_at.append(time.monotonic())
        except bench.BenchError:
            pass
    return asked, taken


async def soak(
    args: argparse.Namespace,
    pid: int,
    base: str,
    tokens: dict[str, str],
    policy: Path,
    ports: tuple[int, ...],
) -> dict[str, Any]:
    runner = Soak(args, base, tokens)

    def client() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.connections * 4))

    async with client() as http:
        churn = asyncio.create_task(runner.churn(http))
        await asyncio.sleep(3)  # some grants exist before the probe
        max_rate = await runner.closed_loop(http, args.probe)
        runner.stop = True
        await churn
    fds_before = await quiet_fds(pid, ports)
    runner.stop, runner.tally = False, Tally()
    rate = max_rate * args.load
    seconds = args.minutes * 60
    samples: list[tuple[float, int, int]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), *sample(pid)))
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)

    async with client() as http:
        churn = asyncio.create_task(runner.churn(http))
        watcher = asyncio.create_task(sampler())
        metrics_url = f"{base}/_jit/metrics"
        reloader = asyncio.create_task(
            reloads(policy, metrics_url, args.reload, stop, runner.reloaded)
        )
        started = time.monotonic()
        sent = await runner.open_loop(http, rate, seconds)
        elapsed = time.monotonic() - started
        stop.set()
        runner.stop = True
        asked, taken = await reloader
        await watcher
        await churn
    fds_after = await quiet_fds(pid, ports)
    redis_trouble = await counters(
        base, ("jitgate_redis_breaker_trips_total", "jitgate_redis_errors_total")
    )
    samples.append((time.monotonic(), *sample(pid)))
    base_at = started + seconds / 10
    baseline = next((s for s in samples if s[0] >= base_at), samples[-1])
    last = samples[-1]
    lat = sorted(runner.tally.latencies)
    t = runner.tally
    return {
        "minutes": args.minutes,
        "max_rate": round(max_rate, 1),
        "load": args.load,
        "rate": round(rate, 1),
        "sent": sent,
        "achieved_rps": round(sent / elapsed, 1),
        "p99_ms": round(1000 * p99, 2) if (p99 := percentile(lat, 99)) is not None else None,
        "ok": t.ok,
        "refused": t.refused,
        "ambiguous": t.ambiguous,
        "wrong": len(t.wrong),
        "wrong_allowed": sum(1 for w in t.wrong if w["status"] == 200),  # 200 without a grant
        "wrong_first": t.wrong[:5],
        "errors": sum(t.errors.values()),
        "error_kinds": t.errors,
        "redis_trouble": redis_trouble,  # breaker trips and failed Redis operations
        "grants": runner.grant_events,
        "reloads": {"asked": asked, "taken": taken},
        "rss_kib": {
            "baseline": baseline[1],
            "end": last[1],
            "max": max(s[1] for s in samples),
        },
        "rss_growth": round((last[1] - baseline[1]) / baseline[1], 4),
        "fds": {"before": fds_before, "after": fds_after, "max": max(s[2] for s in samples)},
    }


def verdict(r: dict[str, Any]) -> list[str]:
    """The targets missed; none when the soak passed."""
    missed = []
    if r["rss_growth"] > RSS_GROWTH_MAX:
        missed.append(f"RSS grew {100 * r['rss_growth']:.1f}% (max {100 * RSS_GROWTH_MAX:.0f}%)")
    if r["fds"]["after"] - r["fds"]["before"] > FD_GROWTH_MAX:
        missed.append(f"descriptors {r['fds']['before']} -> {r['fds']['after']} when idle")
    if r["errors"]:
        trouble = r["redis_trouble"]
        missed.append(
            f"{r['errors']} errors {r['error_kinds']} "
            f"({trouble['jitgate_redis_breaker_trips_total']:g} breaker trips, "
            f"{trouble['jitgate_redis_errors_total']:g} failed Redis operations; "
            f"breaker opened for {r.get('breaker_openings') or 'no reason logged'})"
        )
    if r["wrong"]:
        missed.append(
            f"{r['wrong']} wrong decisions ({r['wrong_allowed']} allowed without a grant)"
        )
    if r["reloads"]["taken"] < r["reloads"]["asked"]:
        missed.append(f"reloads taken {r['reloads']['taken']} of {r['reloads']['asked']}")
    if r["log_errors"]:
        missed.append(f"{r['log_errors']} ERROR lines in jitgate's log")
    return missed


def line(r: dict[str, Any], missed: list[str]) -> str:
    g = r["grants"]
    return (
        f"soak: {r['minutes']:g} min at {r['achieved_rps']:.0f} req/s "
        f"({100 * r['load']:.0f}% of {r['max_rate']:.0f}), "
        f"RSS {r['rss_kib']['baseline'] / 1024:.1f}->{r['rss_kib']['end'] / 1024:.1f} MiB "
        f"({100 * r['rss_growth']:+.1f}%), idle fds {r['fds']['before']}->{r['fds']['after']}, "
        f"{r['errors']} errors, {r['wrong']} wrong of "
        f"{r['ok'] + r['refused'] - r['ambiguous']} judged ({r['ambiguous']} ambiguous), "
        f"grants +{g['added']} revoked {g['revoked']} expired {g['expired']}, "
        f"reloads {r['reloads']['taken']} "
        + ("PASS" if not missed else "FAIL: " + "; ".join(missed))
    )


def start(args: argparse.Namespace, tmp: Path, procs: Any) -> dict[str, Any]:
    redis_bin = bench.start(argparse.Namespace(loadgen="python", connections=1), procs)[1]
    up_port, jit_port, redis_port = bench.free_ports(3)
    upstream_url = f"http://{bench.HOST}:{up_port}"
    bench.start_redis(procs, tmp, redis_bin, redis_port)
    www = tmp / "www"
    body = bench.upstream_app.snapshot_body()
    for rec in RECORDINGS:
        target = www / path_of(rec).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    (www / "healthz").write_text("ok\n")
    key = bench.make_key(www)
    upstream_kind = bench.start_upstream(args.upstream, procs, tmp, www, up_port)
    bench.wait_http(procs.servers[-1], f"{upstream_url}/healthz")
    cfg = bench.write_config(tmp, port=jit_port, upstream_url=upstream_url, redis_port=redis_port)
    (tmp / "policy.yaml").write_text(POLICY)
    with cfg.open("a") as fh:
        fh.write(f"admins: {{users: [{ADMIN}]}}\n")
    jitgate = procs.start(
        "jitgate",
        [*bench.jitgate_command(), "serve", "--config", str(cfg)],
        env=bench.jitgate_env(),
    )
    base = f"http://{bench.HOST}:{jit_port}"
    bench.wait_http(jitgate, f"{base}/_jit/healthz")
    hours = int(args.minutes * 60 + 3600)
    tokens = {u: bench.mint(key, hours, sub=u) for u in [*USERS, ADMIN]}
    return {
        "pid": jitgate.proc.pid,
        "ports": (up_port, redis_port),
        "base": base,
        "tokens": tokens,
        "log": jitgate.log_file,
        "policy": tmp / "policy.yaml",
        "upstream": upstream_kind,
    }


def log_errors(path: Path) -> int:
    text = path.read_text(errors="replace")
    return sum(1 for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln)


def breaker_openings(path: Path) -> dict[str, int]:
    """Why the breaker opened, from jitgate's log: its reason, and how often."""
    said = "grant checks refused (503) until Redis answers again: "
    why: dict[str, int] = {}
    for ln in path.read_text(errors="replace").splitlines():
        if said in ln:
            reason = ln.split(said, 1)[1].strip()
            why[reason] = why.get(reason, 0) + 1
    return why


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=30.0, help="soak length (30)")
    p.add_argument("--load", type=float, default=0.5, help="share of the maximum rate (0.5)")
    p.add_argument("--probe", type=float, default=10.0, help="seconds to find the maximum (10)")
    p.add_argument("--reload", type=float, default=60.0, help="seconds between reloads (60)")
    p.add_argument("--churn", type=float, default=0.25, help="seconds between grant changes")
    p.add_argument("--slack", type=float, default=0.5, help="seconds a change may take (0.5)")
    p.add_argument("--connections", type=int, default=32, help="client connections (32)")
    p.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto")
    p.add_argument("--json", action="store_true", help="the figures as JSON, the line to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.minutes <= 0 or not 0 < args.load <= 1 or args.connections < 1:
        parser().error("--minutes and --connections must be positive, --load in (0, 1]")
    with tempfile.TemporaryDirectory(prefix="jitgate-soak-") as name:
        tmp = Path(name)
        procs = bench.Processes(tmp)
        try:
            ctx = start(args, tmp, procs)
            report = asyncio.run(
                soak(args, ctx["pid"], ctx["base"], ctx["tokens"], ctx["policy"], ctx["ports"])
            )
            report["log_errors"] = log_errors(ctx["log"])
            report["breaker_openings"] = breaker_openings(ctx["log"])
            report["upstream"] = ctx["upstream"]
            report["code"] = bench.code_revision()
            report["policy_sha"] = hashlib.sha256(POLICY.encode()).hexdigest()[:16]
        except bench.BenchError as exc:
            print(f"soak: could not run: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    missed = verdict(report)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report | {"missed": missed}, indent=2))
    print(line(report, missed), file=sys.stderr if args.json else sys.stdout)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
