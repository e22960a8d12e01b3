"""References in responses (proxy/refs.py), end to end through jitgate.

A real upstream answers with JSON that points at recordings, by URL (a heatmap whose
backdrop is a recording's events, as in a self-hosted rrweb tool) and by id; grants live in
the test session's real redis-server, and every answer is read as a client would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import bearer

from proxy.errors import ConfigErrors
from proxy.policyfile import compile_text
from proxy.state import STATE

POLICY = """\
version: 1
default: identity
routes:
  - id: heatmap
    path: /api/heatmaps/{heatmap}
    access: identity
    refs:
      - field: backdrop.events_url
      - field: pages.*.recording
        scope: "recording:{recording}"
        drop: [title]
        locked: {locked}
  - id: open-page
    path: /api/pages/{page}
    access: identity
  - id: share
    path: /api/recordings/{recording}/share
    access: blocked
  - id: recording
    path: /api/recordings/{recording}
    subpaths: true
    scope: "recording:{recording}"
    refs:
      - field: next_url
"""

HEATMAP = {
    "id": "h1",
    "backdrop": {"events_url": "/api/recordings/r1/events?from=0", "width": 1280},
    "pages": [
        {"recording": "r1", "title": "checkout"},
        {"recording": "r2", "title": "cart"},
        {"recording": None, "title": "no recording"},
        {"recording": "bad/id", "title": "odd"},
    ],
}


def _upstream_app() -> web.Application:
    async def heatmap(request: web.Request) -> web.Response:
        body = {**HEATMAP}
        url = request.query.get("backdrop")
        if url is not None:
            body["backdrop"] = {"events_url": url}
        return web.json_response(body)

    async def recording(request: web.Request) -> web.Response:
        return web.json_response({"id": "r1", "next_url": "/api/recordings/r2/events"})

    app = web.Application()
    app.router.add_get("/api/heatmaps/{heatmap}", heatmap)
    app.router.add_get("/api/recordings/{recording}", recording)
    return app


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def start(make_proxy: Any, aiohttp_server: Any) -> Start:
    server = await aiohttp_server(_upstream_app())
    url = str(server.make_url("")).rstrip("/")

    async def go(locked: str = "mark", **kw: Any) -> TestClient:
        text = POLICY.replace("{locked}", locked)
        return await make_proxy(policy_text=text, upstream_url=url, **kw)  # type: ignore[no-any-return]

    return go


async def fetch(client: TestClient, path: str = "/api/heatmaps/h1") -> Any:
    resp = await client.get(path, headers=bearer("alice"))
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    return await resp.json()


def lock(scope: str | None) -> dict[str, Any]:
    url = None if scope is None else f"/_jit/request?scope={scope}"
    return {"jitgate": {"locked": True, "scope": scope, "request_url": url}}


async def test_references_are_locked_until_granted_and_after_revocation(start: Start) -> None:
    client = await start()
    body = await fetch(client)
    assert body["backdrop"] == {"events_url": lock("recording:r1"), "width": 1280}
    assert body["pages"] == [
        {"recording": lock("recording:r1")},  # its title went with it (drop:)
        {"recording": lock("recording:r2")},
        {"recording": None, "title": "no recording"},  # points at nothing: left alone
        {"recording": lock(None)},  # cannot be a scope: locked, with no link
    ]
    grants = client.app[STATE].grants
    grant = await grants.add("alice", "recording:r1", 300, "test", "admin")
    body = await fetch(client)
    assert body["backdrop"] == HEATMAP["backdrop"]
    assert body["pages"][0] == HEATMAP["pages"][0]
    assert body["pages"][1] == {"recording": lock("recording:r2")}
    await grants.revoke(grant.id, "admin")
    body = await fetch(client)
    assert body["backdrop"]["events_url"] == lock("recording:r1")
    assert body["pages"][0] == {"recording": lock("recording:r1")}
    metrics = client.app[STATE].metrics.registry
    labels = {"route": "heatmap", "outcome": "checked"}
    assert metrics.get_sample_value("jitgate_ref_responses_total", labels) == 3


async def test_locked_remove_drops_the_field(start: Start) -> None:
    client = await start(locked="remove")
    pages = (await fetch(client))["pages"]
    assert pages[:2] == [{}, {}]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/api/pages/p1", "/api/pages/p1"),  # an identity route: no grant needed
        ("http://replay.example/api/pages/p1", "http://replay.example/api/pages/p1"),
        ("/_jit/blob/abc", "/_jit/blob/abc"),  # jitgate's own (a signed URL)
        ("/api/recordings/r9/share", lock(None)),  # blocked for everyone
        ("/api/recordings/r9%2Fevents", lock(None)),  # a path jitgate refuses
        ("/api/x/../recordings/r9", lock("recording:r9")),  # decided as it would be forwarded
        ("javascript:alert(1)", lock(None)),
        ("relative/path", lock(None)),
    ],
)
async def test_a_url_reference_is_decided_by_the_policy(
    start: Start, url: str, expected: Any
) -> None:
    client = await start()
    resp = await client.get("/api/heatmaps/h1", params={"backdrop": url}, headers=bearer())
    assert (await resp.json())["backdrop"] == {"events_url": expected}


async def test_references_on_a_protected_route_with_the_status_bar(start: Start) -> None:
    client = await start(extra="forward:\n  status_bar: true\n")
    await client.app[STATE].grants.add("alice", "recording:r1", 300, "test", "admin")
    body = await fetch(client, "/api/recordings/r1")
    assert body == {"id": "r1", "next_url": lock("recording:r2")}


async def test_grants_unknown_remove_every_reference(own_redis: Any, start: Start) -> None:
    client = await start(redis=own_redis.url)
    await client.app[STATE].grants.add("alice", "recording:r1", 300, "test", "admin")
    assert (await fetch(client))["backdrop"] == HEATMAP["backdrop"]
    own_redis.kill()
    body = await fetch(client)
    assert body["backdrop"] == {"width": 1280}
    assert body["pages"][:2] == [{}, {}] and body["pages"][2] == HEATMAP["pages"][2]
    labels = {"route": "heatmap", "outcome": "unavailable"}
    assert client.app[STATE].metrics.registry.get_sample_value(
        "jitgate_ref_responses_total", labels
    )
    own_redis.start()  # the audit queue drains at shutdown instead of waiting out its grace


def test_refs_sections_are_checked() -> None:
    base = "routes:\n  - id: r\n    path: /p/{project}/x\n    access: identity\n    refs:\n"
    good = compile_text(base + '      - {field: a.*.b, scope: "r:{project}/{x}"}\n', "p")
    (ref,) = good.routes[0].refs
    assert (ref.at, ref.var, ref.remove) == (("a", "*", "b"), "x", False)
    bad = {
        "      - {field: a.*}\n": "dotted key path",
        "      - {field: 'a..b'}\n": "dotted key path",
        '      - {field: a, scope: "r:{project}"}\n': "one more",
        "      - {field: a, when: {k: [1]}}\n": "sibling fields to strings",
        "      - {field: a, drop: x}\n": "list of sibling field names",
        "      - {field: a, locked: hide}\n": "mark or remove",
        "      - {field: a, nope: 1}\n": "unknown field",
        "      - 1\n": "must be a mapping",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigErrors) as exc:
            compile_text(base + text, "p")
        assert message in str(exc.value), text
    with pytest.raises(ConfigErrors, match="only identity and protected"):
        compile_text(base.replace("identity", "public") + "      - {field: a}\n", "p")
    with pytest.raises(ConfigErrors, match="non-empty list"):
        compile_text(base + "      {}\n", "p")
