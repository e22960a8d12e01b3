"""The README walk-through, run for real: `make demo`'s launcher, the CLI and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from waiting import eventually_sync

JITGATE = str(Path(sys.executable).parent / "jitgate")
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError:
        return 0, b""


@pytest.fixture
def demo() -> Iterator[tuple[str, dict[str, str]]]:
    with running_demo() as running:
        yield running


@contextmanager
def running_demo(**overrides: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Run `make demo`'s launcher (with JITGATE_* overrides) until it is ready; yield its
    base URL and the environment the CLI needs to reach it."""
    state = Path(tempfile.mkdtemp(prefix="jg-", dir="/tmp"))
    port, up_port = free_port(), free_port()
    env = {
        **os.environ,
        "JITGATE_LISTEN__PORT": str(port),
        "JITGATE_UPSTREAM__URL": f"http://127.0.0.1:{up_port}",
        "JITGATE_STATE_DIR": str(state),
        "JITGATE_AUDIT__FILE": str(state / "audit.jsonl"),
        **overrides,
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "demo" / "launch.py")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            return get(f"{base}/_jit/readyz")[0] == 200

        eventually_sync(ready, within=30, interval=0.2, what="the demo to become ready")
        yield base, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        # The embedded redis-server must be gone with jitgate.
        pidfile = state / "redis.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            if pid and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
                pytest.fail("embedded redis-server outlived jitgate")


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([JITGATE, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_readme_walkthrough(demo: tuple[str, dict[str, str]]) -> None:
    base, env = demo
    token = cli(env, "token", "mint", "--sub", "alice")
    assert token.count(".") == 2

    assert get(base + SNAPSHOTS, token)[0] == 403
    grant_id = cli(
        env, "grants", "add", "--user", "alice", "--scope", "recording:1/demo-1",
        "--ttl", "5m", "--reason", "ticket 42",
    )  # fmt: skip
    assert grant_id.startswith("g-")
    status, body = get(base + SNAPSHOTS, token)
    assert status == 200
    events = json.loads(body)["snapshots"]
    assert events[0]["type"] == 4 and events[1]["type"] == 2

    listed = json.loads(cli(env, "grants", "list", "--user", "alice", "--json"))
    assert [g["id"] for g in listed] == [grant_id]
    assert "ticket 42" in cli(env, "grants", "list")

    cli(env, "grants", "revoke", grant_id)
    assert get(base + SNAPSHOTS, token)[0] == 403

    # Self-service, as the quick start shows it.
    other = SNAPSHOTS.replace("demo-1", "demo-2")
    assert get(base + other, token)[0] == 403
    out = cli(
        env, "grants", "request", "--token", token, "--scope", "recording:1/demo-2",
        "--reason", "checking ticket 42", "--duration", "15m",
    )  # fmt: skip
    assert out.split()[1] == "active"
    assert get(base + other, token)[0] == 200

    # The trail so far (jitgate and the two CLI writers) verifies clean; jitgate is still
    # running, so its open tail is only a warning.
    trail = env["JITGATE_AUDIT__FILE"]
    verified = eventually_sync(  # once the audit batch has reached the file
        lambda: "3 writers: clean" in cli(env, "audit", "verify", "--file", trail),
        what="the trail to verify clean",
    )
    assert verified
    # The replay app's list needs only an identity; a recording's player page, its grant.
    assert get(base + "/", token)[0] == 200
    assert get(base + "/replay/demo-2", token)[0] == 200
    assert get(base + "/replay/demo-1", token)[0] == 403


def test_grants_survive_a_restart_of_jitgate_and_its_redis(
    demo: tuple[str, dict[str, str]],
) -> None:
    base, env = demo
    grant_id = cli(
        env, "grants", "add", "--user", "bob", "--scope", "project:1", "--ttl", "1h",
        "--reason", "INC-7",
    )  # fmt: skip
    pid = int((Path(env["JITGATE_STATE_DIR"]) / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # the supervisor restarts it from the AOF

    def answered() -> str | None:  # the JSON text: "[]" too is an answer
        try:
            return cli(env, "grants", "list", "--json")
        except AssertionError:  # redis not back yet
            return None

    listed = json.loads(eventually_sync(answered, interval=0.3, what="redis to be back"))
    assert [g["id"] for g in listed] == [grant_id]
    token = cli(env, "token", "mint", "--sub", "bob")
    assert get(base + SNAPSHOTS, token)[0] == 200
