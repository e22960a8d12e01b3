"""Lists and sensitivity rules: a granted recording a rule keeps closed is listed as locked.

jitgate in front of the fake PostHog of tests/metadatakit.py (its recordings list and
metadata in PostHog's shapes), grants and metadata in the test session's real Redis.
demo-1 starts on /billing/invoices; demo-2 and demo-3 do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import ROOT, ProxyFactory, bearer, make_token
from metadatakit import FakeTool
from test_sensitivity import REQUIRE, SNAPSHOTS, start
from test_sensitivity import tool as tool  # a fixture
from waiting import eventually

from proxy.state import STATE

LIST = "/api/projects/1/session_recordings"
BILLING = "this recording includes /billing/* (sensitivity rule 'billing')"
RULES = "sensitivity:\n  - id: billing\n    urls: [/billing/*]\n"


async def listed(client: Any, user: str) -> dict[str, Any]:
    """Each recording of the list: its lock marker, or None when it is listed as open."""
    r = await client.get(LIST, headers=bearer(user))
    assert r.status == 200, await r.text()
    return {item["id"]: item.get("jitgate") for item in (await r.json())["results"]}


async def test_a_blocked_recording_is_listed_locked_with_its_reason(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, rules=RULES)
    await client.app[STATE].grants.add("alice", "project:1", 300, "audit", "sam")
    # Nothing known yet: every granted recording is locked, and fetches start behind it.
    first = await listed(client, "alice")
    assert {rid: m["reason"] for rid, m in first.items()} == dict.fromkeys(
        first, "metadata unknown"
    )
    assert tool.metadata_hits() == []  # the list did not wait for the tool
    await eventually(lambda: len(tool.metadata_hits()) == 3, what="the background fetches")
    await eventually(lambda: len(client.app[STATE].metadata._memory) == 3, what="kept")
    second = await listed(client, "alice")
    assert second == {
        "demo-1": {"locked": True, "scope": "recording:1/demo-1", "request_url": None,
                   "reason": BILLING},
        "demo-2": None,
        "demo-3": None,
    }  # fmt: skip
    # The list says what opening says.
    for recording, status in (("demo-1", 403), ("demo-2", 200)):
        r = await client.get(SNAPSHOTS.format(recording), headers=bearer("alice"))
        assert r.status == status
    # Another replica (no memory) reads the same answers from Redis, without the tool.
    client.app[STATE].metadata._memory.clear()
    assert await listed(client, "alice") == second
    assert len(tool.metadata_hits()) == 3
    # Without a grant the lock stays the plain one (a request may open it).
    plain = await listed(client, "bob")
    assert all("reason" not in m and m["request_url"] for m in plain.values())
    await client.app[STATE].audit.flush(force=True)
    text = client.app[STATE].settings.audit.file.path.read_text()
    assert "list annotate: 1 of 3 locked (1 by sensitivity rules)" in text


async def test_a_require_rule_locks_what_another_entitlement_granted(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, rules=REQUIRE)
    await client.app[STATE].grants.add("bob", "project:1", 300, "audit", "sam")
    await listed(client, "bob")
    await eventually(lambda: len(client.app[STATE].metadata._memory) == 3, what="kept")
    marker = (await listed(client, "bob"))["demo-1"]
    assert marker["reason"] == (
        "this recording includes /billing/* (sensitivity rule 'billing'): it needs a grant "
        "under billing-review"
    )
    assert marker["request_url"] == "/_jit/request?scope=recording:1/demo-1"
    r = await client.get(SNAPSHOTS.format("demo-1"), headers=bearer("bob"))
    assert r.status == 403 and (await r.json())["reasons"] == [marker["reason"]]
    # A grant under billing-review opens it, in the list as when opened.
    alice = {**bearer("alice"), "Accept": "application/json"}
    ask = {"scope": "recording:1/demo-1", "reason": "refund", "duration": "5m", "ticket": "BILL-1"}
    grant = await (await client.post("/_jit/api/requests", json=ask, headers=alice)).json()
    lead = {"Authorization": f"Bearer {make_token('lena', groups=['billing-leads'])}"}
    r = await client.post(f"/_jit/api/grants/{grant['id']}/approve", json={}, headers=lead)
    assert r.status == 200, await r.text()
    assert (await listed(client, "alice"))["demo-1"] is None


async def test_filter_removes_them_and_metadata_trouble_locks_every_granted_one(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    policy = (ROOT / "config" / "policy.yaml").read_text()
    policy = policy.replace("lists: annotate", "lists: filter")
    client = await start(make_proxy, tmp_path, tool, rules=RULES, base=policy)
    await client.app[STATE].grants.add("alice", "project:1", 300, "audit", "sam")
    tool.status = 500  # the tool cannot say: nothing is listed as open
    assert await listed(client, "alice") == {}
    cache = client.app[STATE].metadata
    await eventually(lambda: len(tool.metadata_hits()) == 3 and not cache._fetching, what="tried")
    assert await listed(client, "alice") == {}
    await eventually(lambda: len(tool.metadata_hits()) == 6 and not cache._fetching, what="again")
    tool.status = 200  # failures are not kept: the next list asks again
    assert await listed(client, "alice") == {}
    await eventually(lambda: len(client.app[STATE].metadata._memory) == 3, what="kept")
    assert await listed(client, "alice") == {"demo-2": None, "demo-3": None}
