"""workflow.Workflow directly, against a real Redis: requests, approvals, endings, audit."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.audit import AuditLog
from proxy.audit.sinks import JsonlFileSink
from proxy.grantstore import RedisGrants
from proxy.identity import Identity
from proxy.policyfile import compile_text
from proxy.settings import AdminSettings
from proxy.workflow import Workflow, WorkflowError

POLICY = compile_text(
    r"""
version: 1
default: identity
hierarchy:
  - scope: "recording:{project}/{recording}"
    covered_by: ["project:{project}"]
routes:
  - id: recording
    path: /api/projects/{project}/session_recordings/{recording}
    subpaths: true
    access: protected
    scope: "recording:{project}/{recording}"
entitlements:
  - id: one-recording
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [1s, 5m, 15m], default: 5m, max: 30m}
    reason: required
    approval: {mode: auto}
  - id: project
    scopes: ["project:{project}"]
    who: {groups: [eng]}
    durations: {offered: [1h], default: 1h, max: 4h}
    reason: required
    ticket: {pattern: '^INC-\d+$'}
    approval: {mode: approvers, count: 2, approvers: {groups: [leads]}}
  - id: break-glass
    scopes: ["project:{project}"]
    who: {groups: [oncall]}
    durations: {offered: [30m], default: 30m, max: 1h}
    reason: required
    break_glass: true
    approval: {mode: approvers, count: 1, approvers: {groups: [security]}}
""",
    "workflow-test.yaml",
)
ALICE = Identity("alice", ("eng",))
LEAD1, LEAD2 = Identity("lee", ("leads",)), Identity("lou", ("leads", "eng"))
SAM = Identity("sam", ("security",))
OLGA = Identity("olga", ("oncall",))
NOBODY = Identity("nora", ())


@dataclass
class Flow:
    workflow: Workflow
    log: AuditLog
    file: Path
    counted: list[str]  # what the workflow counted for metrics

    async def records(self) -> list[dict[str, Any]]:
        await self.log.flush(force=True)
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines()]

    async def events(self, grant_id: str) -> list[str]:
        return [r["event"] for r in await self.records() if r.get("grant_id") == grant_id]


@pytest.fixture
async def flow(redis_url: str, tmp_path: Path) -> AsyncIterator[Flow]:
    client = Redis.from_url(redis_url)
    path = tmp_path / "audit.jsonl"
    log = AuditLog([JsonlFileSink(path)])
    await log.start()
    admins = AdminSettings(groups=frozenset({"security"}))
    counted: list[str] = []
    store = RedisGrants(client, "jit:")
    wf = Workflow(lambda: POLICY, store, log, admins, counted=counted.append)
    yield Flow(wf, log, path, counted)
    await log.close()
    await client.aclose()


async def refused(code: str, coro: Any) -> WorkflowError:
    with pytest.raises(WorkflowError) as exc:
        await coro
    assert exc.value.code == code, exc.value.message
    return exc.value


async def test_an_auto_approved_request_is_active_and_audited(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(ALICE, "recording:1/r1", reason="ticket 7", duration=900)
    assert (grant.state, grant.user, grant.entitlement) == ("active", "alice", "one-recording")
    assert 899 <= grant.remaining() <= 900
    assert await flow.events(grant.id) == ["grant.requested", "grant.activated"]
    (activated,) = [r for r in await flow.records() if r["event"] == "grant.activated"]
    assert activated["scope"] == "recording:1/r1" and activated["recording"] == "r1"
    assert activated["policy_version"] == POLICY.version and activated["reason"] == "ticket 7"


async def test_what_a_request_must_carry(flow: Flow) -> None:
    wf = flow.workflow
    await refused("bad_request", wf.request(ALICE, "  ", reason="x"))
    await refused("bad_request", wf.request(ALICE, "recording:1/r1", reason=""))
    await refused("bad_request", wf.request(ALICE, "recording:1/r1", reason="x", duration=120))
    await refused("bad_request", wf.request(ALICE, "project:1", reason="x"))  # no ticket
    await refused("bad_request", wf.request(ALICE, "project:1", reason="x", ticket="SUP-1"))
    await refused("not_entitled", wf.request(NOBODY, "project:1", reason="x", ticket="INC-1"))
    await refused("not_entitled", wf.request(ALICE, "team:1", reason="x"))
    assert await flow.records() == []  # nothing refused was written down


async def test_n_approvers_activate_a_request(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(ALICE, "project:1", reason="outage", ticket="INC-42")
    assert (grant.state, grant.needed) == ("pending", 2)
    await refused("not_approver", wf.approve(ALICE, grant.id))  # not in leads
    once = await wf.approve(LEAD1, grant.id, "looks fine")
    assert once.state == "pending" and [a.by for a in once.approvals] == ["lee"]
    await refused("duplicate_approval", wf.approve(LEAD1, grant.id))
    done = await wf.approve(LEAD2, grant.id)
    assert done.state == "active" and 3599 <= done.remaining() <= 3600
    assert await flow.events(grant.id) == [
        "grant.requested", "grant.approved", "grant.approved", "grant.activated",
    ]  # fmt: skip


async def test_nobody_approves_their_own_request(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(LEAD2, "project:1", reason="own", ticket="INC-1")
    await refused("self_approval", wf.approve(LEAD2, grant.id))


async def test_one_waiting_request_per_person_and_scope(flow: Flow) -> None:
    wf = flow.workflow
    first = await wf.request(ALICE, "project:1", reason="a", ticket="INC-1")
    error = await refused("already_pending", wf.request(ALICE, "project:1", reason="b",
                                                        ticket="INC-2"))  # fmt: skip
    assert first.id in error.message
    other = await wf.request(ALICE, "project:2", reason="c", ticket="INC-3")
    assert other.state == "pending"
    assert set(await wf.waiting(ALICE)) == {"project:1", "project:2"}


async def test_concurrent_identical_requests_file_one(flow: Flow) -> None:
    """Sent at once, all pass the first check for a waiting request; the store's atomic
    one takes exactly one of them."""
    wf = flow.workflow
    results = await asyncio.gather(
        *(wf.request(ALICE, "project:1", reason=f"r{i}", ticket="INC-1") for i in range(5)),
        return_exceptions=True,
    )
    filed = [r for r in results if not isinstance(r, BaseException)]
    refusals = [r for r in results if isinstance(r, WorkflowError)]
    assert len(filed) == 1 and len(refusals) == 4, results
    assert {(e.status, e.code) for e in refusals} == {(409, "already_pending")}
    assert all(filed[0].id in e.message for e in refusals)
    assert [g.id for g in (await wf.waiting(ALICE)).values()] == [filed[0].id]
    # Once it is decided, the next request is filed.
    await wf.deny(ALICE, filed[0].id)
    assert (await wf.request(ALICE, "project:1", reason="again", ticket="INC-2")).state == (
        "pending"
    )


async def test_deny_and_withdraw(flow: Flow) -> None:
    wf = flow.workflow
    denied = await wf.request(ALICE, "project:1", reason="a", ticket="INC-1")
    await refused("not_approver", wf.deny(NOBODY, denied.id))
    assert (await wf.deny(LEAD1, denied.id, "no")).state == "denied"
    await refused("not_pending", wf.approve(LEAD2, denied.id))
    withdrawn = await wf.request(ALICE, "project:1", reason="b", ticket="INC-2")
    assert (await wf.deny(ALICE, withdrawn.id)).state == "denied"  # its requester withdraws
    assert (await flow.events(denied.id))[-1] == "grant.denied"


async def test_revoke_and_relinquish(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(ALICE, "recording:1/r1", reason="a")
    await refused("not_admin", wf.revoke(ALICE, grant.id))
    revoked = await wf.revoke(SAM, grant.id, "done")
    assert revoked.state == "revoked" and revoked.ended_by == "sam"
    await refused("not_active", wf.revoke(SAM, grant.id))
    await refused("not_found", wf.revoke(SAM, "g-0000000000000000"))
    mine = await wf.request(ALICE, "recording:1/r2", reason="b")
    await refused("not_holder", wf.relinquish(LEAD1, mine.id))
    assert (await wf.relinquish(ALICE, mine.id)).state == "relinquished"
    assert (await flow.events(grant.id))[-1] == "grant.revoked"
    assert (await flow.events(mine.id))[-1] == "grant.relinquished"


async def test_extend_within_the_maximum(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(ALICE, "recording:1/r1", reason="a", duration=300)
    await refused("not_holder", wf.extend(LEAD1, grant.id, 60))
    await refused("bad_request", wf.extend(ALICE, grant.id, 0))
    longer = await wf.extend(ALICE, grant.id, 600)
    assert longer.expires_at == pytest.approx(grant.expires_at + 600, abs=0.01)
    await refused("exceeds_max", wf.extend(ALICE, grant.id, 3600))  # past 30m in all
    assert (await flow.events(grant.id))[-1] == "grant.extended"


async def test_break_glass_is_active_at_once_and_reviewed_by_someone_else(flow: Flow) -> None:
    wf = flow.workflow
    await refused("not_entitled", wf.request(ALICE, "project:1", reason="x", break_glass=True))
    grant = await wf.request(OLGA, "project:1", reason="outage", break_glass=True)
    assert grant.state == "active" and grant.break_glass
    assert [g.id for g in await wf.unreviewed(SAM)] == [grant.id]
    await refused("self_review", wf.review(Identity("olga", ("oncall", "security")), grant.id))
    reviewed = await wf.review(SAM, grant.id, "fine")
    assert reviewed.reviewed_by == "sam" and await wf.unreviewed(SAM) == []
    events = await flow.events(grant.id)
    assert events[:3] == ["grant.requested", "break_glass", "grant.activated"]
    # Each event written is counted once (jitgate_grant_events_total, which alerts on
    # break_glass), the refused request none.
    assert flow.counted == events


async def test_sweep_writes_each_expiry_once(flow: Flow) -> None:
    wf = flow.workflow
    grant = await wf.request(ALICE, "recording:1/r1", reason="a", duration=1)
    deadline = time.monotonic() + 15
    swept = 0
    while swept == 0:  # the grant ends a second after it began; Redis drops it by itself
        assert time.monotonic() < deadline, "the grant never expired"
        await asyncio.sleep(0.05)
        swept = await wf.sweep()
    assert swept == 1 and await wf.sweep() == 0
    assert (await flow.events(grant.id))[-1] == "grant.expired"


async def test_a_decided_request_frees_its_waiting_slot_at_once(flow: Flow) -> None:
    """Whatever characters the name holds, approving or denying frees the slot (no key is
    left behind), so the next request is filed."""
    wf = flow.workflow
    jo = Identity("jöe", ("eng",))
    first = await wf.request(jo, "project:1", reason="a", ticket="INC-1")
    await wf.approve(LEAD1, first.id)
    assert (await wf.approve(LEAD2, first.id)).state == "active"
    redis = wf.grants.redis  # type: ignore[attr-defined]
    assert await redis.keys("jit:waiting:*") == []
    second = await wf.request(jo, "project:2", reason="b", ticket="INC-2")
    await wf.deny(LEAD1, second.id)
    assert await redis.keys("jit:waiting:*") == []
