"""Tests for the demo replay app (deploy/demo/replay_app.py), the proxy's stand-in upstream."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

DEMO_DIR = Path(__file__).resolve().parent.parent / "deploy" / "demo"
API = "/api/projects/1/session_recordings"
RECORDINGS = ["demo-1", "demo-2", "demo-3"]


def _load(name: str, filename: str) -> ModuleType:
    """Import a script from deploy/demo (it is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEMO_DIR / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


replay_app = _load("jitgate_demo_replay_app", "replay_app.py")
make_recordings = _load("jitgate_demo_make_recordings", "make_recordings.py")


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    app: web.Application = replay_app.create_app()
    return await aiohttp_client(app)


async def _events(client: TestClient[Any, Any], rec: str = "demo-1") -> list[dict[str, Any]]:
    resp = await client.get(f"{API}/{rec}/snapshots", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    body = await resp.json()
    events: list[dict[str, Any]] = body["snapshots"]
    return events


# --------------------------------------------------------------------------- API


async def test_healthz(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.text() == "ok"


@pytest.mark.parametrize("path", [API + "/", API])
async def test_list(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["has_next"] is False
    results = body["results"]
    assert [r["id"] for r in results] == RECORDINGS
    for r in results:
        assert r["person"]["properties"]["email"].endswith(("example.com", ".org", ".net"))
        assert r["distinct_id"]
        assert 10 <= r["recording_duration"] <= 40
        assert r["click_count"] > 0
        assert r["start_time"].endswith("Z")


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_metadata(client: TestClient[Any, Any], suffix: str) -> None:
    resp = await client.get(f"{API}/demo-2{suffix}")
    assert resp.status == 200
    meta = await resp.json()
    assert meta["id"] == "demo-2"
    assert meta["person"]["name"] == "Marcus Okafor"
    assert meta["start_url"].startswith("https://")
    for key in ("distinct_id", "start_time", "end_time", "click_count", "keypress_count"):
        assert key in meta


@pytest.mark.parametrize("rec", RECORDINGS)
async def test_snapshots_shape(client: TestClient[Any, Any], rec: str) -> None:
    events = await _events(client, rec)
    meta, full = events[0], events[1]
    assert meta["type"] == 4
    assert {"href", "width", "height"} <= meta["data"].keys()
    assert full["type"] == 2
    assert full["data"]["node"]["type"] == 0  # the serialized document
    assert full["data"]["node"]["id"] == 1
    assert all(e["type"] == 3 for e in events[2:])
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert 10_000 <= stamps[-1] - stamps[0] <= 40_000
    sources = {e["data"]["source"] for e in events[2:]}
    assert {1, 2, 3, 5} <= sources  # mouse moves, clicks, scrolls, inputs

    # Every node id in the snapshot is unique, and the incremental events point at them.
    ids: list[int] = []

    def walk(node: dict[str, Any]) -> None:
        ids.append(node["id"])
        for child in node.get("childNodes", []):
            walk(child)

    walk(full["data"]["node"])
    assert len(ids) == len(set(ids))
    for e in events[2:]:
        if e["data"]["source"] in (2, 5):
            assert e["data"]["id"] in ids


async def test_snapshots_contain_typed_personal_data(client: TestClient[Any, Any]) -> None:
    events = await _events(client, "demo-1")
    typed = {e["data"]["text"] for e in events if e["type"] == 3 and e["data"]["source"] == 5}
    assert "eleanor.vance@example.com" in typed
    assert "Eleanor Vance" in typed
    assert "17 Hawthorn Lane" in typed


async def test_snapshots_gzip(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(replay_app.create_app(), auto_decompress=False)
    url = f"{API}/demo-1/snapshots"
    plain = await client.get(url, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    plain_body = await plain.read()

    resp = await client.get(url, headers={"Accept-Encoding": "gzip, deflate"})
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "Accept-Encoding" in resp.headers["Vary"]
    raw = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(raw) < len(plain_body)
    assert gzip.decompress(raw) == plain_body
    assert json.loads(plain_body)["snapshots"][0]["type"] == 4

    refused = await client.get(url, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in refused.headers


async def test_snapshots_gzip_auto_decompressed(client: TestClient[Any, Any]) -> None:
    resp = await client.get(f"{API}/demo-3/snapshots", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert (await resp.json())["snapshots"][1]["type"] == 2


async def test_snapshots_stream_is_chunked(client: TestClient[Any, Any]) -> None:
    url = f"{API}/demo-1/snapshots"
    whole = await (await client.get(url, headers={"Accept-Encoding": "identity"})).read()
    resp = await client.get(url + "?stream=1", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.headers
    assert resp.content_type == "application/json"
    data = b""
    http_chunks = 0
    async for chunk, end_of_http_chunk in resp.content.iter_chunks():
        data += chunk
        http_chunks += end_of_http_chunk
    assert http_chunks > 1
    assert data == whole


async def test_snapshots_stream_gzip(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(replay_app.create_app(), auto_decompress=False)
    resp = await client.get(f"{API}/demo-2/snapshots?stream=1", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.headers["Content-Encoding"] == "gzip"
    body = json.loads(gzip.decompress(await resp.read()))
    assert body["snapshots"][0]["type"] == 4


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{API}/demo-9"),
        ("GET", f"{API}/demo-9/"),
        ("GET", f"{API}/demo-9/snapshots"),
        ("POST", f"{API}/demo-9/sharing"),
        ("GET", "/api/projects/2/session_recordings/"),
        ("GET", "/api/projects/2/session_recordings"),
        ("GET", "/api/projects/2/session_recordings/demo-1"),
        ("GET", "/api/projects/2/session_recordings/demo-1/snapshots"),
        ("POST", "/api/projects/2/session_recordings/demo-1/sharing"),
        ("GET", "/api/projects/1/persons/"),
        ("GET", "/recordings/demo-9"),
    ],
)
async def test_unknown_is_json_404(client: TestClient[Any, Any], method: str, path: str) -> None:
    resp = await client.request(method, path)
    assert resp.status == 404
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == "not_found"


async def test_sharing_creates_token(client: TestClient[Any, Any]) -> None:
    first = await client.post(f"{API}/demo-1/sharing")
    assert first.status == 200
    body = await first.json()
    assert body["enabled"] is True
    assert isinstance(body["access_token"], str) and len(body["access_token"]) >= 16
    second = await (await client.post(f"{API}/demo-1/sharing")).json()
    assert second["access_token"] != body["access_token"]
    assert (await client.get(f"{API}/demo-1/sharing")).status == 405


# --------------------------------------------------------------------------- pages


async def test_redirect_location_is_absolute(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/recordings/demo-1", allow_redirects=False)
    assert resp.status == 302
    host = f"{client.server.host}:{client.server.port}"
    assert resp.headers["Location"] == f"http://{host}/replay/demo-1"

    resp = await client.get(
        "/recordings/demo-2", allow_redirects=False, headers={"Host": "replay.internal:8081"}
    )
    assert resp.headers["Location"] == "http://replay.internal:8081/replay/demo-2"


async def test_index_lists_recordings(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    assert "Demo Replay" in page
    for rec in RECORDINGS:
        assert f'href="/replay/{rec}"' in page
        assert f'<tr data-recording="{rec}">' in page  # list.js marks locked rows by id
    assert "eleanor.vance@example.com" in page
    assert f'<script src="/static/list.js" data-list="{API}"></script>' in page


async def test_replay_page_uses_vendored_player(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/replay/demo-1")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    assert 'src="/static/rrweb-player/rrweb-player.min.js"' in page
    assert 'href="/static/rrweb-player/style.css"' in page
    assert 'src="/static/replay.js"' in page
    assert f'data-snapshots="{API}/demo-1/snapshots"' in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN

    missing = await client.get("/replay/demo-9")
    assert missing.status == 404


async def test_replay_script_fetches_with_credentials(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/static/replay.js")
    assert resp.status == 200
    script = await resp.text()
    assert 'credentials: "include"' in script
    assert "text/html" in script  # HTML refusals replace the page


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/static/rrweb-player/rrweb-player.min.js", b"rrwebPlayer"),
        ("/static/rrweb-player/style.css", b".replayer-mouse"),
        ("/static/rrweb-player/LICENSE", b"Permission is hereby granted"),
        ("/static/rrweb-player/VERSION", b"rrweb-player 2."),
        ("/static/demo.css", b"body"),
    ],
)
async def test_static_files(client: TestClient[Any, Any], path: str, needle: bytes) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert needle in await resp.read()


async def test_static_missing_is_404(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/static/nope.js")).status == 404
    assert (await client.get("/static/../replay_app.py")).status in (403, 404)


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_echo_and_close_code(client: TestClient[Any, Any]) -> None:
    async with client.ws_connect("/ws/live") as ws:
        await ws.send_str("hello replay")
        assert await ws.receive_str(timeout=5) == "hello replay"
        await ws.send_bytes(b"\x00\x01binary\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01binary\xff"
        await ws.send_str("close:nope")
        assert (await ws.receive_str(timeout=5)).startswith("error:")
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4001
        assert ws.close_code == 4001


async def test_websocket_normal_close(client: TestClient[Any, Any]) -> None:
    ws = await client.ws_connect("/ws/live")
    await ws.send_str("close:1000")
    msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE
    assert msg.data == 1000
    await ws.close()


async def test_plain_get_on_websocket_route_fails(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/ws/live")
    assert resp.status >= 400


# --------------------------------------------------------------------------- data


async def test_custom_data_dir(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    src = DEMO_DIR / "recordings"
    index = json.loads((src / "index.json").read_text(encoding="utf-8"))
    index["recordings"] = index["recordings"][:1]
    (tmp_path / "index.json").write_text(json.dumps(index), encoding="utf-8")
    shutil.copy(src / "demo-1.json", tmp_path / "demo-1.json")
    client = await aiohttp_client(replay_app.create_app(tmp_path))
    body = await (await client.get(API + "/")).json()
    assert [r["id"] for r in body["results"]] == ["demo-1"]
    assert (await client.get(f"{API}/demo-2")).status == 404


def test_accepts_gzip() -> None:
    accepts = replay_app.accepts_gzip
    assert accepts("gzip")
    assert accepts("br, GZIP;q=0.5")
    assert accepts("*")
    assert not accepts("")
    assert not accepts("identity")
    assert not accepts("gzip;q=0")
    assert not accepts("deflate, gzip; q=0.0")


def test_recordings_are_reproducible() -> None:
    """The committed JSON is exactly what make_recordings.py generates."""
    files: dict[str, str] = make_recordings.render_all()
    assert sorted(files) == ["demo-1.json", "demo-2.json", "demo-3.json", "index.json"]
    for name, text in files.items():
        committed = (DEMO_DIR / "recordings" / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run python deploy/demo/make_recordings.py"
