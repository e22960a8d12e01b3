"""Lists that show what the caller may open (proxy/lists.py), end to end through jitgate.

A real upstream serves the presets' recorded list shapes (tests/fixtures/presets/), grants
live in the test session's real redis-server, and every answer is read as a client would.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, bearer, count_round_trips
from redis.asyncio import Redis

from proxy.errors import ConfigErrors
from proxy.grantstore import RedisGrants
from proxy.grantview import GrantView
from proxy.policyfile import compile_text
from proxy.state import STATE

FIXTURES = ROOT / "tests" / "fixtures" / "presets"
POSTHOG = json.loads((FIXTURES / "posthog" / "recording_list.json").read_text())
SENTRY = json.loads((FIXTURES / "sentry" / "replay_list.json").read_text())
OPENREPLAY = json.loads((FIXTURES / "openreplay" / "search.json").read_text())
IDS = [r["id"] for r in POSTHOG["results"]]  # 0192ab-c1, 0192ab-c2
SMALL_CAP = 64 * 1024
release = asyncio.Event()  # lets the huge list's upstream send its end


async def _huge(request: web.Request) -> web.StreamResponse:
    """A list far over the cap, whose end is sent only once the test has read its start."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    item = json.dumps(POSTHOG["results"][0]).encode()
    await resp.write(b'{"results": [' + item)
    for _ in range(2 * SMALL_CAP // len(item)):
        await resp.write(b"," + item)
    await release.wait()
    await resp.write(b'], "has_next": false}')
    await resp.write_eof()
    return resp


def _upstream_app() -> web.Application:
    posthog = json.dumps(POSTHOG).encode()

    async def posthog_list(request: web.Request) -> web.Response:
        mode = request.query.get("as", "")
        if mode == "gzip":
            if request.headers.get("Accept-Encoding") == "identity":
                return web.Response(status=500, text="asked for identity")
            return web.Response(
                body=gzip.compress(posthog),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if mode == "br":
            return web.Response(
                body=b"\x0b\x03\x80not-really-brotli\x03",
                headers={"Content-Type": "application/json", "Content-Encoding": "br"},
            )
        if mode == "malformed":
            return web.Response(body=posthog[:-9], content_type="application/json")
        if mode == "error":
            body = json.dumps({"results": POSTHOG["results"], "detail": "x"}).encode()
            return web.Response(status=500, body=body, content_type="application/json")
        if mode == "shape":
            return web.json_response({"results": {IDS[0]: POSTHOG["results"][0]}})
        if mode == "text":
            return web.Response(body=posthog, content_type="text/plain")
        if mode == "echo":
            return web.json_response({"results": [], "headers": dict(request.headers)})
        return web.Response(body=posthog, content_type="application/json")

    async def sentry_list(request: web.Request) -> web.Response:
        return web.json_response(SENTRY)

    async def openreplay_search(request: web.Request) -> web.Response:
        assert (await request.json())["limit"] == 10  # the search body reaches the upstream
        return web.json_response(OPENREPLAY)

    app = web.Application()
    app.router.add_post("/api/5/sessions/search", openreplay_search)
    app.router.add_get("/api/projects/2/session_recordings", posthog_list)
    app.router.add_get("/api/environments/2/session_recordings", posthog_list)
    app.router.add_get("/api/projects/3/session_recordings", _huge)
    app.router.add_get("/api/0/organizations/acme/replays", sentry_list)
    return app


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def start(make_proxy: Any, aiohttp_server: Any) -> Start:
    release.clear()
    server = await aiohttp_server(_upstream_app())
    url = str(server.make_url("")).rstrip("/")

    async def go(
        mode: str, preset: str = "posthog", cap: int | None = None, **kw: Any
    ) -> TestClient:
        text = f"preset: {preset}\nlists: {mode}\n"
        if cap is not None:
            text += f"list_max_bytes: {cap}\n"
        kw.setdefault("upstream_url", url)
        return await make_proxy(policy_text=text, **kw)  # type: ignore[no-any-return]

    return go


async def get(client: TestClient, path: str, user: str = "alice") -> tuple[int, Any, Any]:
    resp = await client.get(path, headers=bearer(user))
    body = await resp.read()
    return resp.status, resp.headers, body


def outcome(client: TestClient, route: str, what: str) -> float:
    value = client.app[STATE].metrics.registry.get_sample_value(
        "jitgate_list_responses_total", {"route": route, "outcome": what}
    )
    return value or 0.0


LIST = "/api/projects/2/session_recordings"


async def test_pass_leaves_the_list_as_it_came(start: Start) -> None:
    client = await start("pass")
    status, headers, body = await get(client, LIST)
    assert status == 200
    assert json.loads(body) == POSTHOG
    assert "Cache-Control" not in headers


async def test_annotate_marks_what_the_caller_may_not_open(start: Start, tmp_path: Path) -> None:
    client = await start("annotate")
    grants = client.app[STATE].grants
    await grants.add("alice", f"recording:2/{IDS[1]}", 300, "test", "admin")
    for path in (LIST, "/api/environments/2/session_recordings"):
        status, headers, body = await get(client, path)
        assert status == 200
        doc = json.loads(body)
        assert int(headers["Content-Length"]) == len(body)
        assert headers["Cache-Control"] == "no-store"
        assert [r["id"] for r in doc["results"]] == IDS
        assert doc["has_next"] is False
        locked, opened = doc["results"]
        assert locked["jitgate"] == {
            "locked": True,
            "scope": f"recording:2/{IDS[0]}",
            "request_url": f"/_jit/request?scope=recording:2/{IDS[0]}",
        }
        assert "jitgate" not in opened
        assert {k: v for k, v in locked.items() if k != "jitgate"} == POSTHOG["results"][0]
    assert outcome(client, "posthog.recording-list", "annotate") == 1
    assert await list_reasons(client, tmp_path) == ["list annotate: 1 of 2 locked"] * 2
    # The marker's link is jitgate's own request page for that scope.
    resp = await client.get(locked["jitgate"]["request_url"], headers=bearer("alice"))
    assert resp.status != 404


async def test_filter_removes_what_the_caller_may_not_open(start: Start) -> None:
    client = await start("filter")
    status, _, body = await get(client, LIST)
    assert status == 200 and json.loads(body)["results"] == []
    await client.app[STATE].grants.add("alice", f"recording:2/{IDS[0]}", 300, "test", "admin")
    status, headers, body = await get(client, LIST)
    doc = json.loads(body)
    assert [r["id"] for r in doc["results"]] == [IDS[0]]
    assert doc["results"][0] == POSTHOG["results"][0]
    assert int(headers["Content-Length"]) == len(body)
    # Another caller's grant opens nothing for bob.
    _, _, body = await get(client, LIST, user="bob")
    assert json.loads(body)["results"] == []


async def test_a_grant_unlocks_and_its_revocation_locks_again(start: Start) -> None:
    client = await start("annotate")
    grants = client.app[STATE].grants

    async def locked() -> list[bool]:
        _, _, body = await get(client, LIST)
        return ["jitgate" in r for r in json.loads(body)["results"]]

    assert await locked() == [True, True]
    # A project grant covers every recording of it (the preset's hierarchy).
    grant = await grants.add("alice", "project:2", 300, "test", "admin")
    assert await locked() == [False, False]
    await grants.revoke(grant.id, "admin")
    assert await locked() == [True, True]
    # Another project's grant is no help.
    await grants.add("alice", "project:7", 300, "test", "admin")
    assert await locked() == [True, True]


async def test_sentry_replay_index(start: Start) -> None:
    client = await start("filter", preset="sentry")
    path = "/api/0/organizations/acme/replays"
    _, _, body = await get(client, path)
    assert json.loads(body) == {"data": []}
    replay = SENTRY["data"][0]["id"]
    await client.app[STATE].grants.add("alice", f"replay:acme/{replay}", 300, "test", "admin")
    _, _, body = await get(client, path)
    assert json.loads(body) == SENTRY


async def test_openreplay_session_search(start: Start) -> None:
    client = await start("annotate", preset="openreplay")
    sessions = OPENREPLAY["data"]["sessions"]
    first, second = (str(x["sessionId"]) for x in sessions[:2])
    await client.app[STATE].grants.add("alice", f"session:5/{second}", 300, "test", "admin")
    resp = await client.post("/api/5/sessions/search", json={"limit": 10}, headers=bearer())
    assert resp.status == 200
    got = (await resp.json())["data"]["sessions"]
    assert got[0]["jitgate"]["scope"] == f"session:5/{first}"
    assert "jitgate" not in got[1] and got[1] == sessions[1]
    assert (await resp.json())["data"]["total"] == OPENREPLAY["data"]["total"]


async def test_grants_unknown_fail_closed(own_redis: Any, start: Start) -> None:
    client = await start("annotate", redis=own_redis.url)
    await client.app[STATE].grants.add("alice", "project:2", 300, "test", "admin")
    _, _, body = await get(client, LIST)
    assert [r["id"] for r in json.loads(body)["results"]] == IDS
    own_redis.kill()  # the grants cannot be checked: nothing is shown, locked or open
    status, _, body = await get(client, LIST)
    assert status == 200 and json.loads(body)["results"] == []
    assert outcome(client, "posthog.recording-list", "unavailable") == 1
    own_redis.start()  # the audit queue drains at shutdown instead of waiting out its grace


async def test_over_the_cap_passes_unchanged_and_is_counted(start: Start, tmp_path: Path) -> None:
    client = await start("filter", cap=1000)
    status, _, body = await get(client, LIST)
    assert status == 200 and json.loads(body) == POSTHOG
    assert outcome(client, "posthog.recording-list", "over_cap") == 1
    await get(client, "/api/environments/2/session_recordings?as=echo")  # under the cap
    assert await list_reasons(client, tmp_path) == [
        "list passed unchanged: over_cap",
        "list filter: 0 of 0 locked",
    ]


async def list_reasons(client: TestClient, tmp_path: Path) -> list[str]:
    """The list notes in the audit records of the requests so far, in order."""
    await client.app[STATE].audit.flush(force=True)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    return [r for rec in records for r in rec.get("reasons", []) if r.startswith("list ")]


async def test_a_huge_list_is_streamed_not_held(start: Start) -> None:
    client = await start("filter", cap=SMALL_CAP)
    async with asyncio.timeout(30):  # a bound for a hang, not a timed assert
        resp = await client.get("/api/projects/3/session_recordings", headers=bearer())
        assert resp.status == 200
        # Past the cap, before the upstream has sent its end: nothing holds the rest.
        start_ = await resp.content.readexactly(2 * SMALL_CAP)
        assert start_.startswith(b'{"results": [')
        release.set()
        body = start_ + await resp.read()
    doc = json.loads(body)
    assert doc["has_next"] is False and len(doc["results"]) > 10
    assert outcome(client, "posthog.recording-list", "over_cap") == 1


async def test_compressed_lists(start: Start) -> None:
    client = await start("filter")
    # jitgate asks for identity on list routes: this upstream refuses to gzip then.
    asked = {"Range": "bytes=0-99", "If-None-Match": '"v1"', "Accept": "text/html"}
    resp = await client.get(f"{LIST}?as=echo", headers={**bearer(), **asked})
    sent = (await resp.json())["headers"]
    assert sent["Accept-Encoding"] == "identity" and sent["Accept"] == "application/json"
    assert "Range" not in sent and "If-None-Match" not in sent  # no part, no stale 304
    status, _, _ = await get(client, f"{LIST}?as=gzip")
    assert status == 500
    # One that compresses anyway with an encoding jitgate does not decode: as it came.
    resp = await client.get(
        f"{LIST}?as=br", headers={**bearer(), "Accept-Encoding": "br"}, auto_decompress=False
    )
    assert resp.headers["Content-Encoding"] == "br"
    assert await resp.read() == b"\x0b\x03\x80not-really-brotli\x03"
    assert outcome(client, "posthog.recording-list", "encoded") == 1


async def test_a_gzip_list_is_decoded_and_rewritten(start: Start, aiohttp_server: Any) -> None:
    body = gzip.compress(json.dumps(POSTHOG).encode())

    async def gz(request: web.Request) -> web.Response:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get(LIST, gz)
    server = await aiohttp_server(app)
    client = await start("filter", upstream_url=str(server.make_url("")).rstrip("/"))
    resp = await client.get(LIST, headers=bearer())
    got = await resp.read()
    assert "Content-Encoding" not in resp.headers
    assert int(resp.headers["Content-Length"]) == len(got)
    assert json.loads(got)["results"] == []


@pytest.mark.parametrize("kind", ["malformed", "shape", "error", "text"])
async def test_what_is_not_a_json_list_passes_unchanged(start: Start, kind: str) -> None:
    client = await start("filter")
    resp = await client.get(f"{LIST}?as={kind}", headers=bearer())
    body = await resp.read()
    assert b"0192ab-c1" in body  # nothing was taken out
    if kind in ("malformed", "shape"):
        assert outcome(client, "posthog.recording-list", kind) == 1


def test_list_sections_are_checked(tmp_path: Path) -> None:
    base = "routes:\n  - id: l\n    path: /p/{project}/list\n    access: identity\n"
    good = compile_text(base + '    list: {items: a.b, id: id, scope: "r:{project}/{x}"}\n', "p")
    listing = good.routes[0].listing
    assert listing is not None
    assert (listing.items, listing.id, listing.var) == (("a", "b"), "id", "x")
    assert good.lists == "pass"
    bad = {
        '    list: {id: id, scope: "r:{project}"}\n': "one more",
        '    list: {id: id, scope: "r:{a}/{b}"}\n': "one more",
        '    list: {scope: "r:{project}/{x}"}\n': "list.id: is required",
        '    list: {items: "a..b", id: id, scope: "r:{x}"}\n': "dotted key path",
        '    list: {id: id, scope: "r:{x}", nope: 1}\n': "list.nope: unknown field",
        "    list: [1]\n": "must be a mapping",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigErrors) as exc:
            compile_text(base + text, "p")
        assert message in str(exc.value), text
    protected = base.replace("identity", "protected") + '    scope: "p:{project}"\n'
    with pytest.raises(ConfigErrors, match="only identity routes"):
        compile_text(protected + '    list: {id: id, scope: "r:{x}"}\n', "p")
    for top, message in (("lists: all\n", "annotate, filter or pass"),
                         ("list_max_bytes: 0\n", "positive")):  # fmt: skip
        with pytest.raises(ConfigErrors, match=message):
            compile_text("preset: posthog\n" + top, "p")


async def test_batch_check_is_one_round_trip_per_list(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    store = RedisGrants(client, "jit:")
    try:
        b = await store.add("alice", "recording:2/b", 300, "test", "admin")
        nine = await store.add("alice", "project:9", 300, "test", "admin")
        ended = await store.add("alice", "recording:2/c", 300, "test", "admin")
        await store.revoke(ended.id, "admin")
        groups = [("recording:2/a", "project:2"), ("recording:2/b", "project:2"),
                  ("recording:9/x", "project:9"), ("recording:2/c", "project:2")]  # fmt: skip
        sent = count_round_trips(client)
        assert await GrantView(store).check_many("alice", groups) == [None, b.id, nine.id, None]
        assert len(sent) == 1  # one connection taken: one pipeline, one round trip
        assert await store.check_many("bob", groups) == [None] * 4
        assert await store.entitlements([b.id, "gone"]) == {b.id: ""}
        assert len(sent) == 3  # the entitlements of many grants: one round trip as well
        assert await store.check_many("alice", []) == []
    finally:
        await client.aclose()


def test_an_override_that_ends_identity_drops_the_list() -> None:
    policy = compile_text(
        "preset: posthog\nlists: filter\noverrides:\n"
        "  - {id: posthog.recording-list, access: blocked}\n",
        "p",
    )
    routes = {r.id: r for r in policy.routes}
    assert routes["posthog.recording-list"].listing is None
    assert routes["posthog.recording-list-env"].listing is not None
    assert policy.lists == "filter"
