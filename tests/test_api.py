"""The access workflow through the JSON API, against a real proxy, Redis and upstream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, Upstream, demo_policy, make_token
from waiting import eventually, past

from proxy.audit import query as auditquery
from proxy.grants import STATES
from proxy.state import STATE
from proxy.web import api as api_module

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
ENTITLEMENTS = r"""
entitlements:
  - id: self-service
    scopes: ["recording:{project}/{recording}"]
    who: any
    durations: {offered: [5m, 15m, 1h], default: 15m, max: 1h}
    reason: required
    approval: {mode: auto}
    extend: {requires_approval: false}
  - id: break-glass
    scopes: ["project:{project}"]
    who: {groups: [oncall]}
    durations: {offered: [30m], default: 30m, max: 1h}
    approval: {mode: approvers, count: 1, approvers: {groups: [security]}}
    break_glass: true
  - id: project
    scopes: ["project:{project}"]
    who: {groups: [eng]}
    durations: {offered: [15m, 1h], default: 1h, max: 4h}
    ticket: {pattern: "^(INC|SUP)-\\d+$"}
    pending_ttl: 1h
    approval: {mode: approvers, count: 2, approvers: {groups: [approvers]}}
  - id: short-wait
    scopes: ["project:{project}"]
    who: {users: [lara]}
    durations: {offered: [15m], default: 15m, max: 15m}
    pending_ttl: 1
    approval: {mode: approvers, count: 1, approvers: {groups: [approvers]}}
  - id: brief
    scopes: ["project:{project}"]
    who: {users: [erin]}
    durations: {offered: [2], default: 2, max: 5}
    reason: optional
    approval: {mode: approvers, count: 1, approvers: {groups: [approvers]}}
"""


def who(sub: str, *groups: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, groups=list(groups) or None)}"}


ALICE = who("alice", "eng", "approvers")  # an engineer who is also an approver
BOB = who("bob", "approvers")
CAROL = who("carol", "approvers")
MALLORY = who("mallory", "eng")
ADMIN = who("sam", "security")


@pytest.fixture
async def api(make_proxy: ProxyFactory) -> TestClient:
    policy = demo_policy(ENTITLEMENTS)
    client: TestClient = await make_proxy(policy_text=policy, extra="admins: {groups: [security]}")
    return client


async def post(client: TestClient, path: str, headers: dict[str, str], **body: Any) -> Any:
    r = await client.post(f"/_jit/api{path}", json=body, headers=headers)
    return r.status, await r.json()


async def get(client: TestClient, path: str, headers: dict[str, str]) -> Any:
    r = await client.get(f"/_jit/api{path}", headers=headers)
    return r.status, await r.json()


async def audit_events(client: TestClient, tmp_path: Path) -> list[dict[str, Any]]:
    await client.app[STATE].audit.flush(force=True)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if not r["event"].startswith("access.")]


async def test_n_of_m_approval_lifecycle(
    api: TestClient, upstream: Upstream, tmp_path: Path
) -> None:
    status, g = await post(
        api, "/requests", ALICE, scope="project:1", reason="customer bug", ticket="INC-42",
        duration="1h",
    )  # fmt: skip
    assert status == 201, g
    assert g["state"] == "pending" and g["user"] == "alice" and g["entitlement"] == "project"
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 403

    status, body = await post(api, f"/grants/{g['id']}/approve", ALICE, comment="me")
    assert (status, body["error"]) == (403, "self_approval")
    status, body = await post(api, f"/grants/{g['id']}/approve", MALLORY)
    assert (status, body["error"]) == (403, "not_approver")
    status, body = await post(api, f"/grants/{g['id']}/approve", BOB, comment="ok")
    assert status == 200 and body["state"] == "pending"
    status, body = await post(api, f"/grants/{g['id']}/approve", BOB)
    assert (status, body["error"]) == (409, "duplicate_approval")
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 403

    status, body = await post(api, f"/grants/{g['id']}/approve", CAROL, comment="fine")
    assert status == 200 and body["state"] == "active"
    assert body["expires_at"] - body["activated_at"] == pytest.approx(3600, abs=1)
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 200

    status, body = await post(api, f"/grants/{g['id']}/relinquish", BOB)
    assert status == 403
    status, body = await post(api, f"/grants/{g['id']}/relinquish", ALICE, comment="done")
    assert status == 200 and body["state"] == "relinquished"
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 403

    events = await audit_events(api, tmp_path)
    assert [(e["event"], e.get("actor")) for e in events] == [
        ("grant.requested", "alice"),
        ("grant.approved", "bob"),
        ("grant.approved", "carol"),
        ("grant.activated", "carol"),
        ("grant.relinquished", "alice"),
    ]
    assert events[1]["comment"] == "ok" and events[0]["ticket"] == "INC-42"
    assert all(e["policy_version"] for e in events)


async def test_auto_approval_and_extension(api: TestClient, upstream: Upstream) -> None:
    status, g = await post(
        api, "/requests", MALLORY, scope="recording:1/demo-1", reason="debugging", duration="15m"
    )
    assert status == 201 and g["state"] == "active"
    assert (await api.get(SNAPSHOTS, headers=MALLORY)).status == 200
    status, body = await post(api, f"/grants/{g['id']}/extend", MALLORY, duration="30m")
    assert status == 200 and body["expires_at"] - body["activated_at"] == pytest.approx(2700, 1)
    status, body = await post(api, f"/grants/{g['id']}/extend", MALLORY, duration="30m")
    assert (status, body["error"]) == (400, "exceeds_max")
    # Found by the API fuzzer (make harden): a duration too large for milliseconds was a 500.
    status, body = await post(api, f"/grants/{g['id']}/extend", MALLORY, duration=1.79e308)
    assert (status, body["error"]) == (400, "bad_request")
    assert "at most 100 years" in body["message"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"scope": "recording:1/demo-1", "reason": ""}, MALLORY, 400, "bad_request"),
        ({"scope": "recording:1/demo-1", "reason": "x", "duration": "2h"}, MALLORY, 400,
         "bad_request"),
        ({"scope": "project:1", "reason": "x", "ticket": "JIRA-1"}, ALICE, 400, "bad_request"),
        ({"scope": "project:1", "reason": "x"}, ALICE, 400, "bad_request"),
        ({"scope": "project:1", "reason": "x", "ticket": "INC-1"}, BOB, 403, "not_entitled"),
        ({"scope": "org:1", "reason": "x"}, ALICE, 403, "not_entitled"),
        ({"scope": "recording:1/demo-1", "reason": "x", "break_glass": True}, MALLORY, 403,
         "not_entitled"),
        ({"reason": "x"}, MALLORY, 400, "bad_request"),
    ],
)  # fmt: skip
async def test_bad_requests_change_nothing(
    api: TestClient, body: dict[str, Any], headers: dict[str, str], status: int, code: str
) -> None:
    got, answer = await post(api, "/requests", headers, **body)
    assert (got, answer["error"]) == (status, code), answer
    assert answer["message"]
    assert (await get(api, "/grants", ADMIN))[1]["grants"] == []


async def test_pending_request_lapses(api: TestClient) -> None:
    lara = who("lara")
    status, g = await post(api, "/requests", lara, scope="project:2", reason="x")
    assert status == 201 and g["state"] == "pending"

    async def lapsed() -> bool:
        return (await get(api, f"/grants/{g['id']}", lara))[1]["state"] == "lapsed"

    await eventually(lapsed, what="the request to lapse")
    status, body = await post(api, f"/grants/{g['id']}/approve", BOB)
    assert (status, body["error"]) == (409, "not_pending")
    assert (await get(api, f"/grants/{g['id']}", lara))[1]["state"] == "lapsed"


async def test_break_glass_is_immediate_and_flagged(
    api: TestClient, upstream: Upstream, tmp_path: Path
) -> None:
    oncall = who("olga", "oncall")
    status, g = await post(
        api, "/requests", oncall, scope="project:1", reason="outage", break_glass=True
    )
    assert status == 201 and g["state"] == "active" and g["break_glass"]
    assert (await api.get(SNAPSHOTS, headers=oncall)).status == 200
    events = [e["event"] for e in await audit_events(api, tmp_path)]
    assert events == ["grant.requested", "break_glass", "grant.activated"]


async def test_deny_and_admin_revoke(api: TestClient, upstream: Upstream) -> None:
    _, g = await post(api, "/requests", ALICE, scope="project:1", reason="x", ticket="SUP-9")
    status, body = await post(api, f"/grants/{g['id']}/deny", BOB, comment="not needed")
    assert status == 200 and body["state"] == "denied"
    status, body = await post(api, f"/grants/{g['id']}/approve", CAROL)
    assert (status, body["error"]) == (409, "not_pending")

    _, g = await post(api, "/requests", MALLORY, scope="recording:1/demo-1", reason="x")
    assert (await api.get(SNAPSHOTS, headers=MALLORY)).status == 200
    status, body = await post(api, f"/grants/{g['id']}/revoke", BOB)
    assert (status, body["error"]) == (403, "not_admin")
    status, body = await post(api, f"/grants/{g['id']}/revoke", ADMIN, comment="policy")
    assert status == 200 and body["state"] == "revoked"
    assert (await api.get(SNAPSHOTS, headers=MALLORY)).status == 403


async def test_listings_and_visibility(api: TestClient) -> None:
    _, mine = await post(api, "/requests", ALICE, scope="project:1", reason="x", ticket="INC-1")
    _, other = await post(api, "/requests", MALLORY, scope="recording:1/demo-2", reason="y")
    assert [g["id"] for g in (await get(api, "/grants/mine", ALICE))[1]["grants"]] == [mine["id"]]
    pending = (await get(api, "/grants/pending", BOB))[1]["grants"]
    assert [g["id"] for g in pending] == [mine["id"]]
    assert (await get(api, "/grants/pending", MALLORY))[1]["grants"] == []
    assert (await get(api, f"/grants/{mine['id']}", BOB))[0] == 200  # an eligible approver
    assert (await get(api, f"/grants/{other['id']}", ALICE))[0] == 404  # not theirs
    status, body = await get(api, "/grants", ALICE)
    assert (status, body["error"]) == (403, "not_admin")
    status, body = await get(api, "/grants?state=active", ADMIN)
    assert [g["id"] for g in body["grants"]] == [other["id"]]


async def test_api_needs_identity_and_same_origin_for_cookies(api: TestClient) -> None:
    status, body = await get(api, "/grants/mine", {})
    assert (status, body["error"]) == (401, "unauthenticated")
    cookie = {"Cookie": f"jitgate_token={make_token('mallory')}"}
    body = {"scope": "recording:1/demo-1", "reason": "x"}
    r = await api.post("/_jit/api/requests", json=body, headers=cookie)
    assert r.status == 403 and (await r.json())["error"] == "cross_site"
    origin = str(api.make_url("")).rstrip("/")
    r = await api.post("/_jit/api/requests", json=body, headers={**cookie, "Origin": origin})
    assert r.status == 201
    r = await api.post("/_jit/api/requests", data=b"[", headers=MALLORY)
    assert r.status == 400 and (await r.json())["error"] == "bad_request"


async def test_openapi_document(api: TestClient) -> None:
    r = await api.get("/_jit/api/openapi.json")
    assert r.status == 200
    doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/api/requests", "/api/grants/{grant_id}/approve"} <= set(doc["paths"])
    from openapi_spec_validator import validate

    validate(doc)
    assert doc["servers"] == [{"url": "/_jit"}]


def test_openapi_document_matches_the_code() -> None:
    """openapi.yaml is text: this keeps it in step with the routes and the constants."""
    doc = api_module.openapi_document("/_jit")
    app = web.Application()
    api_module.add_routes(app)
    routes = set()
    for resource in app.router.resources():
        path = resource.canonical
        if path == "/api/openapi.json":
            continue
        if path.endswith("/{action}"):
            routes |= {path.replace("{action}", a) for a in api_module._ACTIONS}
        else:
            routes.add(path)
    assert routes == set(doc["paths"])
    grant = doc["components"]["schemas"]["Grant"]["properties"]
    assert grant["state"]["enum"] == list(STATES)
    audit = {p["name"]: p for p in doc["paths"]["/api/audit"]["get"]["parameters"]}
    assert set(audit) == {*auditquery.FILTERS, "cursor", "limit", "order", "format"}
    assert audit["limit"]["schema"]["maximum"] == auditquery.MAX_LIMIT


async def test_unknown_grant_is_404(api: TestClient) -> None:
    for action in ("approve", "deny", "revoke", "relinquish"):
        status, body = await post(api, f"/grants/g-0000000000000000/{action}", ADMIN)
        assert (status, body["error"]) == (404, "not_found"), action
    status, body = await post(api, "/grants/g-0/frobnicate", ADMIN)
    assert status == 404


async def test_break_glass_follow_up_review(api: TestClient, tmp_path: Path) -> None:
    olga, ivan = who("olga", "oncall"), who("ivan", "oncall", "security")
    tess = who("tess", "security")
    _, g = await post(api, "/requests", olga, scope="project:1", reason="outage", break_glass=True)
    _, own = await post(api, "/requests", ivan, scope="project:2", reason="db", break_glass=True)
    _, ordinary = await post(api, "/requests", MALLORY, scope="recording:1/demo-1", reason="x")
    assert g["reviewed_by"] == "" and g["reviewed_at"] is None

    status, body = await get(api, "/grants/unreviewed", ADMIN)
    assert status == 200 and [x["id"] for x in body["grants"]] == [g["id"], own["id"]]
    for outsider in (olga, MALLORY, BOB):
        assert (await get(api, "/grants/unreviewed", outsider))[1]["grants"] == []

    status, body = await post(api, f"/grants/{g['id']}/review", olga, comment="all fine")
    assert (status, body["error"]) == (403, "not_approver")  # the requester is no reviewer
    status, body = await post(api, f"/grants/{g['id']}/review", BOB)
    assert (status, body["error"]) == (403, "not_approver")  # approves other rules only
    status, body = await post(api, f"/grants/{own['id']}/review", ivan)
    assert (status, body["error"]) == (403, "self_review")

    status, body = await post(api, f"/grants/{g['id']}/review", ADMIN, comment="INC-7 justified")
    assert status == 200 and body["state"] == "active"
    assert (body["reviewed_by"], body["review_comment"]) == ("sam", "INC-7 justified")
    status, body = await post(api, f"/grants/{g['id']}/review", tess)
    assert (status, body["error"]) == (409, "already_reviewed")
    status, body = await post(api, f"/grants/{ordinary['id']}/review", ADMIN)
    assert (status, body["error"]) == (409, "not_break_glass")
    status, body = await post(api, "/grants/g-0000000000000000/review", ADMIN)
    assert (status, body["error"]) == (404, "not_found")

    status, body = await get(api, "/grants/unreviewed", tess)
    assert [x["id"] for x in body["grants"]] == [own["id"]]
    status, body = await post(api, f"/grants/{own['id']}/review", tess)
    assert status == 200 and (await get(api, "/grants/unreviewed", tess))[1]["grants"] == []

    reviews = [e for e in await audit_events(api, tmp_path) if e["event"] == "grant.reviewed"]
    assert [(e["grant_id"], e["actor"], e.get("comment")) for e in reviews] == [
        (g["id"], "sam", "INC-7 justified"),
        (own["id"], "tess", ""),
    ]
    assert reviews[0]["break_glass"] is True and reviews[0]["user"] == "olga"


# --- extensions that need approval -------------------------------------------------------


async def active_grant(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    """Request access and have it approved by whoever the entitlement needs."""
    status, g = await post(client, "/requests", headers, **body)
    assert status == 201 and g["state"] == "pending", g
    for approver in (BOB, CAROL)[: g["needed"]]:
        status, g = await post(client, f"/grants/{g['id']}/approve", approver)
        assert status == 200, g
    assert g["state"] == "active"
    return g


async def test_extension_request_approved_moves_the_grant(
    api: TestClient, upstream: Upstream, tmp_path: Path
) -> None:
    g = await active_grant(
        api, ALICE, scope="project:1", reason="customer bug", ticket="INC-42", duration="1h"
    )
    status, ext = await post(
        api, f"/grants/{g['id']}/extend", ALICE, duration="30m", comment="need more time"
    )
    assert status == 202, ext
    assert (ext["kind"], ext["extends"], ext["state"], ext["needed"], ext["duration"]) == (
        "extension", g["id"], "pending", 2, 1800,
    )  # fmt: skip
    assert (ext["user"], ext["scope"], ext["reason"], ext["ticket"], ext["max_total"]) == (
        "alice", "project:1", "need more time", "INC-42", 4 * 3600,
    )  # fmt: skip
    assert ext["pending_until"] == pytest.approx(ext["created_at"] + 3600, abs=1)
    assert (await get(api, f"/grants/{g['id']}", ALICE))[1] == {**g, "extension_request": ext["id"]}

    status, body = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="15m")
    assert (status, body["error"]) == (409, "extension_pending")
    status, body = await post(api, f"/grants/{g['id']}/extend", MALLORY, duration="15m")
    assert (status, body["error"]) == (403, "not_holder")
    pending = (await get(api, "/grants/pending", BOB))[1]["grants"]
    assert [x["id"] for x in pending] == [ext["id"]]
    assert (await get(api, f"/grants/{ext['id']}", CAROL))[0] == 200  # an eligible approver

    status, body = await post(api, f"/grants/{ext['id']}/approve", ALICE)
    assert (status, body["error"]) == (403, "self_approval")
    status, body = await post(api, f"/grants/{ext['id']}/approve", MALLORY)
    assert (status, body["error"]) == (403, "not_approver")
    status, body = await post(api, f"/grants/{ext['id']}/approve", BOB, comment="ok")
    assert status == 200 and body["state"] == "pending"
    _, still = await get(api, f"/grants/{g['id']}", ALICE)
    assert still["expires_at"] == g["expires_at"] and still["extensions"] == 0
    status, done = await post(api, f"/grants/{ext['id']}/approve", CAROL, comment="fine")
    assert status == 200 and (done["state"], done["granted_by"]) == ("applied", "bob,carol")

    _, after = await get(api, f"/grants/{g['id']}", ALICE)
    assert after["state"] == "active" and after["extensions"] == 1
    assert after["expires_at"] == pytest.approx(g["expires_at"] + 1800, abs=0.002)
    assert done["expires_at"] == after["expires_at"]
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 200
    assert (await get(api, "/grants/pending", BOB))[1]["grants"] == []
    _, listed = await get(api, "/grants?state=applied", ADMIN)
    assert [x["id"] for x in listed["grants"]] == [ext["id"]]
    mine = (await get(api, "/grants/mine", ALICE))[1]["grants"]
    assert [(x["id"], x["state"]) for x in mine] == [(ext["id"], "applied"), (g["id"], "active")]

    events = await audit_events(api, tmp_path)
    events = events[[e["event"] for e in events].index("grant.extension_requested") :]
    assert [(e["event"], e["actor"], e["grant_id"]) for e in events] == [
        ("grant.extension_requested", "alice", ext["id"]),
        ("grant.approved", "bob", ext["id"]),
        ("grant.approved", "carol", ext["id"]),
        ("grant.extended", "carol", g["id"]),
    ]
    requested, _, _, extended = events
    assert (requested["extends"], requested["comment"]) == (g["id"], "need more time")
    assert (extended["extension"], extended["extra_seconds"], extended["comment"]) == (
        ext["id"], 1800, "fine",
    )  # fmt: skip
    assert extended["expires_at"] == after["expires_at"] and "extends" not in extended


async def test_extension_request_refusals_and_deny(api: TestClient, upstream: Upstream) -> None:
    g = await active_grant(api, ALICE, scope="project:1", reason="x", ticket="INC-1")
    status, body = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="3h30m")
    assert (status, body["error"]) == (400, "exceeds_max")
    assert body["message"] == "a total of 16200s exceeds the maximum of 14400s"
    status, body = await post(api, f"/grants/{g['id']}/extend", ALICE, duration=0)
    assert (status, body["error"]) == (400, "bad_request")
    assert (await get(api, "/grants/pending", BOB))[1]["grants"] == []
    _, before = await get(api, f"/grants/{g['id']}", ALICE)

    _, ext = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="1h")
    assert ext["reason"] == "x"  # no comment: the grant's reason
    status, denied = await post(api, f"/grants/{ext['id']}/deny", BOB, comment="wrap it up")
    assert status == 200 and (denied["state"], denied["ended_by"]) == ("denied", "bob")
    _, after = await get(api, f"/grants/{g['id']}", ALICE)
    assert after == {**before, "extension_request": ext["id"]}
    status, body = await post(api, f"/grants/{ext['id']}/approve", CAROL)
    assert (status, body["error"]) == (409, "not_pending")

    status, ext = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="1h")
    assert status == 202  # the denied one no longer blocks another
    status, body = await post(api, f"/grants/{ext['id']}/deny", ALICE, comment="never mind")
    assert status == 200 and body["state"] == "denied"  # withdrawn by its requester
    assert (await get(api, f"/grants/{g['id']}", ALICE))[1] == {
        **before,
        "extension_request": ext["id"],
    }
    status, body = await post(api, f"/grants/{ext['id']}/extend", ALICE, duration="1h")
    assert (status, body["error"]) == (409, "not_active")  # a request is not a grant


async def test_extension_request_of_an_ended_grant_lapses(
    api: TestClient, upstream: Upstream, tmp_path: Path
) -> None:
    g = await active_grant(api, ALICE, scope="project:1", reason="x", ticket="INC-1")
    _, ext = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="30m")
    _, ended = await post(api, f"/grants/{g['id']}/relinquish", ALICE)
    # Any approval from now on ends the request: it can never apply.
    status, body = await post(api, f"/grants/{ext['id']}/approve", BOB)
    assert (status, body["error"]) == (409, "not_active")
    assert body["message"] == (
        f"grant {g['id']} is relinquished, not active; extension {ext['id']} was not applied"
    )
    _, lapsed = await get(api, f"/grants/{ext['id']}", ALICE)
    assert (lapsed["state"], lapsed["ended_by"], lapsed["approvals"]) == ("lapsed", "bob", [])
    assert lapsed["end_comment"] == body["message"]
    status, body = await post(api, f"/grants/{ext['id']}/approve", CAROL)
    assert (status, body["error"]) == (409, "not_pending")
    assert (await get(api, f"/grants/{g['id']}", ALICE))[1] == ended
    assert (await api.get(SNAPSHOTS, headers=ALICE)).status == 403
    last = (await audit_events(api, tmp_path))[-1]
    assert (last["event"], last["actor"], last["grant_id"]) == ("grant.lapsed", "bob", ext["id"])
    assert last["comment"] == lapsed["end_comment"] and last["extends"] == g["id"]


async def test_extension_request_past_the_maximum_at_approval_lapses(
    api: TestClient, upstream: Upstream
) -> None:
    g = await active_grant(api, ALICE, scope="project:1", reason="x", ticket="INC-1", duration="1h")
    _, ext = await post(api, f"/grants/{g['id']}/extend", ALICE, duration="3h")  # 4h of 4h
    # Meanwhile the grant got longer another way (say under a policy since changed).
    await api.app[STATE].grants.extend(g["id"], "alice", 3 * 3600, 10 * 3600)
    _, before = await get(api, f"/grants/{g['id']}", ALICE)
    await post(api, f"/grants/{ext['id']}/approve", BOB)
    status, body = await post(api, f"/grants/{ext['id']}/approve", CAROL)
    assert (status, body["error"]) == (409, "exceeds_max")
    assert body["message"] == (
        f"grant {g['id']} already lasts its maximum of 14400s; "
        f"extension {ext['id']} was not applied"
    )
    assert (await get(api, f"/grants/{ext['id']}", ALICE))[1]["state"] == "lapsed"
    assert (await get(api, f"/grants/{g['id']}", ALICE))[1] == before


@pytest.fixture
async def live_api(make_proxy: ProxyFactory, aiohttp_server: Any) -> TestClient:
    from test_live_gate import live_upstream

    server = await aiohttp_server(live_upstream())
    policy = demo_policy(ENTITLEMENTS)
    client: TestClient = await make_proxy(
        policy_text=policy,
        extra="admins: {groups: [security]}",
        upstream_url=str(server.make_url("")).rstrip("/"),
    )
    return client


async def test_approved_extension_keeps_live_connections_past_the_old_end(
    live_api: TestClient,
) -> None:
    from test_live_gate import STREAM, WS, ws_closed_within

    erin = who("erin")
    g = await active_grant(live_api, erin, scope="project:1", reason="x", duration=2)
    async with live_api.ws_connect(WS, headers=erin) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str() == "hello"
        status, ext = await post(live_api, f"/grants/{g['id']}/extend", erin, duration=2)
        assert status == 202
        status, done = await post(live_api, f"/grants/{ext['id']}/approve", BOB)
        assert status == 200 and done["state"] == "applied"
        new_end = done["expires_at"]
        assert new_end == pytest.approx(g["expires_at"] + 2, abs=0.002)

        await past(g["expires_at"] + 0.5)  # the old end is what is under test
        await ws.send_str("still here")
        assert await asyncio.wait_for(ws.receive_str(), 1) == "still here"
        r = await live_api.get(STREAM, headers=erin)
        assert r.status == 200
        r.close()

        await past(new_end - 0.3)
        _, code = await ws_closed_within(ws, 2.0)  # cut at the new end
        assert code == 1008
        assert time.time() - new_end < 1.0
    r = await live_api.get(STREAM, headers=erin)
    assert r.status == 403


async def test_expiry_and_lapse_are_audited_once(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    client: TestClient = await make_proxy(
        policy_text=demo_policy(ENTITLEMENTS), extra="sweep_interval: 0.1"
    )
    _, g = await post(client, "/requests", who("lara"), scope="project:3", reason="x")
    assert g["state"] == "pending"
    await client.app[STATE].grants.add("mallory", "project:1", 0.3, "test", "admin")

    async def ended_records() -> list[tuple[str, str]]:
        events = await audit_events(client, tmp_path)
        kinds = ("grant.expired", "grant.lapsed")
        found = [(e["event"], e["actor"]) for e in events if e["event"] in kinds]
        return found if len(found) >= 2 else []

    ended = await eventually(ended_records, what="the sweep's expiry and lapse records")
    assert sorted(ended) == [("grant.expired", "jitgate"), ("grant.lapsed", "jitgate")]
