"""Asking the trail: `GET /_jit/api/audit`, grant summaries, and `jitgate audit query|summary`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, make_token

from proxy.state import STATE

JITGATE = str(Path(sys.executable).parent / "jitgate")
RECORDING = "/api/projects/1/session_recordings/{}/snapshots"
ADMIN = {"Authorization": f"Bearer {make_token('sam', groups=['security'])}"}


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user)}"}


@pytest.fixture
async def trail(make_proxy: ProxyFactory) -> tuple[TestClient, dict[str, str]]:
    """A proxy whose trail holds: alice and bob granted demo-1, alice demo-2, some denials."""
    client = await make_proxy(extra="admins: {groups: [security]}")
    grants: dict[str, str] = {}
    for user, rec, reason in (
        ("alice", "demo-1", "=HYPERLINK(customer complaint SUP-12)"),
        ("bob", "demo-1", "checkout bug INC-9"),
        ("alice", "demo-2", "follow-up"),
    ):
        r = await client.post(
            "/_jit/api/requests",
            json={"scope": f"recording:1/{rec}", "reason": reason, "duration": "5m"},
            headers=as_user(user),
        )
        assert r.status == 201, await r.text()
        grants[f"{user}/{rec}"] = (await r.json())["id"]
    for _ in range(3):
        assert (
            await client.get(RECORDING.format("demo-1"), headers=as_user("alice"))
        ).status == 200
    assert (await client.get(RECORDING.format("demo-1"), headers=as_user("bob"))).status == 200
    assert (await client.get(RECORDING.format("demo-2"), headers=as_user("alice"))).status == 200
    assert (await client.get(RECORDING.format("demo-3"), headers=as_user("carol"))).status == 403
    await client.app[STATE].audit.flush(force=True)
    return client, grants


async def api(client: TestClient, path: str, headers: dict[str, str] = ADMIN) -> Any:
    r = await client.get(path, headers=headers)
    assert r.status == 200, await r.text()
    return await r.json()


async def test_who_viewed_a_recording_and_why(trail: tuple[TestClient, dict[str, str]]) -> None:
    client, grants = trail
    data = await api(client, "/_jit/api/audit?recording=demo-1&event=access.allow")
    views = [(r["user"], r["grant_id"], r["why"]) for r in data["records"]]
    assert views == [
        ("alice", grants["alice/demo-1"], "=HYPERLINK(customer complaint SUP-12)")
    ] * 3 + [("bob", grants["bob/demo-1"], "checkout bug INC-9")]
    assert data["next"] is None
    # Without the event filter the grant events for that recording come too, in time order.
    everything = await api(client, "/_jit/api/audit?recording=demo-1")
    events = [r["event"] for r in everything["records"]]
    assert events.count("grant.requested") == 2 and events.count("grant.activated") == 2
    times = [r["ts"] for r in everything["records"]]
    assert times == sorted(times)


async def test_what_a_user_viewed(trail: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = trail
    data = await api(client, "/_jit/api/audit?user=alice&event=access.allow&since=30d")
    assert [r["recording"] for r in data["records"]] == ["demo-1"] * 3 + ["demo-2"]
    assert {r["path"] for r in data["records"]} == {
        RECORDING.format("demo-1"),
        RECORDING.format("demo-2"),
    }
    denied = await api(client, "/_jit/api/audit?event=access.deny&user=carol")
    assert [r["status"] for r in denied["records"]] == [403]
    future = await api(client, "/_jit/api/audit?user=alice&since=2999-01-01")
    assert future["records"] == []


async def test_paging_with_the_cursor_gives_everything_once(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = trail
    whole = [r["id"] for r in (await api(client, "/_jit/api/audit?order=desc"))["records"]]
    seen: list[str] = []
    cursor = None
    while True:
        page = await api(
            client, "/_jit/api/audit?order=desc&limit=2" + (f"&cursor={cursor}" if cursor else "")
        )
        seen += [r["id"] for r in page["records"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == whole and len(seen) == len(set(seen)) > 10


async def test_csv_and_jsonl_exports(trail: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = trail
    r = await client.get("/_jit/api/audit?recording=demo-1&format=csv&limit=2", headers=ADMIN)
    assert r.status == 200 and r.content_type == "text/csv"
    assert r.headers["X-Next-Cursor"]
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert len(rows) == 2 and rows[0]["event"] == "grant.requested"
    # A value a spreadsheet would run as a formula is written as text.
    assert rows[0]["reason"].startswith("'=HYPERLINK")
    r = await client.get("/_jit/api/audit?user=bob&format=jsonl", headers=ADMIN)
    assert r.content_type == "application/x-ndjson"
    lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert lines and all(x["user"] == "bob" for x in lines)


async def test_queries_are_for_admins_and_bad_filters_are_refused(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, grants = trail
    assert (await client.get("/_jit/api/audit")).status == 401
    r = await client.get("/_jit/api/audit", headers=as_user("alice"))
    assert r.status == 403 and (await r.json())["error"] == "forbidden"
    summary = f"/_jit/api/audit/grants/{grants['alice/demo-1']}/summary"
    assert (await client.get(summary, headers=as_user("alice"))).status == 403
    for bad, word in (
        ("since=yesterday-ish", "cannot read time"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("order=sideways", "order"),
        ("cursor=nonsense", "cursor"),
        ("since=2026-10-02&until=2026-10-01", "until"),
        ("format=xml", "format"),
    ):
        r = await client.get(f"/_jit/api/audit?{bad}", headers=ADMIN)
        body = await r.json()
        assert r.status == 400 and word in body["message"], (bad, body)


async def test_grant_summary(trail: tuple[TestClient, dict[str, str]]) -> None:
    client, grants = trail
    s = await api(client, f"/_jit/api/audit/grants/{grants['alice/demo-1']}/summary")
    assert s["user"] == "alice" and s["scope"] == "recording:1/demo-1"
    assert s["reason"] == "=HYPERLINK(customer complaint SUP-12)"
    assert s["requests"] == {"allowed": 3, "denied": 0}
    assert s["recordings"] == ["demo-1"]
    [resource] = s["resources"]
    assert resource["path"] == RECORDING.format("demo-1") and resource["requests"] == 3
    assert s["bytes"] == resource["bytes"] > 0
    assert s["first_access"] <= s["last_access"]
    assert [e["event"] for e in s["events"]] == ["grant.requested", "grant.activated"]
    r = await client.get("/_jit/api/audit/grants/g-nope/summary", headers=ADMIN)
    assert r.status == 404


async def jg(client: TestClient, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run `jitgate audit ...` as a process, straight on Redis or (with a token) via the API."""
    cfg = str(client.app[STATE].settings.file)
    extra = ["--url", str(client.make_url("")).rstrip("/"), "--token", token] if token else []
    proc = await asyncio.create_subprocess_exec(
        JITGATE, "audit", *args, "--config", cfg, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_query_straight_and_through_the_api(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = trail
    for token in (None, make_token("sam", groups=["security"])):
        code, out, err = await jg(
            client, "query", "--recording", "demo-1", "--event", "access.allow", token=token
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["TIME", "EVENT", "USER"]
        assert sum("alice" in x and "customer complaint SUP-12" in x for x in lines) == 3
        assert sum("bob" in x and "checkout bug INC-9" in x for x in lines) == 1
        assert lines[-1] == "4 record(s)"

        code, out, _ = await jg(
            client, "query", "--user", "alice", "--format", "jsonl", "--limit", "1", "--all",
            token=token,
        )  # fmt: skip
        recs = [json.loads(x) for x in out.splitlines()]
        assert code == 0 and len(recs) > 4 and {r["user"] for r in recs} == {"alice"}

        code, out, _ = await jg(client, "query", "--user", "nobody", token=token)
        assert code == 1 and out.strip().endswith("0 record(s)")

    code, _, err = await jg(client, "query", token=make_token("alice"))
    assert code == 2 and "forbidden" in err
    code, _, err = await jg(client, "query", "--since", "last tuesday")
    assert code == 2 and "cannot read time" in err


async def test_cli_summary(trail: tuple[TestClient, dict[str, str]]) -> None:
    client, grants = trail
    code, out, err = await jg(client, "summary", grants["bob/demo-1"])
    assert code == 0, err
    assert "checkout bug INC-9" in out and "1 allowed, 0 denied" in out
    assert RECORDING.format("demo-1") in out
    code, out, _ = await jg(
        client,
        "summary",
        grants["bob/demo-1"],
        "--json",
        token=make_token("sam", groups=["security"]),
    )
    assert code == 0 and json.loads(out)["requests"]["allowed"] == 1
    code, _, err = await jg(client, "summary", "g-missing")
    assert code == 1 and "no audit records" in err


async def test_cli_reindex_makes_unindexed_records_findable(
    trail: tuple[TestClient, dict[str, str]],
) -> None:
    client, _ = trail
    stream = client.app[STATE].audit_store
    rec = {"id": "old-1", "ts": 1.0, "event": "access.allow", "user": "olga"}
    line = json.dumps({**rec, "time": "1970-01-01T00:00:01+00:00", "scope": "recording:1/old"})
    await stream.redis.xadd(stream.key, {"record": line})  # as a writer without indexes did
    code, out, _ = await jg(client, "query", "--user", "olga")
    assert code == 1
    code, out, err = await jg(client, "reindex")
    assert code == 0 and out.startswith("indexed "), err
    code, out, _ = await jg(client, "query", "--user", "olga", "--format", "jsonl")
    assert code == 0 and [json.loads(x)["id"] for x in out.splitlines()] == ["old-1"]
