"""The audit pages: admins search the trail, see what a grant was used for, and export."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestClient
from conftest import ProxyFactory, make_token

from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/{}/snapshots"
HTML = {"Accept": "text/html"}


def as_user(user: str, groups: list[str] | None = None) -> dict[str, str]:
    return {**HTML, "Authorization": f"Bearer {make_token(user, groups=groups)}"}


ADMIN = as_user("sam", ["security"])


@pytest.fixture
async def trail(make_proxy: ProxyFactory) -> tuple[TestClient, str]:
    client = await make_proxy(extra="admins: {groups: [security]}")
    r = await client.post(
        "/_jit/api/requests",
        json={"scope": "recording:1/demo-1", "reason": "<script>alert(1)</script> SUP-7"},
        headers=as_user("alice"),
    )
    grant_id = (await r.json())["id"]
    for _ in range(2):
        await client.get(SNAPSHOTS.format("demo-1"), headers=as_user("alice"))
    await client.get(SNAPSHOTS.format("demo-2"), headers=as_user("bob"))
    await client.app[STATE].audit.flush(force=True)
    return client, grant_id


async def test_admins_search_who_viewed_a_recording_and_why(
    trail: tuple[TestClient, str],
) -> None:
    client, grant_id = trail
    r = await client.get("/_jit/audit?recording=demo-1&event=access.allow", headers=ADMIN)
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    assert "script-src" not in r.headers["Content-Security-Policy"]  # the pages run no script
    body = await r.text()
    rows = re.findall(r"<tr>\s*<td>.*?</tr>", body, re.S)
    assert len(rows) == 2 and all("alice" in row and grant_id in row for row in rows)
    # The reason is shown as text, never as markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; SUP-7" in body and "<script>alert" not in body
    assert f'href="/_jit/audit/grants/{grant_id}"' in body
    assert "/_jit/api/audit?recording=demo-1&amp;event=access.allow&amp;format=csv" in body
    assert 'value="demo-1"' in body  # the form keeps what was asked
    # bob's view of demo-2 is not in it
    assert "bob" not in "".join(rows)


async def test_paging_and_bad_filters(trail: tuple[TestClient, str]) -> None:
    client, _ = trail
    r = await client.get("/_jit/audit?user=alice&limit=1", headers=ADMIN)
    body = await r.text()
    assert r.status == 200 and "Next page" in body
    next_url = re.search(r'href="([^"]*cursor=[^"]*)"', body)
    assert next_url is not None
    r = await client.get(next_url.group(1).replace("&amp;", "&"), headers=ADMIN)
    assert r.status == 200
    r = await client.get("/_jit/audit?since=someday", headers=ADMIN)
    assert r.status == 400 and "cannot read time" in await r.text()


async def test_the_grant_page_shows_what_was_watched(trail: tuple[TestClient, str]) -> None:
    client, grant_id = trail
    r = await client.get(f"/_jit/audit/grants/{grant_id}", headers=ADMIN)
    body = await r.text()
    assert r.status == 200
    assert "2 allowed, 0 denied" in body
    assert SNAPSHOTS.format("demo-1") in body and "200x2" in body
    assert "grant.requested" in body and "grant.activated" in body
    assert "&lt;script&gt;" in body and "<script>" not in body
    r = await client.get("/_jit/audit/grants/g-nothing", headers=ADMIN)
    assert r.status == 404 and "No audit records" in await r.text()


async def test_only_admins_see_the_audit_pages(trail: tuple[TestClient, str]) -> None:
    client, grant_id = trail
    r = await client.get("/_jit/audit?user=alice", headers=as_user("alice"), allow_redirects=False)
    assert r.status == 403 and "for admins" in await r.text()
    r = await client.get(f"/_jit/audit/grants/{grant_id}", headers=as_user("alice"))
    assert r.status == 403
    r = await client.get("/_jit/audit?user=alice", headers=HTML, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].startswith("/_jit/login?next=")
