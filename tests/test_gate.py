"""The gate end to end against real servers: one identification per request, and one
policy from a request's decision to its audit record."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ROOT, ProxyFactory, bearer

from proxy.identity import Verifier
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
BASE = (ROOT / "config" / "policy.yaml").read_text()


@pytest.fixture
def identify_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the verifier's work: each call is one look at the request's credentials."""
    calls: list[str] = []
    real = Verifier.identify

    async def counted(self: Verifier, *args: Any, **kwargs: Any) -> Any:
        calls.append("identify")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Verifier, "identify", counted)
    return calls


async def test_a_refusal_page_with_request_forms_identifies_once(
    make_proxy: ProxyFactory, identify_calls: list[str]
) -> None:
    client = await make_proxy()
    page = {**bearer("alice"), "Accept": "text/html"}
    r = await client.get("/replay/demo-1?x=1", headers=page)
    body = await r.text()
    assert r.status == 403 and 'name="csrf"' in body  # the gate decided, the page offered forms
    assert identify_calls == ["identify"]


async def test_an_api_call_and_a_public_route(
    make_proxy: ProxyFactory, identify_calls: list[str]
) -> None:
    client = await make_proxy()
    r = await client.get("/_jit/api/grants/mine", headers=bearer("alice"))
    assert r.status == 200
    assert identify_calls == ["identify"]
    identify_calls.clear()
    # A public route never asks who the caller is, whatever the request carries.
    r = await client.get("/static/app.js", headers={"Authorization": "Bearer junk"})
    assert r.status == 200
    assert identify_calls == []


async def test_a_stream_that_spans_a_reload_is_audited_with_the_policy_that_allowed_it(
    make_proxy: ProxyFactory, aiohttp_server: Any, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first,")
        await release.wait()
        await response.write(b"second")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    upstream = await aiohttp_server(app)
    client = await make_proxy(upstream_url=str(upstream.make_url("")).rstrip("/"))
    state = client.app[STATE]
    old = state.config.policy.version
    grant = await state.grants.add("alice", "recording:1/demo-1", 60, "ticket 1", "test")

    r = await client.get(SNAPSHOTS, headers=bearer("alice"))
    assert r.status == 200
    assert await r.content.readexactly(6) == b"first,"
    (tmp_path / "policy.yaml").write_text(BASE + "\n# a new version\n")
    assert await state.reloader.reload_now("test") == "ok"
    new = state.config.policy.version
    assert new != old
    release.set()
    assert await r.content.read() == b"second"

    await state.audit.flush(force=True)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (access,) = [r for r in records if r["event"] == "access.allow" and r["path"] == SNAPSHOTS]
    assert access["grant_id"] == grant.id and access["recording"] == "demo-1"
    assert access["policy_version"] == old
    (reload,) = [r for r in records if r["event"] == "policy.reloaded"]
    assert reload["policy_version"] == new
