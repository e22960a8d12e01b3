"""Demo replay app: a small stand-in for PostHog's session-recording API and player UI.

jitgate's demo runs it on 127.0.0.1:8081 behind the proxy on :8080::

    python deploy/demo/replay_app.py --host 127.0.0.1 --port 8081

It needs only aiohttp and the standard library, and no network: the recordings come from
``recordings/`` (made by ``make_recordings.py``) and the player (rrweb-player) is vendored
under ``static/``.

Routes (project ``1``; any other project or recording answers a JSON 404):

* ``GET  /api/projects/{p}/session_recordings/``                   list
* ``GET  /api/projects/{p}/session_recordings/{r}``                metadata, and the
  pages the recording visited (``visited_urls``: the rrweb Meta events' ``href``)
* ``GET  /api/projects/{p}/session_recordings/{r}/snapshots``      rrweb events; gzip when
  accepted; ``?stream=1`` sends the same bytes with chunked transfer encoding
* ``POST /api/projects/{p}/session_recordings/{r}/sharing``        fake public share link
* ``GET  /``, ``GET /replay/{r}``                                   HTML pages; the list
  page asks the list API (``static/list.js``) and marks what a proxy in front (jitgate
  with ``lists: annotate``) says is locked
* ``GET  /recordings/{r}``                                          302 to an absolute URL
* ``GET  /static/...``, ``GET /ws/live`` (WebSocket echo), ``GET /healthz``
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import html
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "recordings"
STATIC_DIR = HERE / "static"
PROJECT_ID = "1"
LIST_API = f"/api/projects/{PROJECT_ID}/session_recordings"  # what the list page asks
STREAM_CHUNKS = 8
STREAM_DELAY = 0.02  # seconds between chunks of a ?stream=1 answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Recording:
    meta: dict[str, Any]
    snapshots_json: bytes  # {"snapshots": [...]} as UTF-8 JSON
    snapshots_gzip: bytes  # the same bytes, gzip-compressed once at start-up
    visited_urls: tuple[str, ...] = ()  # in visit order, each once


@dataclass(frozen=True)
class Store:
    recordings: dict[str, Recording]  # insertion order = list order


STORE_KEY = web.AppKey("store", Store)


def load_store(data_dir: Path) -> Store:
    """Read ``index.json`` and each recording's event array from ``data_dir``."""
    index = json.loads((data_dir / "index.json").read_text(encoding="utf-8"))
    recordings: dict[str, Recording] = {}
    for meta in index["recordings"]:
        rec_id = str(meta["id"])
        events = json.loads((data_dir / f"{rec_id}.json").read_text(encoding="utf-8"))
        body = json.dumps({"snapshots": events}, separators=(",", ":")).encode()
        recordings[rec_id] = Recording(
            meta=meta,
            snapshots_json=body,
            snapshots_gzip=gzip.compress(body, compresslevel=6, mtime=0),
            visited_urls=visited(events),
        )
    return Store(recordings)


def visited(events: list[Any]) -> tuple[str, ...]:
    """The pages a recording visited: each rrweb Meta event (type 4) names one in its href."""
    found: dict[str, None] = {}
    for event in events:
        if isinstance(event, dict) and event.get("type") == 4:
            href = (event.get("data") or {}).get("href")
            if isinstance(href, str) and href:
                found[href] = None
    return tuple(found)


# --------------------------------------------------------------------------- helpers


def json_error(status: int, detail: str, code: str) -> web.Response:
    """A PostHog-style API error body."""
    return web.json_response(
        {"type": "invalid_request", "code": code, "detail": detail, "attr": None},
        status=status,
    )


def not_found(detail: str = "Not found.") -> web.Response:
    return json_error(404, detail, "not_found")


def lookup(request: web.Request) -> Recording | web.Response:
    """The recording named in the URL, or the JSON 404 to send instead."""
    project = request.match_info.get("project", PROJECT_ID)
    if project != PROJECT_ID:
        return not_found(f"Project {project} does not exist.")
    rec_id = request.match_info["recording"]
    rec = request.app[STORE_KEY].recordings.get(rec_id)
    if rec is None:
        return not_found(f"Recording {rec_id} does not exist.")
    return rec


def accepts_gzip(accept_encoding: str) -> bool:
    """True if the Accept-Encoding header allows gzip (``gzip;q=0`` refuses it)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def is_truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- API


async def list_recordings(request: web.Request) -> web.Response:
    if request.match_info["project"] != PROJECT_ID:
        return not_found(f"Project {request.match_info['project']} does not exist.")
    results = [rec.meta for rec in request.app[STORE_KEY].recordings.values()]
    return web.json_response({"results": results, "has_next": False, "version": 1})


async def get_recording(request: web.Request) -> web.Response:
    rec = lookup(request)
    if isinstance(rec, web.Response):
        return rec
    return web.json_response({**rec.meta, "visited_urls": list(rec.visited_urls)})


async def get_snapshots(request: web.Request) -> web.StreamResponse:
    rec = lookup(request)
    if isinstance(rec, web.Response):
        return rec
    use_gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    body = rec.snapshots_gzip if use_gzip else rec.snapshots_json
    headers = {"Vary": "Accept-Encoding", "Cache-Control": "private, no-store"}
    if use_gzip:
        headers["Content-Encoding"] = "gzip"
    if not is_truthy(request.query.get("stream")):
        return web.Response(body=body, content_type="application/json", headers=headers)

    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/json"
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    size = -(-len(body) // STREAM_CHUNKS)  # ceiling division
    for start in range(0, len(body), size):
        await resp.write(body[start : start + size])
        await asyncio.sleep(STREAM_DELAY)
    await resp.write_eof()
    return resp


async def share_recording(request: web.Request) -> web.Response:
    rec = lookup(request)
    if isinstance(rec, web.Response):
        return rec
    token = secrets.token_urlsafe(24)
    return web.json_response(
        {
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "enabled": True,
            "access_token": token,
            "recording": rec.meta["id"],
            "url": f"{request.scheme}://{request.host}/shared/{token}",
        }
    )


# --------------------------------------------------------------------------- pages


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
{head}<link rel="stylesheet" href="/static/demo.css">
</head>
<body>
<header class="bar"><a class="logo" href="/">Demo Replay</a>
<span class="sub">session recordings · project {project}</span></header>
<main>
{body}
</main>
</body>
</html>
"""


def page(title: str, body: str, head: str = "") -> str:
    return PAGE.format(title=html.escape(title), head=head, body=body, project=PROJECT_ID)


def fmt_duration(seconds: int) -> str:
    return f"{seconds // 60}:{seconds % 60:02d}"


def fmt_time(iso: str) -> str:
    try:
        when = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return iso
    return when.strftime("%d %b %Y, %H:%M UTC")


async def index_page(request: web.Request) -> web.Response:
    rows = []
    for rec in request.app[STORE_KEY].recordings.values():
        m = rec.meta
        person = m.get("person") or {}
        props = person.get("properties") or {}
        rid = html.escape(str(m["id"]))
        rows.append(
            f'<tr data-recording="{rid}">'
            f'<td><a class="play" href="/replay/{rid}">&#9654; {rid}</a></td>'
            f"<td><strong>{html.escape(str(person.get('name', '')))}</strong>"
            f'<br><span class="muted">{html.escape(str(props.get("email", "")))}</span></td>'
            f"<td>{html.escape(str(m.get('summary', '')))}"
            f'<br><span class="muted">{html.escape(str(m.get("start_url", "")))}</span></td>'
            f'<td class="when">{html.escape(fmt_time(str(m.get("start_time", ""))))}</td>'
            f'<td class="num">{fmt_duration(int(m.get("recording_duration", 0)))}</td>'
            f'<td class="num">{int(m.get("click_count", 0))}</td>'
            f'<td class="num">{int(m.get("keypress_count", 0))}</td>'
            "</tr>"
        )
    body = (
        "<h1>Recordings</h1>\n"
        '<p class="muted">Recorded sessions of the Acme Outfitters shop. '
        "They contain what customers typed: names, e-mail addresses, phone numbers and "
        "street addresses.</p>\n"
        '<table class="list">\n<thead><tr><th>Recording</th><th>Person</th><th>Session</th>'
        '<th>Started</th><th class="num">Length</th><th class="num">Clicks</th>'
        '<th class="num">Keys</th></tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody>\n</table>\n"
        f'<script src="/static/list.js" data-list="{LIST_API}"></script>'
    )
    return web.Response(text=page("Demo Replay", body), content_type="text/html")


async def replay_page(request: web.Request) -> web.Response:
    rec_id = request.match_info["recording"]
    if rec_id not in request.app[STORE_KEY].recordings:
        body = (
            f"<h1>Not found</h1><p>There is no recording <code>{html.escape(rec_id)}</code>. "
            '<a href="/">All recordings</a></p>'
        )
        return web.Response(
            text=page("Not found · Demo Replay", body), content_type="text/html", status=404
        )
    rid = html.escape(rec_id)
    snapshots = f"/api/projects/{PROJECT_ID}/session_recordings/{rid}/snapshots"
    head = '<link rel="stylesheet" href="/static/rrweb-player/style.css">\n'
    body = (
        f'<p class="crumbs"><a href="/">Recordings</a> &rsaquo; {rid}</p>\n'
        f"<h1>Recording {rid}</h1>\n"
        f'<div id="replay" data-recording="{rid}" data-snapshots="{snapshots}">\n'
        '<p class="status" id="status">Loading recording…</p>\n'
        '<div id="player"></div>\n'
        '<div id="error" class="error" hidden><h2 id="error-title"></h2>'
        '<pre id="error-body"></pre></div>\n'
        "</div>\n"
        '<script src="/static/rrweb-player/rrweb-player.min.js"></script>\n'
        '<script src="/static/replay.js"></script>'
    )
    return web.Response(text=page(f"{rec_id} · Demo Replay", body, head), content_type="text/html")


async def legacy_redirect(request: web.Request) -> web.Response:
    """Old-style link: answers 302 with an absolute Location built from the Host header."""
    rec = lookup(request)
    if isinstance(rec, web.Response):
        return rec
    location = f"{request.scheme}://{request.host}/replay/{rec.meta['id']}"
    raise web.HTTPFound(location)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def ws_live(request: web.Request) -> web.WebSocketResponse:
    """WebSocket echo; the text ``close:<code>`` makes the server close with that code."""
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            text = str(msg.data)
            if text.startswith("close:"):
                try:
                    code = int(text[6:])
                except ValueError:
                    code = -1
                if 1000 <= code <= 4999:
                    await ws.close(code=code, message=b"closed on request")
                    break
                await ws.send_str(f"error: bad close code {text[6:]!r}")
                continue
            await ws.send_str(text)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


# --------------------------------------------------------------------------- app


@web.middleware
async def json_404(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown API paths answer JSON, like the rest of the API."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        if request.path.startswith("/api/"):
            return not_found()
        raise


def create_app(data_dir: Path | None = None) -> web.Application:
    app = web.Application(middlewares=[json_404])
    app[STORE_KEY] = load_store(data_dir or DEFAULT_DATA_DIR)
    base = "/api/projects/{project}/session_recordings"
    rec = base + "/{recording}"
    app.router.add_get(base, list_recordings)
    app.router.add_get(base + "/", list_recordings)
    app.router.add_get(rec, get_recording)
    app.router.add_get(rec + "/", get_recording)
    app.router.add_get(rec + "/snapshots", get_snapshots)
    app.router.add_get(rec + "/snapshots/", get_snapshots)
    app.router.add_post(rec + "/sharing", share_recording)
    app.router.add_post(rec + "/sharing/", share_recording)
    app.router.add_patch(rec + "/sharing", share_recording)
    app.router.add_get("/", index_page)
    app.router.add_get("/replay/{recording}", replay_page)
    app.router.add_get("/recordings/{recording}", legacy_redirect)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws/live", ws_live)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Demo session-replay app (PostHog stand-in).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="recordings directory (index.json + events)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(create_app(args.data_dir), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
