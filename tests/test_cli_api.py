"""`jitgate grants ...` as a user, through the API of a running proxy (real processes)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Upstream, demo_policy, make_token
from test_api import ENTITLEMENTS

from proxy.state import STATE

JITGATE = str(Path(sys.executable).parent / "jitgate")
SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"


@pytest.fixture
async def proxy_api(make_proxy: Any) -> TestClient:
    client: TestClient = await make_proxy(
        policy_text=demo_policy(ENTITLEMENTS), extra="admins: {groups: [security]}"
    )
    return client


async def jg(client: TestClient, user: str, groups: list[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI as a separate process, acting as `user` through the proxy's API."""
    cfg = str(client.app[STATE].settings.file)
    url = str(client.make_url("")).rstrip("/")
    token = make_token(user, groups=groups or None)
    proc = await asyncio.create_subprocess_exec(
        JITGATE, "grants", *args, "--config", cfg, "--url", url, "--token", token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_request_approve_use_relinquish_from_the_cli(
    proxy_api: TestClient, upstream: Upstream
) -> None:
    code, out, err = await jg(
        proxy_api, "alice", ["eng"], "request", "--scope", "project:1", "--reason", "bug 7",
        "--ticket", "INC-7", "--duration", "15m",
    )  # fmt: skip
    assert code == 0, err
    grant_id, state = out.split()
    assert grant_id.startswith("g-") and state == "pending"

    code, out, _ = await jg(proxy_api, "bob", ["approvers"], "list", "--pending")
    assert code == 0 and grant_id in out and "pending" in out
    code, _, err = await jg(proxy_api, "alice", ["eng", "approvers"], "approve", grant_id)
    assert code == 1 and "self_approval" in err
    for approver in ("bob", "carol"):
        code, out, err = await jg(
            proxy_api, approver, ["approvers"], "approve", grant_id, "--comment", "ok"
        )
        assert code == 0, err
    assert out.split() == [grant_id, "active"]
    token = make_token("alice")
    assert (
        await proxy_api.get(SNAPSHOTS, headers={"Authorization": f"Bearer {token}"})
    ).status == 200

    code, out, _ = await jg(proxy_api, "alice", [], "show", grant_id, "--json")
    shown = json.loads(out)
    assert shown["state"] == "active" and [a["by"] for a in shown["approvals"]] == ["bob", "carol"]
    code, out, _ = await jg(proxy_api, "alice", [], "list")
    assert grant_id in out and "active" in out

    code, out, err = await jg(proxy_api, "alice", [], "relinquish", grant_id, "--comment", "done")
    assert code == 0 and out.split() == [grant_id, "relinquished"], err
    assert (
        await proxy_api.get(SNAPSHOTS, headers={"Authorization": f"Bearer {token}"})
    ).status == 403


async def test_deny_revoke_and_admin_listing(proxy_api: TestClient) -> None:
    _, out, _ = await jg(
        proxy_api, "alice", ["eng"], "request", "--scope", "project:2", "--reason", "x",
        "--ticket", "SUP-1",
    )  # fmt: skip
    pending_id = out.split()[0]
    code, out, _ = await jg(proxy_api, "bob", ["approvers"], "deny", pending_id)
    assert code == 0 and out.split() == [pending_id, "denied"]

    _, out, _ = await jg(
        proxy_api, "mallory", [], "request", "--scope", "recording:1/demo-1", "--reason", "x"
    )
    active_id = out.split()[0]
    code, _, err = await jg(proxy_api, "mallory", [], "revoke", active_id)
    assert code == 1 and "not_admin" in err
    code, out, _ = await jg(proxy_api, "sam", ["security"], "revoke", active_id)
    assert code == 0 and out.split() == [active_id, "revoked"]

    code, out, _ = await jg(proxy_api, "sam", ["security"], "list", "--all", "--json")
    states = {g["id"]: g["state"] for g in json.loads(out)}
    assert states == {pending_id: "denied", active_id: "revoked"}
    code, _, err = await jg(proxy_api, "mallory", [], "list", "--all")
    assert code == 1 and "not_admin" in err


async def test_cli_reports_bad_input_and_unreachable_proxy(proxy_api: TestClient) -> None:
    code, _, err = await jg(
        proxy_api, "mallory", [], "request", "--scope", "recording:1/demo-1", "--reason", "x",
        "--duration", "3h",
    )  # fmt: skip
    assert code == 2 and "duration must be one of" in err
    cfg = str(proxy_api.app[STATE].settings.file)
    proc = await asyncio.create_subprocess_exec(
        JITGATE, "grants", "approve", "g-1", "--config", cfg, "--url", "http://127.0.0.1:9",
        "--token", make_token("bob"), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_b = await proc.communicate()
    assert proc.returncode == 2 and b"cannot reach jitgate" in err_b
    proc = await asyncio.create_subprocess_exec(
        JITGATE, "grants", "approve", "g-1", "--config", cfg, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin"},
    )  # fmt: skip
    _, err_b = await proc.communicate()
    assert proc.returncode == 2 and b"pass --token" in err_b


async def test_break_glass_and_review_from_the_cli(proxy_api: TestClient) -> None:
    code, out, err = await jg(
        proxy_api, "olga", ["oncall"], "request", "--scope", "project:1", "--reason", "outage",
        "--break-glass",
    )  # fmt: skip
    assert code == 0, err
    grant_id, state = out.split()
    assert state == "active"
    code, out, _ = await jg(proxy_api, "sam", ["security"], "list", "--unreviewed")
    assert code == 0 and grant_id in out
    code, _, err = await jg(proxy_api, "olga", ["oncall", "security"], "review", grant_id)
    assert code == 1 and "self_review" in err
    code, out, err = await jg(
        proxy_api, "sam", ["security"], "review", grant_id, "--comment", "justified"
    )
    assert code == 0, err
    code, out, _ = await jg(proxy_api, "sam", ["security"], "show", grant_id, "--json")
    assert json.loads(out)["reviewed_by"] == "sam"
    code, out, _ = await jg(proxy_api, "sam", ["security"], "list", "--unreviewed")
    assert grant_id not in out


async def test_extend_from_the_cli(proxy_api: TestClient) -> None:
    _, out, _ = await jg(
        proxy_api, "mallory", [], "request", "--scope", "recording:1/demo-1", "--reason", "x",
        "--duration", "15m",
    )  # fmt: skip
    grant_id = out.split()[0]
    code, out, err = await jg(proxy_api, "mallory", [], "extend", grant_id, "--duration", "15m")
    assert code == 0 and out.split() == [grant_id, "active"], err
    code, out, _ = await jg(proxy_api, "mallory", [], "show", grant_id, "--json")
    g = json.loads(out)
    assert g["expires_at"] - g["activated_at"] == pytest.approx(1800, abs=1)
    code, _, err = await jg(proxy_api, "mallory", [], "extend", grant_id, "--duration", "1h")
    assert code == 2 and "exceeds_max" in err
