"""Audit by data subject: access records name whose recording it was; who viewed a person's.

jitgate sits in front of a fake PostHog (tests/metadatakit.py) that describes recordings in
PostHog's real shape with a service token; the trail goes to real Redis and a real file.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, make_token
from metadatakit import TOKEN, FakeTool, fake_tool
from redis.asyncio import Redis
from test_audit_query import jg
from waiting import eventually

from proxy.audit.store import AuditStore
from proxy.audit.subjects import SubjectForm, report
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/{}/snapshots"
KEY = "subject-key-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {make_token('sam', groups=['security'])}"}
METADATA = """
admins: {{groups: [security]}}
metadata:
  adapter: posthog
  token_file: token
  properties: [customer_type]
  subject: {{field: distinct_id, audit: {audit}, key_file: subject.key}}
"""


def hashed(subject: str) -> str:
    message = b"jitgate subject\x00" + subject.encode()
    return "hmac:" + hmac.new(KEY.encode(), message, hashlib.sha256).hexdigest()[:32]


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user)}"}


@pytest.fixture
async def tool(aiohttp_server: Any) -> FakeTool:
    return await fake_tool(aiohttp_server)


async def start(make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool, audit: str) -> Any:
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "subject.key").write_text(KEY)
    return await make_proxy(upstream_url=tool.url, extra=METADATA.format(audit=audit))


async def view(client: TestClient, user: str, recording: str, reason: str, times: int) -> str:
    r = await client.post(
        "/_jit/api/requests",
        json={"scope": f"recording:1/{recording}", "reason": reason, "duration": "5m"},
        headers=as_user(user),
    )
    assert r.status == 201, await r.text()
    before = completed(client, recording)
    for _ in range(times):
        got = await client.get(SNAPSHOTS.format(recording), headers=as_user(user))
        assert got.status == 200, await got.text()

    async def recorded() -> bool:
        # The completion record follows the response (and the metadata lookup): wait.
        await client.app[STATE].audit.flush(force=True)
        return completed(client, recording) >= before + times

    await eventually(recorded, what=f"{times} access.done records of {recording}")
    return str((await r.json())["id"])


def completed(client: TestClient, recording: str) -> int:
    path = client.app[STATE].settings.audit.file.path
    if not path.exists():
        return 0
    return sum(
        1
        for r in file_records(client)
        if r["event"] == "access.done" and r.get("recording") == recording
    )


@pytest.fixture
async def trail(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> tuple[TestClient, dict[str, str]]:
    """ada's recordings demo-1 (alice, bob) and demo-3 (carol); bo's demo-2 (alice)."""
    client = await start(make_proxy, tmp_path, tool, "hash")
    grants = {
        "alice/demo-1": await view(client, "alice", "demo-1", "refund dispute SUP-12", 2),
        "bob/demo-1": await view(client, "bob", "demo-1", "checkout bug INC-9", 1),
        "alice/demo-2": await view(client, "alice", "demo-2", "follow-up", 1),
        "carol/demo-3": await view(client, "carol", "demo-3", "cart crash", 1),
    }
    denied = await client.get(SNAPSHOTS.format("demo-1"), headers=as_user("dave"))
    assert denied.status == 403
    await client.app[STATE].audit.flush(force=True)
    return client, grants


def file_records(client: TestClient) -> list[dict[str, Any]]:
    path = client.app[STATE].settings.audit.file.path
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_access_records_name_whose_recording_it_was(
    trail: tuple[TestClient, dict[str, str]], tool: FakeTool
) -> None:
    client, _ = trail
    access = [r for r in file_records(client) if r["event"].startswith("access.")]
    by_recording: dict[str, set[str]] = {}
    for rec in access:
        # The decision is written before the response; whose recording it was is known by
        # the time the request completes, so its access.done says it.
        if rec["event"] == "access.done":
            by_recording.setdefault(rec["recording"], set()).add(rec["subject"])
    assert by_recording == {
        "demo-1": {hashed("user-ada")},
        "demo-2": {hashed("user-bo")},
        "demo-3": {hashed("user-ada")},
    }
    # Only the keyed hash is kept: neither the id nor the email is in the trail.
    text = client.app[STATE].settings.audit.file.path.read_text()
    assert "user-ada" not in text and "ada@example.com" not in text
    # A refused request (no grant) names no subject, and nothing was fetched for it.
    refused = [r for r in access if r["event"] == "access.deny"]
    assert len(refused) == 1 and "subject" not in refused[0] and "subject_error" not in refused[0]
    # Fetched once per recording (at grant time), though viewed five times.
    assert sorted(tool.metadata_hits()) == [
        f"/api/projects/1/session_recordings/{r}" for r in ("demo-1", "demo-2", "demo-3")
    ]


async def test_who_viewed_a_persons_recordings_and_why(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, grants = trail
    for who in ("user-ada", hashed("user-ada")):  # the id, or the form records carry
        r = await client.get(f"/_jit/api/audit/subjects/{who}", headers=ADMIN)
        assert r.status == 200, await r.text()
        rep = await r.json()
        assert rep["subject_key"] == hashed("user-ada") and rep["records"] == 4
        views = {(v["viewer"], v["recording"]): v for v in rep["views"]}
        assert set(views) == {("alice", "demo-1"), ("bob", "demo-1"), ("carol", "demo-3")}
        alice = views[("alice", "demo-1")]
        assert alice["grant_id"] == grants["alice/demo-1"] and alice["requests"] == 2
        assert alice["reason"] == "refund dispute SUP-12" and alice["first_access"]
        assert views[("bob", "demo-1")]["reason"] == "checkout bug INC-9"
        assert set(rep["columns"]) >= {"viewer", "grant_id", "reason", "first_access"}

    r = await client.get("/_jit/api/audit/subjects/user-ada?format=csv", headers=ADMIN)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    text = await r.text()
    comments = [x for x in text.splitlines() if x.startswith("#")]
    assert comments[0] == "# jitgate: who viewed recordings of data subject user-ada"
    assert "# reason: the reason the viewer gave for the grant" in comments
    rows = list(
        csv.DictReader(io.StringIO("\n".join(x for x in text.splitlines() if x[:1] != "#")))
    )
    assert sorted((row["viewer"], row["recording"], row["requests"]) for row in rows) == [
        ("alice", "demo-1", "2"), ("bob", "demo-1", "1"), ("carol", "demo-3", "1"),
    ]  # fmt: skip

    r = await client.get("/_jit/api/audit/subjects/user-ada?since=2h", headers=ADMIN)
    assert len((await r.json())["views"]) == 3
    r = await client.get("/_jit/api/audit/subjects/user-ada?until=2020-01-01", headers=ADMIN)
    assert (await r.json())["views"] == []
    r = await client.get("/_jit/api/audit/subjects/nobody", headers=ADMIN)
    assert (await r.json())["views"] == []
    # The audit query filters by subject too.
    r = await client.get("/_jit/api/audit?subject=user-bo", headers=ADMIN)
    records = (await r.json())["records"]
    assert [(x["user"], x["recording"]) for x in records] == [("alice", "demo-2")]


async def test_the_report_is_for_admins_and_bad_input_is_refused(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = trail
    r = await client.get("/_jit/api/audit/subjects/user-ada", headers=as_user("alice"))
    assert r.status == 403 and (await r.json())["error"] == "forbidden"
    r = await client.get("/_jit/api/audit/subjects/user-ada?format=xml", headers=ADMIN)
    assert r.status == 400
    r = await client.get("/_jit/api/audit/subjects/user-ada?since=someday", headers=ADMIN)
    assert r.status == 400 and "cannot read time" in (await r.json())["message"]
    doc = await (await client.get("/_jit/api/openapi.json")).json()
    assert "/api/audit/subjects/{subject}" in doc["paths"]


async def test_the_audit_page_filters_by_subject(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = trail
    r = await client.get("/_jit/audit?subject=user-ada", headers={**ADMIN, "Accept": "text/html"})
    assert r.status == 200
    body = await r.text()
    rows = re.findall(r"<tr>\s*<td>.*?</tr>", body, re.S)
    assert len(rows) == 4 and not [x for x in rows if "demo-2" in x]
    assert 'value="user-ada"' in body
    assert 'href="/_jit/api/audit/subjects/user-ada?format=csv"' in body


async def test_cli_subject_straight_and_through_the_api(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, grants = trail
    for token in (None, make_token("sam", groups=["security"])):
        code, out, err = await jg(client, "subject", "user-ada", token=token)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["VIEWER", "RECORDING", "GRANT"]
        assert any(grants["bob/demo-1"] in x and "checkout bug INC-9" in x for x in lines)
        assert lines[-1] == "3 view(s) in 4 record(s)"
        code, out, _ = await jg(client, "subject", "user-ada", "--format", "csv", token=token)
        assert code == 0 and out.startswith("# jitgate: who viewed recordings of data subject")
        code, out, _ = await jg(client, "query", "--subject", "user-bo", "--json", token=token)
        assert code == 0 and [r["recording"] for r in json.loads(out)["records"]] == ["demo-2"]
        code, out, _ = await jg(client, "subject", "nobody", "--json", token=token)
        assert code == 1 and json.loads(out)["views"] == []
    code, _, err = await jg(client, "subject", "user-ada", "--since", "last week")
    assert code == 2 and "cannot read time" in err


async def test_plain_ids_and_unknown_subjects(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, "plain")
    await view(client, "alice", "demo-2", "follow-up", 1)
    tool.status = 500  # the tool cannot describe demo-1: the access is still recorded
    await view(client, "alice", "demo-1", "refund", 1)
    await client.app[STATE].audit.flush(force=True)
    allowed = {r["recording"]: r for r in file_records(client) if r["event"] == "access.done"}
    assert allowed["demo-2"]["subject"] == "user-bo"
    assert "subject" not in allowed["demo-1"]
    assert allowed["demo-1"]["subject_error"] == (
        "posthog answered 500 for recording:1/demo-1's metadata"
    )
    r = await client.get("/_jit/api/audit/subjects/user-bo", headers=ADMIN)
    assert [v["recording"] for v in (await r.json())["views"]] == ["demo-2"]
    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_metadata_lookups_total{source="error"}' in metrics


async def test_forward_auth_records_carry_the_subject_too(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "subject.key").write_text(KEY)
    extra = METADATA.format(audit="hash") + (
        "forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}\n"
    )
    client = await make_proxy(upstream_url=tool.url, extra=extra)
    r = await client.post(
        "/_jit/api/requests",
        json={"scope": "recording:1/demo-2", "reason": "follow-up", "duration": "5m"},
        headers=as_user("alice"),
    )
    assert r.status == 201
    asked = {"X-Original-URI": SNAPSHOTS.format("demo-2"), "X-Original-Method": "GET"}
    r = await client.get("/_jit/authz", headers={**asked, **as_user("alice")})
    assert r.status == 200
    await client.app[STATE].audit.flush(force=True)
    (record,) = [x for x in file_records(client) if x.get("mode") == "forward_auth"]
    assert record["event"] == "access.allow" and record["subject"] == hashed("user-bo")


async def test_metadata_is_fetched_at_grant_time(
    make_proxy: ProxyFactory, tmp_path: Path, tool: FakeTool
) -> None:
    client = await start(make_proxy, tmp_path, tool, "hash")
    r = await client.post(
        "/_jit/api/requests",
        json={"scope": "recording:1/demo-3", "reason": "cart crash", "duration": "5m"},
        headers=as_user("carol"),
    )
    assert r.status == 201
    # Before any access: the grant alone started the fetch, and Redis keeps the answer.
    await eventually(lambda: tool.metadata_hits(), what="the grant-time fetch")
    redis = client.app[STATE].redis
    await eventually(lambda: redis.exists("jit:meta:recording:1/demo-3"), what="the cache")
    assert tool.metadata_hits() == ["/api/projects/1/session_recordings/demo-3"]


async def test_trimming_removes_the_subject_index_with_the_records(
    make_proxy: ProxyFactory, tool: FakeTool, tmp_path: Path
) -> None:
    client = await start(make_proxy, tmp_path, tool, "hash")
    redis = client.app[STATE].redis
    form = SubjectForm("hash", KEY.encode())
    store = AuditStore(redis, "jit:trimtest", maxlen=None)
    lines = [
        json.dumps({"event": "access.allow", "ts": 1_700_000_000 + i, "user": "alice",
                    "subject": form(f"person-{i % 2}"), "grant_id": "g-1"})
        for i in range(10)
    ]  # fmt: skip
    await store.write(lines)
    index = store.index_key("subject", form("person-0"))
    assert await redis.zcard(index) == 5
    assert await AuditStore(redis, "jit:trimtest", maxlen=4).maintain() == 6
    assert await redis.zcard(index) == 2  # the records left are the newest four
    assert await AuditStore(redis, "jit:trimtest", maxlen=0).maintain() == 4
    assert not await redis.exists(index)


async def test_the_report_counts_decision_and_completion_pairs_once(redis_url: str) -> None:
    """A trail that writes a decision before the response and access.done after it."""
    redis = Redis.from_url(redis_url)
    form = SubjectForm("plain")
    store = AuditStore(redis, "jit:pairs", maxlen=None)
    base = {"user": "alice", "grant_id": "g-1", "recording": "demo-1", "subject": "ada"}
    lines = [
        {**base, "event": "access.allow", "ts": 1_700_000_000.0, "time": "2023-11-14T22:13:20Z"},
        {**base, "event": "access.done", "ts": 1_700_000_001.0, "time": "2023-11-14T22:13:21Z",
         "status": 200, "bytes": 100},
        {**base, "event": "access.allow", "ts": 1_700_000_002.0, "time": "2023-11-14T22:13:22Z",
         "status": 200, "bytes": 50},  # one record for the whole request
        {**base, "event": "access.allow", "ts": 1_700_000_003.0, "time": "2023-11-14T22:13:23Z"},
    ]  # fmt: skip
    try:
        await store.write([json.dumps(x) for x in lines])
        (view,) = (await report(store, "ada", form.stored("ada")))["views"]
        assert (view["requests"], view["bytes"]) == (2, 150)
        assert view["first_access"] == "2023-11-14T22:13:20Z"
        assert view["last_access"] == "2023-11-14T22:13:23Z"  # still being answered
    finally:
        await redis.aclose()
