"""Load-test the upstream, a plain aiohttp pass-through and jitgate side by side.

    make bench                      # or: .venv/bin/python bench/run.py --rounds 3

(a) the upstream directly, (b) a check-free aiohttp proxy in front of it, (c) jitgate with
full enforcement in front of it: an RS256 token checked against the issuer's JWKS, the
policy, a Redis grant check, metrics, and audit records per request (decision, completion)
to the Redis stream and the file with the HMAC chain; (d) a naive check as a yardstick
(bench/naive.py).
The upstream is nginx serving files when it is installed (it competes least for Python's
CPU), else bench/upstream.py. Each server is its own process; the load generator is wrk
if installed, else bench/loadgen.py. It measures and prints; it asserts nothing about
speed. The results are also written to .jitgate/bench-latest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import upstream as upstream_app  # bench/ is the script's directory
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS_FILE = ROOT / ".jitgate" / "bench-latest.json"
PATH = "/api/projects/1/session_recordings/demo-1/snapshots"
SCOPE = "recording:1/demo-1"
USER = "alice"
SECRET = "bench-only-secret-0123456789abcdef0123456789"
AUDIT_KEY = "bench-only-audit-key-0123456789abcdef0123"
KID = "bench-1"
ISSUER = "https://issuer.bench.invalid"  # only compared with iss: keys come from jwks_uri
AUDIENCE = "jitgate"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_ports(n: int) -> list[int]:
    """Return n distinct free loopback ports (all held open while picking, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (no output)"


# --- processes -------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path


class Processes:
    """Every child the bench starts, so that all of them end however the bench ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[Server] = []
        self.transient: list[subprocess.Popen[Any]] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Server:
        log_file = self.log_dir / f"{name}.log"
        with log_file.open("wb") as out:
            # Own session: a Ctrl-C reaches only us, and we stop the children in order.
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        server = Server(name, proc, log_file)
        self.servers.append(server)
        return server

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        """Run a short-lived child to completion; return (exit code, stdout, stderr)."""
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
            start_new_session=True,
        )
        self.transient.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.transient.remove(proc)
        return proc.returncode, out, err

    def stop_all(self) -> None:
        for proc in self.transient:
            with suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self.transient.clear()
        # Newest first, one at a time: jitgate flushes its audit queue to Redis on SIGTERM.
        for server in reversed(self.servers):
            proc = server.proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.servers.clear()


def cpu_seconds(pid: int) -> float | None:
    """Return user+system CPU time of a process so far, from /proc (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def http_get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    # No proxy handler: an http_proxy in the environment must not intercept loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(req, timeout=5) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(
    server: Server, url: str, timeout: float = 30.0, headers: Mapping[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with code {server.proc.returncode} while starting:\n"
                + tail(server.log_file)
            )
        try:
            status, _ = http_get(url, headers)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{server.name} did not answer 200 on {url} within {timeout:.0f}s:\n"
                + tail(server.log_file)
            )
        time.sleep(0.05)


def wait_redis(server: Server, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise BenchError(f"redis-server exited while starting:\n{tail(server.log_file)}")
        with suppress(OSError), socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server did not answer PING:\n{tail(server.log_file)}")
        time.sleep(0.05)


def redis_command(port: int, *args: str) -> bytes:
    """Send one command in RESP and return the raw first reply line."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(payload.encode())
        return s.recv(4096).split(b"\r\n", 1)[0]


def start_redis(procs: Processes, tmp: Path, redis_bin: str, port: int) -> Server:
    """A bench's own redis-server, keeping nothing on disk; returns once it answers PING."""
    (tmp / "redis").mkdir()
    redis = procs.start(
        "redis",
        [redis_bin, "--port", str(port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--dir", str(tmp / "redis")],
    )  # fmt: skip
    wait_redis(redis, port)
    return redis


# --- load generators -------------------------------------------------------------------


@dataclass
class Run:
    """One load-generator run against one target."""

    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    detail: dict[str, Any] = field(default_factory=dict)


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(output: str) -> Run:
    """Read req/s, the 50%/99% latency lines, request count and errors from wrk --latency."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.M)
    if rps is None or total is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    pcts = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+\w+)\s*$", output, re.M))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    detail: dict[str, Any] = {"non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0}
    if sock:
        detail["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)
        )
    errors = detail["non_2xx_3xx"] + sum(detail.get("socket_errors", {}).values())
    return Run(
        rps=float(rps.group(1)),
        p50_ms=_wrk_ms(pcts["50"]) if "50" in pcts else None,
        p99_ms=_wrk_ms(pcts["99"]) if "99" in pcts else None,
        requests=int(total.group(1)),
        errors=errors,
        detail=detail,
    )


class LoadGen:
    name = ""

    def __init__(self, procs: Processes, connections: int) -> None:
        self.procs = procs
        self.connections = connections

    def describe(self) -> str:
        raise NotImplementedError

    def run(self, url: str, headers: Mapping[str, str], duration: float) -> Run:
        raise NotImplementedError


class Wrk(LoadGen):
    name = "wrk"

    def __init__(self, procs: Processes, connections: int, binary: str) -> None:
        super().__init__(procs, connections)
        self.binary = binary
        # `wrk -v` prints its version and exits non-zero; only the first line matters.
        probe = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        first = (probe.stdout or probe.stderr).strip().splitlines()
        self.version = first[0].split(" [")[0] if first else "wrk"

    @staticmethod
    def seconds(duration: float) -> int:
        return max(1, round(duration))  # wrk takes whole seconds only

    def describe(self) -> str:
        return f"{self.version} (-t1 -c{self.connections} --latency)"

    def argv(self, url: str, headers: Mapping[str, str], duration: float) -> list[str]:
        argv = [self.binary, "-t1", f"-c{self.connections}", f"-d{self.seconds(duration)}s"]
        argv.append("--latency")
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        return [*argv, url]

    def run(self, url: str, headers: Mapping[str, str], duration: float) -> Run:
        code, out, err = self.procs.run(self.argv(url, headers, duration), duration + 60)
        if code != 0:
            raise BenchError(f"wrk failed with code {code}:\n{err or out}")
        result = parse_wrk(out)
        result.detail["raw"] = out
        return result


class PythonLoadGen(LoadGen):
    name = "python"

    def describe(self) -> str:
        return (
            f"bench/loadgen.py (aiohttp {aiohttp.__version__} client, "
            f"{self.connections} workers, one process)"
        )

    def argv(self, url: str, headers: Mapping[str, str], duration: float) -> list[str]:
        argv = [sys.executable, str(BENCH / "loadgen.py"), url]
        argv += ["-c", str(self.connections), "-d", f"{duration:g}"]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        return argv

    def run(self, url: str, headers: Mapping[str, str], duration: float) -> Run:
        code, out, err = self.procs.run(self.argv(url, headers, duration), duration + 60)
        if code != 0:
            raise BenchError(f"bench/loadgen.py failed with code {code}:\n{err or out}")
        data = json.loads(out)
        return Run(
            rps=float(data["rps"]),
            p50_ms=data["p50_ms"],
            p99_ms=data["p99_ms"],
            requests=int(data["requests"]),
            errors=int(data["errors"]),
            detail={k: data[k] for k in ("statuses", "exceptions", "elapsed_s")},
        )


def pick_loadgen(choice: str, procs: Processes, connections: int) -> LoadGen:
    wrk = shutil.which("wrk")
    if choice == "wrk" and wrk is None:
        raise BenchError("--loadgen wrk: wrk is not on PATH (Debian: apt-get install wrk)")
    if choice in ("wrk", "auto") and wrk is not None:
        return Wrk(procs, connections, wrk)
    return PythonLoadGen(procs, connections)


# --- the three targets -----------------------------------------------------------------


@dataclass
class Target:
    key: str
    label: str
    url: str
    front: Server  # the process whose CPU per request is reported
    headers: Mapping[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    cpu_us: list[dict[str, float]] = field(default_factory=list)


def jitgate_command() -> list[str]:
    script = Path(sys.executable).parent / "jitgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def jitgate_env() -> dict[str, str]:
    # The bench's config must be the whole story: no JITGATE_* override from the shell.
    return {k: v for k, v in os.environ.items() if not k.startswith("JITGATE_")}


# The audit section of (c)'s config: every sink as deployed (full), or fewer, to see what
# each costs. "none" writes no record anywhere: it is not a deployable configuration.
_CHAIN = f"\n  hmac_key: {AUDIT_KEY}"
AUDIT_SECTIONS = {
    "full": "redis: {stream: audit, maxlen: 200000}\n  file: audit.jsonl" + _CHAIN,
    "redis": "redis: {stream: audit, maxlen: 200000}" + _CHAIN,
    "file": "redis: null\n  file: audit.jsonl" + _CHAIN,
    "none": "redis: null\n  spool: null",
}


def write_config(
    tmp: Path,
    *,
    port: int,
    upstream_url: str,
    redis_port: int,
    audit: str = "full",
    grant_view: bool = True,
) -> Path:
    """Write a full-enforcement jitgate config and the repo's policy into tmp; tokens are
    RS256, verified with the keys the upstream serves at /jwks.json."""
    (tmp / "policy.yaml").write_text((ROOT / "config" / "policy.yaml").read_text())
    cfg = tmp / "jitgate.yaml"
    cfg.write_text(
        f"""\
listen: {{host: {HOST}, port: {port}}}
upstream: {{url: "{upstream_url}", connect_timeout: 5, read_timeout: 60}}
redis: {{url: "redis://{HOST}:{redis_port}/0", timeout: 1.0, local_view: {str(grant_view).lower()}}}
state_dir: state
policy: {{file: policy.yaml}}
identity:
  issuers:
    - issuer: {ISSUER}
      audience: {AUDIENCE}
      algorithms: [RS256]
      jwks_uri: "{upstream_url}/jwks.json"
audit:
  {AUDIT_SECTIONS[audit]}
"""
    )
    return cfg


def make_key(www: Path) -> rsa.RSAPrivateKey:
    """Return (c)'s signing key; its JWKS goes where the upstream serves /jwks.json."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=KID, use="sig", alg="RS256")
    (www / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return key


def mint(key: rsa.RSAPrivateKey | str, ttl: int, sub: str = USER) -> str:
    """An RS256 token from the issuer's key for (c), or an HS256 one for (d)."""
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl}
    if isinstance(key, str):
        return jwt.encode(claims, key, algorithm="HS256")
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


def write_www(www: Path) -> bytes:
    """The upstream's files: the recording's snapshots (what every run fetches), /healthz."""
    body = upstream_app.snapshot_body()
    target = www / PATH.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    (www / "healthz").write_text("ok\n")
    return body


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        root {www};
        location / {{ try_files $uri =404; }}
    }}
}}
"""


def start_upstream(choice: str, procs: Processes, tmp: Path, www: Path, port: int) -> str:
    """Start nginx on the files in www if asked or available, else bench/upstream.py."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if choice == "nginx" and nginx is None:
        raise BenchError("--upstream nginx: nginx is not installed (Debian: nginx-light)")
    if choice in ("nginx", "auto") and nginx is not None:
        conf_dir = tmp / "nginx"
        conf_dir.mkdir()
        conf = conf_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=conf_dir, host=HOST, port=port, www=www))
        procs.start("upstream", [nginx, "-c", str(conf), "-p", str(conf_dir)])
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        return f"nginx serving files ({version.stderr.strip().removeprefix('nginx version: ')})"
    procs.start(
        "upstream",
        [sys.executable, str(BENCH / "upstream.py"), "--port", str(port),
         "--jwks", str(www / "jwks.json")],
    )  # fmt: skip
    return "bench/upstream.py (aiohttp)"


def profile(procs: Processes, server: Server, out: Path, seconds: float) -> subprocess.Popen[Any]:
    """Sample `server` with py-spy while (c) is measured; collapsed stacks go to `out`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    argv = [spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds)),
            "--rate", "500", "--format", "raw", "--nonblocking",
            "--output", str(out.resolve())]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.transient.append(proc)
    return proc


def scale_policy(base: str, routes: int) -> str:
    """The repo's policy with `routes` more routes ahead of the recording's, none matching."""
    extra = "".join(
        f"  - id: scale-{i}\n    path: /scale/{i}/{{thing}}\n    access: identity\n"
        for i in range(routes)
    )
    return base.replace("\nroutes:\n", "\nroutes:\n" + extra, 1)


def add_other_grants(redis_port: int, count: int, hours: float = 4.0) -> None:
    """Give `count` other users an active grant each, laid out as the grant store keeps them."""
    import redis as redis_sync  # only the scale runs need the client here

    expiry = int((time.time() + hours * 3600) * 1000)
    with redis_sync.Redis(host=HOST, port=redis_port) as r:
        for start in range(0, count, 10_000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(count, start + 10_000)):
                user, grant = f"user{i}", f"g-scale{i:010d}"
                pipe.zadd(f"jit:active:{len(user)}:{user}:{SCOPE}", {grant: expiry})
                pipe.zadd("jit:grants", {grant: expiry})
            pipe.execute()


def wait_policy(url: str, text: str, timeout: float = 60.0) -> None:
    """Wait until jitgate runs the policy `text` (its version is in the metrics)."""
    version = hashlib.sha256(text.encode()).hexdigest()[:16]
    deadline = time.monotonic() + timeout
    while f'version="{version}"' not in http_get(url)[1].decode():
        if time.monotonic() > deadline:
            raise BenchError(f"jitgate did not load the scale policy {version} in {timeout:.0f}s")
        time.sleep(0.2)


def jitgate_cli(*args: str) -> str:
    proc = subprocess.run(
        [*jitgate_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=jitgate_env(),
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"`jitgate {shlex.join(args)}` failed:\n{proc.stderr or proc.stdout}")
    return proc.stdout.strip()


def check_target(target: Target, headers: Mapping[str, str], want: bytes) -> None:
    """Send one request before loading a target; abort unless it is a 200 with the body."""
    try:
        status, body = http_get(target.url, headers)
    except OSError as exc:
        raise BenchError(f"({target.key}) {target.label}: {target.url} failed: {exc}") from None
    if status != 200 or body != want:
        hint = ""
        if target.key == "c":
            hint = (
                "\njitgate must allow this request (valid token, active grant, upstream up);"
                f" its log:\n{tail(target.front.log_file)}"
            )
        raise BenchError(
            f"({target.key}) {target.label}: GET {target.url} answered {status} "
            f"({len(body)} bytes, expected 200 with {len(want)} bytes): "
            f"{body[:300].decode(errors='replace')}{hint}"
        )


# --- reporting -------------------------------------------------------------------------


def constant_rate(
    procs: Processes, direct: Target, jit: Target, rate: float | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Open-loop runs at one rate against the upstream and jitgate, rounds interleaved;
    medians of each percentile, and what jitgate adds at p99."""
    if not rate:
        raise BenchError("--latency: (c) has no req/s to take half of")
    connections = max(64, args.connections)
    loadgen = PythonLoadGen(procs, connections)
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "c": []}
    for rnd in range(1, args.rounds + 1):
        for target in (direct, jit):
            argv = loadgen.argv(target.url, target.headers, args.duration)
            argv += ["--rate", f"{rate:.0f}"]
            code, out, err = procs.run(argv, args.duration + 60)
            if code != 0:
                raise BenchError(f"bench/loadgen.py --rate failed with code {code}:\n{err or out}")
            data = json.loads(out)
            runs[target.key].append(data)
            log(
                f"latency {rnd}/{args.rounds} ({target.key}) at {rate:.0f} req/s: "
                f"p50 {_num(data['p50_ms'], '.2f')} ms, p99 {_num(data['p99_ms'], '.2f')} ms, "
                f"{data['errors']} errors"
            )
    out: dict[str, Any] = {"rate": rate, "connections": connections}
    for key, found in runs.items():
        out[key] = {
            k: median([r[k] for r in found]) for k in ("rps", "p50_ms", "p99_ms", "p999_ms")
        } | {"errors": sum(int(r["errors"]) for r in found)}
    a99, c99 = out["a"]["p99_ms"], out["c"]["p99_ms"]
    out["added_p99_ms"] = c99 - a99 if a99 is not None and c99 is not None else None
    return out


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary(target: Target) -> dict[str, Any]:
    cpu_front = [c.get(target.front.name) for c in target.cpu_us]
    cpu_all = [sum(c.values()) if c else None for c in target.cpu_us]
    return {
        "label": target.label,
        "url": target.url,
        "rps": median([r.rps for r in target.runs]),
        "p50_ms": median([r.p50_ms for r in target.runs]),
        "p99_ms": median([r.p99_ms for r in target.runs]),
        "errors": sum(r.errors for r in target.runs),
        "requests": sum(r.requests for r in target.runs),
        "cpu_us_per_req": median(cpu_front),
        "cpu_us_per_req_all_servers": median(cpu_all),
        "rounds": [
            {
                "rps": r.rps,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "requests": r.requests,
                "errors": r.errors,
                "cpu_us_per_req": cpu,
                "detail": {k: v for k, v in r.detail.items() if k != "raw"},
            }
            for r, cpu in zip(target.runs, target.cpu_us, strict=True)
        ],
    }


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render(report: dict[str, Any]) -> str:
    lines = [
        "jitgate bench",
        f"  command:   {report['command']}",
        f"  date:      {report['date']}",
        f"  code:      {report['code'] or 'unknown (not a git checkout)'}",
        f"  loadgen:   {report['loadgen']}",
        f"  upstream:  {report['upstream']}",
        f"  load:      {report['duration_s']:g}s per run after {report['warmup_s']:g}s warm-up, "
        f"{report['connections']} connections, {report['rounds']} round(s)"
        + (", interleaved a,b,c,d; medians shown" if report["rounds"] > 1 else "")
        + ("" if report["audit_sinks"] == "full" else f"; (c) audit: {report['audit_sinks']}"),
        f"  request:   GET {PATH} ({report['body_bytes']} B JSON), "
        f"Authorization: Bearer <{USER}'s JWT: RS256 via JWKS for (c), HS256 for (d)>",
        f"  machine:   nproc {report['nproc']}, load average at start "
        + " ".join(f"{x:.2f}" for x in report["loadavg_start"]),
        f"  versions:  Python {report['python']}, aiohttp {report['aiohttp']}, "
        f"{report['redis_server']}",
        "",
        f"  {'':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'cpu us/req':>12}",
    ]
    for key, res in report["results"].items():
        lines.append(
            f"  {f'({key}) ' + res['label']:<34}{_num(res['rps'], '.0f'):>9}"
            f"{_num(res['p50_ms'], '.2f'):>9}{_num(res['p99_ms'], '.2f'):>9}"
            f"{res['errors']:>8}{_num(res['cpu_us_per_req'], '.0f'):>12}"
        )
    r = report["ratios"]
    lines += [
        "",
        f"  c/b req/s: {_num(r['c/b'], '.2f')} (target >= 1.0)    c/d req/s: "
        f"{_num(r['c/d'], '.2f')} (target >= 4)    c/a: {_num(r['c/a'], '.2f')}"
        f"    b/a: {_num(r['b/a'], '.2f')}",
    ]
    if report["rounds"] > 1:
        per_round = "   ".join(
            f"{k}: " + " ".join(f"{x['rps']:.0f}" for x in res["rounds"])
            for k, res in report["results"].items()
        )
        lines.append(f"  req/s per round: {per_round}")
    lines += [
        "  cpu us/req: CPU time of the server under test per request ((a) upstream,"
        " (b) pass-through, (c) jitgate, (d) naive);",
        "              all servers incl. upstream and redis: "
        + ", ".join(
            f"{k} {_num(res['cpu_us_per_req_all_servers'], '.0f')}"
            for k, res in report["results"].items()
        ),
    ]
    audit = report.get("audit")
    if audit:
        lines.append(
            f"  audit:     {audit['allow_records_in_file']} access.allow records in the JSONL "
            f"file, stream length {audit['stream_length']}, for "
            f"{audit['requests_sent']} requests completed against (c)"
        )
    checks = report.get("grant_checks") or {}
    if report["grant_view"] == "on":
        lines.append(
            f"  grants:    {checks.get('view', 0)} checks answered by jitgate's local view, "
            f"{checks.get('redis', 0)} by Redis"
        )
    else:
        lines.append("  grants:    every check asked Redis (--grant-view off)")
    scale = report.get("scale")
    if scale:
        small, large = scale["small"], scale["large"]
        lines.append(
            f"  scale:     (c) at 10,000 more routes and 1,000,000 other grants: "
            f"{_num(large['rps'], '.0f')} req/s, {_num(large['cpu_us_per_req'], '.0f')} us/req "
            f"against {_num(small['rps'], '.0f')} req/s, {_num(small['cpu_us_per_req'], '.0f')}"
            f" us/req (cpu x{_num(scale['cpu_ratio'], '.2f')}, target within 0.90-1.10)"
        )
    lat = report.get("latency")
    if lat:
        lines.append(
            f"  latency:   open loop at {lat['rate']:.0f} req/s (half of (c)'s), "
            f"{lat['connections']} connections, p50/p99/p99.9 ms: "
            f"(a) {_num(lat['a']['p50_ms'], '.2f')}/{_num(lat['a']['p99_ms'], '.2f')}/"
            f"{_num(lat['a']['p999_ms'], '.2f')}, "
            f"(c) {_num(lat['c']['p50_ms'], '.2f')}/{_num(lat['c']['p99_ms'], '.2f')}/"
            f"{_num(lat['c']['p999_ms'], '.2f')}; "
            f"added p99 {_num(lat['added_p99_ms'], '.2f')} ms (target <= 1 ms)"
        )
    lines.append(f"  results:   {report['results_file']}")
    return "\n".join(lines)


def start(args: argparse.Namespace, procs: Processes) -> tuple[LoadGen, str, list[float]]:
    """What every bench starts with: its load generator, redis-server, the load average."""
    loadgen = pick_loadgen(args.loadgen, procs, args.connections)
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise BenchError("redis-server is missing (Debian/Ubuntu: apt-get install redis-server)")
    return loadgen, redis_bin, list(os.getloadavg())


def load_report(
    args: argparse.Namespace, loadgen: LoadGen, upstream_kind: str, loadavg: list[float]
) -> dict[str, Any]:
    """The report fields every bench shares: the code, the load and the machine."""
    described = loadgen.describe()
    if isinstance(loadgen, Wrk):
        described += f", -d{loadgen.seconds(args.duration)}s"
    return {
        "code": code_revision(),
        "loadgen": described,
        "loadgen_kind": loadgen.name,
        "upstream": upstream_kind,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "rounds": args.rounds,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": loadavg,
    }


def code_revision() -> str | None:
    """Return the checked-out commit, marked if proxy/ differs from it; None outside git."""
    # --no-optional-locks: a read-only look must not rewrite the index.
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "proxy"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head} (proxy/ has uncommitted changes)" if dirty else head


def count_allow_records(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        return sum(1 for line in fh if b'"event":"access.allow"' in line)


# --- main ------------------------------------------------------------------------------


def load_parser(doc: str | None, rounds: int, rounds_help: str) -> argparse.ArgumentParser:
    """A parser with the load options every bench script shares."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each run (2)")
    p.add_argument("--connections", type=int, default=32, help="concurrent connections (32)")
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument(
        "--upstream",
        choices=("auto", "nginx", "aiohttp"),
        default="auto",
        help="nginx serving files (auto: when installed), or bench/upstream.py",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    return p


def parse_load(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv; the load options must be positive."""
    args = p.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        p.error("--duration, --connections and --rounds must be positive")
    return args


def _parser() -> argparse.ArgumentParser:
    p = load_parser(__doc__, 1, "interleaved rounds; medians shown")
    p.add_argument(
        "--audit",
        choices=tuple(AUDIT_SECTIONS),
        default="full",
        help="(c)'s audit sinks: full (Redis stream and file, as deployed), redis, file, or "
        "none (no record anywhere: only to see what the audit costs)",
    )
    p.add_argument(
        "--grant-view",
        choices=("on", "off"),
        default="on",
        help="(c)'s redis.local_view: grant checks answered from memory (on), or Redis always",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample jitgate with py-spy during (c)'s runs; collapsed stacks to this file",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="then run (c) again with 10,000 more policy routes and 1,000,000 other grants",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="then send at a constant rate of half (c)'s req/s to (a) and (c), open loop "
        "(bench/loadgen.py --rate), and report the latency (c) adds",
    )
    return p


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    # SIGTERM must unwind through the finally blocks like Ctrl-C does.
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> dict[str, Any]:
    loadgen, redis_bin, loadavg = start(args, procs)
    redis_version = subprocess.run(
        [redis_bin, "--version"], capture_output=True, text=True, check=False
    ).stdout.split(" sha=")[0]
    started = datetime.now().astimezone()
    up_port, pass_port, jit_port, naive_port, redis_port = free_ports(5)
    upstream_url = f"http://{HOST}:{up_port}"
    log(f"bench: temp dir {tmp}, load generator {loadgen.name}")

    redis = start_redis(procs, tmp, redis_bin, redis_port)
    www = tmp / "www"
    want = write_www(www)
    key = make_key(www)
    upstream_kind = start_upstream(args.upstream, procs, tmp, www, up_port)
    upstream = procs.servers[-1]
    passthrough = procs.start(
        "passthrough",
        [sys.executable, str(BENCH / "passthrough.py"), "--port", str(pass_port),
         "--upstream", upstream_url],
    )  # fmt: skip
    naive = procs.start(
        "naive",
        [sys.executable, str(BENCH / "naive.py"), "--port", str(naive_port),
         "--upstream", upstream_url, "--redis-port", str(redis_port), "--secret", SECRET],
    )  # fmt: skip
    wait_http(upstream, f"{upstream_url}/healthz")  # jitgate fetches its keys at start
    cfg = write_config(
        tmp,
        port=jit_port,
        upstream_url=upstream_url,
        redis_port=redis_port,
        audit=args.audit,
        grant_view=args.grant_view == "on",
    )
    jitgate = procs.start(
        "jitgate", [*jitgate_command(), "serve", "--config", str(cfg)], env=jitgate_env()
    )
    wait_http(passthrough, f"http://{HOST}:{pass_port}/healthz")
    wait_http(jitgate, f"http://{HOST}:{jit_port}/_jit/healthz")

    # Long enough for the whole run, however many rounds were asked for.
    seconds = max(3600, math.ceil(4 * args.rounds * (args.warmup + args.duration + 5)))
    grant_id = jitgate_cli(
        "grants", "add", "--config", str(cfg), "--user", USER, "--scope", SCOPE,
        "--ttl", f"{seconds}s", "--reason", "bench", "--by", "bench/run.py",
    )  # fmt: skip
    redis_command(redis_port, "SET", f"naive:grant:{USER}:{SCOPE}", "1", "EX", str(seconds))
    log(f"bench: grant {grant_id} for {USER} on {SCOPE}; tokens minted")
    rs256 = {"Authorization": f"Bearer {mint(key, seconds)}"}
    hs256 = {"Authorization": f"Bearer {mint(SECRET, seconds)}"}
    naive_url = f"http://{HOST}:{naive_port}{PATH}"
    wait_http(naive, naive_url, headers=hs256)

    targets = [
        Target("a", "upstream (direct)", f"{upstream_url}{PATH}", upstream, rs256),
        Target("b", "aiohttp pass-through", f"http://{HOST}:{pass_port}{PATH}", passthrough, rs256),
        Target(
            "c", "jitgate (full enforcement)", f"http://{HOST}:{jit_port}{PATH}", jitgate, rs256
        ),
        Target("d", "naive check (yardstick)", naive_url, naive, hs256),
    ]
    for target in targets:
        check_target(target, target.headers, want)
    # Every bench server, for the CPU-per-request figures.
    servers = [upstream, passthrough, jitgate, naive, redis]

    sent_to_c = 0
    for rnd in range(1, args.rounds + 1):
        for target in targets:
            if args.warmup > 0:
                warm = loadgen.run(target.url, target.headers, args.warmup)
                if target.key == "c":
                    sent_to_c += warm.requests
            before = {s.name: cpu_seconds(s.proc.pid) for s in servers}
            spy = None
            if args.profile and target.key == "c":
                spy = profile(procs, jitgate, args.profile, args.duration)
            result = loadgen.run(target.url, target.headers, args.duration)
            if spy is not None:
                spy.wait(timeout=args.duration + 30)
            after = {s.name: cpu_seconds(s.proc.pid) for s in servers}
            for server in servers:
                if server.proc.poll() is not None:
                    raise BenchError(f"{server.name} died during the run:\n{tail(server.log_file)}")
            cpu: dict[str, float] = {}
            for name, t0 in before.items():
                t1 = after[name]
                if t0 is not None and t1 is not None and result.requests:
                    cpu[name] = (t1 - t0) / result.requests * 1e6
            target.runs.append(result)
            target.cpu_us.append(cpu)
            if target.key == "c":
                sent_to_c += result.requests
            log(
                f"round {rnd}/{args.rounds} ({target.key}) {target.label}: "
                f"{result.rps:.0f} req/s, p50 {_num(result.p50_ms, '.2f')} ms, "
                f"p99 {_num(result.p99_ms, '.2f')} ms, {result.errors} errors"
            )
            # Let the audit flusher and the sockets in TIME_WAIT settle between runs.
            time.sleep(0.5)

    scale = None
    if args.scale:
        # (c) again, right before and right after adding 10,000 policy routes ahead of the
        # matching one and 1,000,000 other users' active grants, so that both sides see the
        # same audit trail and Redis: per-request cost should not move.
        def measure(label: str) -> Target:
            t = Target("c", label, targets[2].url, jitgate, rs256)
            for _ in range(args.rounds):
                if args.warmup > 0:
                    loadgen.run(t.url, t.headers, args.warmup)
                before = cpu_seconds(jitgate.proc.pid)
                result = loadgen.run(t.url, t.headers, args.duration)
                after = cpu_seconds(jitgate.proc.pid)
                t.runs.append(result)
                if before is not None and after is not None and result.requests:
                    t.cpu_us.append({"jitgate": (after - before) / result.requests * 1e6})
                log(f"scale ({label}): {result.rps:.0f} req/s, p99 {_num(result.p99_ms, '.2f')} ms")
            return t

        small = summary(measure("repo policy"))
        text = scale_policy((tmp / "policy.yaml").read_text(), 10_000)
        (tmp / "policy.yaml").write_text(text)  # jitgate's watcher reloads it
        wait_policy(f"http://{HOST}:{jit_port}/_jit/metrics", text)
        add_other_grants(redis_port, 1_000_000)
        log("bench: scale state in place: 10,000 more routes, 1,000,000 other grants")
        big = measure("10k routes, 1M grants")
        large = summary(big)
        scale = {
            "small": {"routes": "repo policy", "other_grants": 0, **_brief(small)},
            "large": {"routes": "+10,000", "other_grants": 1_000_000, **_brief(large)},
            "cpu_ratio": ratio(large["cpu_us_per_req"], small["cpu_us_per_req"]),
            "rps_ratio": ratio(large["rps"], small["rps"]),
        }

    latency = None
    if args.latency:
        latency = constant_rate(procs, targets[0], targets[2], summary(targets[2])["rps"] / 2, args)

    time.sleep(1.0)  # jitgate's audit flush interval is 0.25 s
    stream_len = redis_command(redis_port, "XLEN", "jit:audit").lstrip(b":").decode()
    _, text = http_get(f"http://{HOST}:{jit_port}/_jit/metrics")
    checks = {
        m[1]: int(float(m[2]))
        for m in re.finditer(rb'jitgate_grant_checks_total\{answer="(\w+)"\} (\S+)', text)
    }
    results = {t.key: summary(t) for t in targets}
    rps = {k: v["rps"] for k, v in results.items()}
    return {
        "command": shlex.join(sys.orig_argv),
        "argv": sys.orig_argv,
        "date": started.isoformat(timespec="seconds"),
        **load_report(args, loadgen, upstream_kind, loadavg),
        "audit_sinks": args.audit,
        "grant_view": args.grant_view,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_server": redis_version,
        "path": PATH,
        "body_bytes": len(want),
        "results": results,
        "ratios": {
            "c/b": ratio(rps["c"], rps["b"]),
            "c/d": ratio(rps["c"], rps["d"]),
            "c/a": ratio(rps["c"], rps["a"]),
            "b/a": ratio(rps["b"], rps["a"]),
        },
        "audit": {
            "allow_records_in_file": count_allow_records(tmp / "audit.jsonl"),
            "stream_length": int(stream_len) if stream_len.isdigit() else None,
            "requests_sent": sent_to_c,
        },
        "grant_checks": {k.decode(): v for k, v in checks.items()},
        "scale": scale,
        "latency": latency,
        "results_file": str(RESULTS_FILE.relative_to(ROOT)),
    }


def run_bench(
    measure: Callable[[Path, Processes], dict[str, Any]], prefix: str
) -> dict[str, Any] | int:
    """measure(tmp, procs) in a fresh directory; every server stopped whatever happens.

    Returns the report, or the exit code of a failed (1) or interrupted (130) run.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    try:
        with _terminate_as_exit():
            try:
                return measure(tmp, procs)
            finally:
                # A second Ctrl-C must not cut the cleanup short and leave servers behind.
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    procs.stop_all()  # jitgate flushes its audit queue on SIGTERM
                finally:
                    signal.signal(signal.SIGINT, previous)
    except BenchError as exc:
        log(f"bench: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_load(_parser(), argv)
    report = run_bench(lambda tmp, procs: bench(args, tmp, procs), "jitgate-bench-")
    if isinstance(report, int):
        return report
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
