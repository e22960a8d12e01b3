"""The `jitgate` command line, run as a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jwt
import redis as redis_sync
from conftest import ROOT, SECRET, write_config
from waiting import eventually_sync

JITGATE = str(Path(sys.executable).parent / "jitgate")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JITGATE, *args], capture_output=True, text=True, env={"PATH": "/usr/bin"}
    )


def test_check_ok_on_the_example_config() -> None:
    out = run("check", "--config", str(ROOT / "config" / "jitgate.yaml"))
    assert out.returncode == 0, out.stderr
    assert "policy version" in out.stdout


def test_check_reports_every_error_with_file_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None)
    cfg.write_text(cfg.read_text().replace("connect_timeout: 2", "connect_timeout: soon"))
    (tmp_path / "policy.yaml").write_text(
        "routes:\n  - id: x\n    path: /a/{p}\n    scope: 'r:{q}'\n"
    )
    out = run("check", "--config", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}:3: upstream.connect_timeout: must be a number" in out.stderr
    out = run("policy", "check", str(tmp_path / "policy.yaml"))
    assert out.returncode == 1
    assert f"{tmp_path / 'policy.yaml'}:4: routes[0].scope: unknown parameter {{q}}" in out.stderr


def test_usage_errors_exit_2() -> None:
    assert run("grants").returncode == 2
    assert run("frobnicate").returncode == 2


def test_token_mint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None)
    out = run("token", "mint", "--config", str(cfg), "--sub", "alice", "--groups", "eng,sre")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"], audience="jitgate")
    assert claims["sub"] == "alice" and claims["groups"] == ["eng", "sre"]
    cfg.write_text(cfg.read_text().replace(f"  dev_key: {SECRET}\n", ""))
    out = run("token", "mint", "--config", str(cfg), "--sub", "alice")
    assert out.returncode == 2
    assert "no dev signing key" in out.stderr


def test_grants_add_list_revoke_with_audit(tmp_path: Path, redis_url: str) -> None:
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=redis_url))
    out = run("grants", "add", "--config", cfg, "--user", "alice", "--scope", "project:1",
              "--ttl", "10m", "--reason", "INC-1", "--by", "secops")  # fmt: skip
    assert out.returncode == 0, out.stderr
    grant_id = out.stdout.strip()
    table = run("grants", "list", "--config", cfg).stdout.splitlines()
    assert table[0].split() == ["ID", "USER", "SCOPE", "STATE", "EXPIRES", "(UTC)", "LEFT",
                                "GRANTED", "BY", "REASON"]  # fmt: skip
    assert table[1].startswith(grant_id) and "secops" in table[1] and "INC-1" in table[1]
    assert (
        json.loads(run("grants", "list", "--config", cfg, "--user", "bob", "--json").stdout) == []
    )
    out = run("grants", "revoke", "--config", cfg, grant_id, "--comment", "done")
    assert out.returncode == 0 and grant_id in out.stdout
    out = run("grants", "revoke", "--config", cfg, grant_id)
    assert out.returncode == 1 and "no active grant" in out.stderr
    with redis_sync.Redis.from_url(redis_url) as r:
        events = [json.loads(e[1][b"record"]) for e in r.xrange("jit:audit")]
    assert [e["event"] for e in events] == ["grant.activated", "grant.revoked"]
    assert events[0]["actor"] == "secops" and events[0]["reason"] == "INC-1"
    assert all(e["policy_version"] for e in events)
    assert events[1]["comment"] == "done" and events[1]["grant_id"] == grant_id
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [e["id"] for e in events]


def test_grants_add_rejects_bad_input(tmp_path: Path, redis_url: str) -> None:
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=redis_url))
    base = ["grants", "add", "--config", cfg, "--user", "a", "--scope", "project:1"]
    out = run(*base, "--ttl", "soon", "--reason", "x")
    assert out.returncode == 2 and "invalid duration" in out.stderr
    out = run(*base, "--ttl", "30d", "--reason", "x")
    assert out.returncode == 2 and "grant_max_ttl" in out.stderr
    out = run(*base, "--ttl", "1h", "--reason", "  ")
    assert out.returncode == 2
    with redis_sync.Redis.from_url(redis_url) as r:
        assert r.keys("jit:*") == []


def test_grants_without_running_embedded_redis_says_so(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None))
    out = run("grants", "list", "--config", cfg)
    assert out.returncode == 2
    assert "embedded Redis is not running" in out.stderr


def test_serve_refuses_to_start_with_a_bad_policy(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None)
    (tmp_path / "policy.yaml").write_text("routes:\n  - id: x\n    path: /a\n    access: maybe\n")
    out = subprocess.run(
        [JITGATE, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1
    assert f"{tmp_path / 'policy.yaml'}:4: routes[0].access: must be one of" in out.stderr


def test_serve_without_redis_server_says_how_to_get_it(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None)
    empty = tmp_path / "bin"
    empty.mkdir()
    out = subprocess.run(
        [JITGATE, "serve", "--config", str(cfg)],
        capture_output=True, text=True, timeout=30, env={"PATH": str(empty)},
    )  # fmt: skip
    assert out.returncode == 2
    assert "redis-server not found on PATH: install it" in out.stderr
    assert "apt-get install redis-server" in out.stderr


def test_serve_says_what_serves_and_freezes_start_up_objects(
    tmp_path: Path, redis_url: str
) -> None:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=redis_url)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([JITGATE, "serve", "--config", str(cfg)], stderr=out)

    def started() -> str | None:
        text = log.read_text()
        return text if "frozen for the garbage" in text else None

    try:
        text = eventually_sync(started, what="jitgate to finish starting")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "using the uvloop event loop" in text
    assert "using aiohttp's C HTTP parser (llhttp)" in text
    frozen = re.search(r"start-up objects frozen for the garbage collector: (\d+)", text)
    assert frozen is not None and int(frozen[1]) > 10_000
