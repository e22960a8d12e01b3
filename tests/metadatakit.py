"""A fake replay tool that describes recordings in the tools' real shapes (tests/fixtures/metadata).

It answers the metadata routes of PostHog, Sentry and OpenReplay (only with the service
token), PostHog's snapshots route and its recordings list (the shape of
tests/fixtures/presets/posthog/recording_list.json); it records every request so a test
can count fetches.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "metadata"
LIST = ROOT / "tests" / "fixtures" / "presets" / "posthog" / "recording_list.json"
TOKEN = "phx_service_token_for_tests"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# PostHog recordings of the fake tool: recording id -> (distinct_id, email, start_url).
PEOPLE = {
    "demo-1": ("user-ada", "ada@example.com", "https://shop.example/billing/invoices"),
    "demo-2": ("user-bo", "bo@example.com", "https://shop.example/"),
    "demo-3": ("user-ada", "ada@example.com", "https://shop.example/cart"),
}


# The URLs each recording visited, as PostHog's query API names them (after its start URL).
VISITED = {
    "demo-1": ["https://shop.example/billing/invoices"],
    "demo-2": ["https://shop.example/", "https://shop.example/orders/77"],
    "demo-3": ["https://shop.example/cart"],
}


@dataclass
class FakeTool:
    server: TestServer
    hits: list[str] = field(default_factory=list)
    status: int = 200  # what the metadata routes answer; 200 serves the fixture
    queries: list[Any] = field(default_factory=list)  # the bodies posted to the query API

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def metadata_hits(self) -> list[str]:
        skip = ("/snapshots", "/session_recordings", "/query/")
        return [h for h in self.hits if not h.endswith(skip)]


def _posthog(recording: str) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(fixture("posthog_recording.json"))
    distinct_id, email, start = PEOPLE[recording]
    body.update(id=recording, distinct_id=distinct_id, start_url=start)
    body["person"]["distinct_ids"] = [distinct_id]
    body["person"]["properties"]["email"] = email
    return body


def _posthog_list() -> dict[str, Any]:
    """The recordings list, one item per recording of PEOPLE, as PostHog lists them."""
    shape = json.loads(LIST.read_text())
    item = shape["results"][0]
    items = [
        {**item, "id": rid, "distinct_id": who, "start_url": start}
        for rid, (who, _, start) in PEOPLE.items()
    ]
    return {**shape, "results": items}


async def fake_tool(aiohttp_server: Any) -> FakeTool:
    holder: list[FakeTool] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        tool = holder[0]
        tool.hits.append(request.path)
        if request.path.endswith("/snapshots"):  # people's own traffic, through jitgate
            return web.json_response({"snapshots": [{"type": 4, "data": {}}]})
        if request.path.endswith("/session_recordings"):
            return web.json_response(_posthog_list())
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"detail": "Authentication credentials"}, status=401)
        if tool.status != 200:
            return web.json_response({"detail": "unavailable"}, status=tool.status)
        info = request.match_info
        if request.method == "POST":  # the query API: the recording's visited URLs
            body = await request.json()
            tool.queries.append(body)
            query = body["query"]
            assert query["kind"] == "HogQLQuery" and "{session_id}" in query["query"]
            answer = fixture("posthog_urls_query.json")
            answer["results"] = [[u] for u in VISITED.get(query["values"]["session_id"], [])]
            return web.json_response(answer)
        if "recording" in info:
            if info["recording"] not in PEOPLE:
                return web.json_response({"detail": "Not found."}, status=404)
            return web.json_response(_posthog(info["recording"]))
        if "replay" in info:
            return web.json_response(fixture("sentry_replay.json"))
        return web.json_response(fixture("openreplay_replay.json"))

    app = web.Application()
    app.router.add_get("/api/projects/{project}/session_recordings", answer)
    app.router.add_get("/api/projects/{project}/session_recordings/{recording}", answer)
    app.router.add_get("/api/projects/{project}/session_recordings/{recording}/snapshots", answer)
    app.router.add_post("/api/projects/{project}/query/", answer)
    app.router.add_get("/api/0/organizations/{org}/replays/{replay}/", answer)
    app.router.add_get("/v2/api/{project}/sessions/{session}/replay", answer)
    tool = FakeTool(await aiohttp_server(app))
    holder.append(tool)
    return tool
