"""`jitgate policy explain` and `jitgate policy test`, run as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from conftest import ROOT, free_port, write_config
from redis.asyncio import Redis

from proxy.authorize import Authorizer
from proxy.grantstore import RedisGrants
from proxy.identity import Caller, IdentityError, Verifier
from proxy.policyfile import load
from proxy.policytest import SimulatedGrants
from proxy.settings.identity import IdentitySettings

JITGATE = str(Path(sys.executable).parent / "jitgate")
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
SHIPPED_TESTS = ROOT / "config" / "policy.tests.yaml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JITGATE, *args], capture_output=True, text=True, env={"PATH": "/usr/bin"}, timeout=30
    )


def explain(cfg: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run("policy", "explain", "--config", cfg, *args)


def fields(stdout: str) -> dict[str, list[str]]:
    """Parse explain's `key  value` lines; a key may repeat (grants, reason)."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def offline_config(tmp_path: Path) -> str:
    """A config whose embedded Redis is not running: only --no-redis or grant-free routes work."""
    return str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=None))


async def add_grant(redis_url: str, user: str, scope: str, reason: str) -> str:
    redis = Redis.from_url(redis_url)
    try:
        grant = await RedisGrants(redis).add(user, scope, 600, reason, "test")
    finally:
        await redis.aclose()
    return grant.id


# --- explain ------------------------------------------------------------------------------


async def test_explain_allow_lists_the_covering_grants(tmp_path: Path, redis_url: str) -> None:
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=redis_url))
    narrow = await add_grant(redis_url, "alice", "recording:1/demo-1", "ticket 42")
    wide = await add_grant(redis_url, "alice", "project:1", "INC-7")
    other = await add_grant(redis_url, "alice", "project:2", "elsewhere")
    tricky = "/static/%2e%2e" + SNAPSHOTS + "?x=1"
    out = explain(cfg, "--user", "alice", "--groups", "oncall,sre", "GET", tricky)
    assert out.returncode == 0, out.stderr
    f = fields(out.stdout)
    assert f["path"] == [SNAPSHOTS]
    assert f["user"] == ["alice (groups: oncall, sre)"]
    assert f["route"] == ["recording (protected)"]
    assert f["scope"] == ["recording:1/demo-1"] and f["covered by"] == ["project:1"]
    assert [g.split()[:2] for g in f["grants"]] == [
        [narrow, "recording:1/demo-1"],
        [wide, "project:1"],
    ]  # narrowest first; the project:2 grant is not looked at
    assert "ticket 42" in f["grants"][0] and other not in out.stdout
    assert f["decision"] == ["allow"]
    assert f["reason"] == [f"active grant {narrow} covers recording:1/demo-1"]


async def test_explain_deny_and_json(tmp_path: Path, redis_url: str) -> None:
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=redis_url))
    await add_grant(redis_url, "alice", "recording:1/demo-1", "ticket 42")
    sibling = SNAPSHOTS.replace("demo-1", "demo-2")
    out = explain(cfg, "--user", "alice", "GET", sibling)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["decision"] == ["deny (403)"]
    assert f["grants"] == ["none active for these scopes"]
    assert f["reason"] == ["no active grant for recording:1/demo-2 (or project:1)"]

    out = explain(cfg, "--user", "alice", "--json", "head", SNAPSHOTS)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["method"] == "HEAD" and got["decision"] == "allow" and got["allow"] is True
    assert got["covering_scopes"] == ["recording:1/demo-1", "project:1"]
    assert [g["scope"] for g in got["grants"]] == ["recording:1/demo-1"]
    assert got["grant_id"] == got["grants"][0]["id"] and got["grants"][0]["reason"] == "ticket 42"
    assert got["policy"]["version"] == load(tmp_path / "policy.yaml").version


def test_explain_without_grants_needed_does_not_touch_redis(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    share = "/api/projects/1/session_recordings/demo-1/sharing"
    out = explain(cfg, "--user", "bob", "POST", share)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["route"] == ["recording-share (blocked)"] and f["decision"] == ["blocked (403)"]

    out = explain(cfg, "GET", SNAPSHOTS)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["user"] == ["(anonymous)"] and f["decision"] == ["unauthenticated (401)"]
    assert f["reason"] == ["no credentials"] and f["scope"] == ["recording:1/demo-1"]

    out = explain(cfg, "--user", "alice", "GET", "/dashboard")
    assert out.returncode == 0, out.stderr
    assert fields(out.stdout)["route"] == ["_default (identity)"]

    out = explain(cfg, "GET", "/static/app.css")
    assert out.returncode == 0 and fields(out.stdout)["reason"] == ["public route"]


def test_explain_refused_path_is_400(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    bad = "/api/projects/1/session_recordings/demo-1%2Fsnapshots"
    out = explain(cfg, "--user", "alice", "GET", bad)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["path"] == ["(refused)"] and f["decision"] == ["bad_request (400)"]
    assert f["reason"] == ["encoded '/' is not allowed in paths"]
    got = json.loads(explain(cfg, "--json", "GET", bad).stdout)
    assert got["path"] is None and got["route"] == "_invalid" and got["status"] == 400


def test_explain_no_redis_says_what_is_needed(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    out = explain(cfg, "--user", "alice", "GET", SNAPSHOTS)
    assert out.returncode == 2
    assert "embedded Redis is not running" in out.stderr and "--no-redis" in out.stderr

    out = explain(cfg, "--user", "alice", "--no-redis", "GET", SNAPSHOTS)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["grants"] == ["not checked (--no-redis)"]
    assert f["reason"] == [
        "needs an active grant for recording:1/demo-1 or project:1 (not checked: --no-redis)"
    ]
    out = explain(cfg, "--user", "alice", "--no-redis", "--json", "GET", SNAPSHOTS)
    got = json.loads(out.stdout)
    assert out.returncode == 1 and got["decision"] == "needs_grant" and got["grants"] is None


def test_explain_redis_down_fails_closed(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = str(write_config(tmp_path, upstream_url="http://127.0.0.1:1", redis_url=dead))
    out = explain(cfg, "--user", "alice", "GET", SNAPSHOTS)
    assert out.returncode == 1, out.stderr
    f = fields(out.stdout)
    assert f["decision"] == ["unavailable (503)"]
    assert f["grants"] == ["not listed: grant store unavailable"]


def test_explain_prefix_and_usage_errors(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    out = explain(cfg, "GET", "/_JIT/metrics")
    assert out.returncode == 1
    assert fields(out.stdout)["decision"] == ["not_forwarded"]
    assert explain(cfg, "G:T", "/").returncode == 2
    assert explain(cfg, "GET").returncode == 2


# --- policy test --------------------------------------------------------------------------


def test_shipped_policy_tests_pass() -> None:
    out = run("policy", "test", str(SHIPPED_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert len(lines) - 1 >= 20 and lines[-1] == f"{len(lines) - 1} passed, 0 failed"
    report = json.loads(run("policy", "test", str(SHIPPED_TESTS), "--json").stdout)
    assert report["failed"] == 0 and report["passed"] == len(lines) - 1
    outcomes = {c["got"]["decision"] for c in report["cases"]}
    assert outcomes == {"allow", "deny", "blocked", "unauthenticated", "bad_request"}


def test_failing_case_exits_1_and_names_it(tmp_path: Path) -> None:
    cases = tmp_path / "t.yaml"
    cases.write_text(
        f"""policy: {ROOT / "config" / "policy.yaml"}
cases:
  - name: health is public
    request: GET /healthz
    expect: allow
  - name: sharing is fine, surely
    request: POST /api/projects/1/session_recordings/demo-1/sharing
    user: alice
    grants: ["project:1"]
    expect: allow
    expect_route: recording
"""
    )
    out = run("policy", "test", str(cases))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "PASS health is public",
        "FAIL sharing is fine, surely: expected allow, got blocked; expected route recording, "
        "got recording-share (route 'recording-share' is blocked by policy)",
        "1 passed, 1 failed",
    ]
    report = json.loads(run("policy", "test", str(cases), "--json").stdout)
    assert report["failed"] == 1 and report["cases"][1]["line"] == 6


def test_policy_defaults_to_the_file_beside_and_can_be_overridden(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("default: public\nroutes: []\n")
    cases = tmp_path / "t.yaml"
    cases.write_text("cases:\n  - {name: open, request: GET /replay/x, expect: allow}\n")
    out = run("policy", "test", str(cases))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("policy", "test", str(cases), "--policy", str(ROOT / "config" / "policy.yaml"))
    assert out.returncode == 1
    assert "FAIL open: expected allow, got unauthenticated (no credentials)" in out.stdout


def test_invalid_test_file_reports_file_line(tmp_path: Path) -> None:
    cases = tmp_path / "t.yaml"
    cases.write_text(
        f"""policy: {ROOT / "config" / "policy.yaml"}
cases:
  - name: ok
    request: GET /healthz
    expect: allow
  - name: typo
    request: GET /healthz
    expcet: allow
  - name: bad expect
    request: GET /healthz
    expect: permit
  - name: no method
    request: /healthz
    grants: [project:1]
    expect: allow
  - name: ok
    request: GET /healthz
    expect: allow
    expect_status: "200"
"""
    )
    out = run("policy", "test", str(cases))
    assert out.returncode == 1
    t = str(cases)
    assert out.stderr.splitlines() == [
        f"error: {t}:8: cases[1].expcet: unknown field (known: body, description, entitlement, "
        "expect, expect_route, expect_scope, expect_status, grants, groups, metadata, name, "
        "request, user)",
        f"error: {t}:6: cases[1].expect: must be one of allow, deny, blocked, unauthenticated, "
        "bad_request; missing",
        f"error: {t}:11: cases[2].expect: must be one of allow, deny, blocked, unauthenticated, "
        "bad_request; got 'permit'",
        f"error: {t}:13: cases[3].request: must be 'METHOD TARGET', e.g. 'GET /x'",
        f"error: {t}:14: cases[3].grants: an anonymous request holds no grants",
        f"error: {t}:19: cases[4].expect_status: must be an integer",
    ]
    assert out.stdout == ""


def test_invalid_yaml_policy_or_missing_file_exit_1(tmp_path: Path) -> None:
    cases = tmp_path / "t.yaml"
    cases.write_text("cases:\n  - name: x\n    request: [GET\n")
    out = run("policy", "test", str(cases))
    assert out.returncode == 1 and f"{cases}:4: invalid YAML" in out.stderr
    cases.write_text("cases:\n  - {name: x, request: GET /, expect: allow}\nextra: 1\n")
    out = run("policy", "test", str(cases))
    assert out.returncode == 1
    assert f"{cases}:3: extra: unknown field (known: cases, policy)" in out.stderr
    cases.write_text("cases:\n  - {name: x, request: GET /, expect: allow}\n")
    (tmp_path / "policy.yaml").write_text("routes:\n  - id: x\n    path: /a\n    access: maybe\n")
    out = run("policy", "test", str(cases))
    assert out.returncode == 1
    assert f"{tmp_path / 'policy.yaml'}:4: routes[0].access: must be one of" in out.stderr
    out = run("policy", "test", str(tmp_path / "missing.yaml"))
    assert out.returncode == 1 and "cannot read" in out.stderr


def test_policy_check_good_and_bad(tmp_path: Path) -> None:
    out = run("policy", "check", str(ROOT / "config" / "policy.yaml"))
    assert out.returncode == 0 and "6 routes" in out.stdout
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nroutes:\n  - id: x\n    path: /a\n    colour: red\n")
    out = run("policy", "check", str(bad))
    assert out.returncode == 1 and f"{bad}:5: routes[0].colour: unknown field" in out.stderr


# --- the split decision, in process -------------------------------------------------------


async def test_a_bad_token_still_decides_public_and_blocked_routes_first() -> None:
    auth = Authorizer(
        load(ROOT / "config" / "policy.yaml"), SimulatedGrants("alice", ["project:1"])
    )
    verifier = Verifier(IdentitySettings())
    asked: list[str] = []

    def caller(headers: dict[str, str]) -> Callable[[], Awaitable[Caller]]:
        async def identify() -> Caller:
            asked.append("identify")
            try:
                found = await verifier.identify(headers, {}, None)
            except IdentityError as exc:
                return Caller(None, str(exc))
            return Caller(found, "" if found else verifier.no_identity_reason(headers, None))

        return identify

    junk = caller({"Authorization": "Bearer not-a-jwt"})
    public = await auth.decide("GET", "/static/a.js", junk)
    assert public.allow and public.identity is None
    share = "/api/projects/1/session_recordings/demo-1/sharing"
    assert (await auth.decide("POST", share, junk)).outcome == "blocked"
    assert asked == []  # neither route asked who the caller is
    refused = await auth.decide("GET", SNAPSHOTS, junk)
    assert (refused.status, refused.reasons) == (401, ("malformed token",))
    assert (await auth.decide("GET", SNAPSHOTS, caller({}))).reasons == ("no credentials",)
    assert asked == ["identify", "identify"]


async def test_simulated_grants_only_answer_for_their_user() -> None:
    grants = SimulatedGrants("alice", ["project:1"])
    assert await grants.check("alice", ("recording:1/x", "project:1")) == (
        "sim:project:1",
        float("inf"),
    )
    assert await grants.check("bob", ("recording:1/x", "project:1")) is None
    assert await grants.check("alice", ("project:2",)) is None
