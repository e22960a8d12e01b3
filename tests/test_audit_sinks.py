"""Audit sinks: real files in tmp_path and real local collectors speaking each format."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ROOT, free_port

from proxy.audit.sinks import FORMATS, HttpSink, JsonlFileSink, SinkError, StdoutSink
from proxy.settings.read import Secret

_SEQ = itertools.count()
ROTATED = re.compile(r"audit-(\d{4}-\d{2}-\d{2})T\d{2}-\d{2}-\d{2}\.\d{3}\.jsonl")
DAY = 86400.0


def rec(event: str = "access.allow", **fields: Any) -> dict[str, Any]:
    """Return a record shaped like proxy.audit.record builds them."""
    now = time.time()
    return {
        "id": f"rec{next(_SEQ):08d}",
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "ts": round(now, 3),
        "event": event,
        **fields,
    }


def dump(r: dict[str, Any]) -> str:
    return json.dumps(r, separators=(",", ":"))


def batch(n: int, event: str = "access.allow", **fields: Any) -> list[str]:
    return [dump(rec(event, n=i, **fields)) for i in range(n)]


def trail(sink: JsonlFileSink) -> list[list[str]]:
    """Return the lines of each file of the trail, checking every file ends on a whole line."""
    out = []
    for path in sink.files():
        text = path.read_text()
        assert text.endswith("\n"), f"{path.name} ends in a torn line"
        lines = text.splitlines()
        for line in lines:
            json.loads(line)
        out.append(lines)
    return out


# --- JsonlFileSink ------------------------------------------------------------------------


async def test_appends_in_order_creating_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "audit.jsonl"
    sink = JsonlFileSink(path)
    first, second = batch(3), batch(2)
    await sink.write(first)
    await sink.write([])
    await sink.write(second)
    await sink.close()
    assert path.read_text() == "\n".join(first + second) + "\n"
    assert sink.files() == [path]


def sizes_to_files(batch_sizes: list[int], limit: int) -> list[list[int]]:
    """Group batch indexes into files the way size rotation is specified to."""
    files: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(batch_sizes):
        if size and size + n > limit:
            files.append([])
            size = 0
        files[-1].append(i)
        size += n
    return files


async def test_rotates_by_size_without_splitting_a_line(tmp_path: Path) -> None:
    limit = 600
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_bytes=limit)
    batches = [batch(1 + (i * 7) % 4, pad="x" * (i % 50)) for i in range(30)]
    for b in batches:
        await sink.write(b)

    got = trail(sink)
    assert [line for lines in got for line in lines] == [line for b in batches for line in b]
    sizes = [len(("\n".join(b) + "\n").encode()) for b in batches]
    expected = sizes_to_files(sizes, limit)
    assert len(expected) >= 4
    assert got == [[line for i in group for line in batches[i]] for group in expected]
    assert all(p.stat().st_size <= limit for p in sink.files())
    rotated = sink.files()[:-1]
    assert all(ROTATED.fullmatch(p.name) for p in rotated)
    assert sorted(p.name for p in rotated) == [p.name for p in rotated]


async def test_a_batch_over_the_limit_stays_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.touch()
    sink = JsonlFileSink(path, rotate_bytes=50)
    big, small = batch(5), batch(1)
    await sink.write(big)
    assert trail(sink) == [big]  # an empty file takes the batch whole, limit or not
    await sink.write(small)
    assert trail(sink) == [big, small]


async def test_rotated_names_are_unique_and_in_write_order(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_bytes=1, fsync=False)
    written = [batch(1) for _ in range(25)]
    for b in written:  # many rotations within one millisecond share an mtime stamp
        await sink.write(b)
    assert trail(sink) == written
    names = [p.name for p in sink.files()[:-1]]
    assert len(set(names)) == len(names) == 24


async def test_rotation_sorts_after_a_newer_stamp_when_the_clock_steps_back(
    tmp_path: Path,
) -> None:
    ahead = tmp_path / "audit-2099-01-01T00-00-00.000.jsonl"
    ahead.write_text(dump(rec()) + "\n")
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_bytes=1)
    first, second = batch(1), batch(1)
    await sink.write(first)
    await sink.write(second)
    files = sink.files()
    assert files[0] == ahead
    assert files[1].name == "audit-2099-01-01T00-00-00.001.jsonl"
    assert trail(sink)[1:] == [first, second]


async def test_rotates_when_the_files_day_is_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path, rotate_daily=True)
    yesterday_lines, today_lines, later = batch(2), batch(2), batch(1)
    await sink.write(yesterday_lines)
    yesterday = time.time() - DAY
    os.utime(path, (yesterday, yesterday))
    await sink.write(today_lines)
    await sink.write(later)  # same day: no rotation

    files = sink.files()
    assert len(files) == 2
    m = ROTATED.fullmatch(files[0].name)
    assert m and m.group(1) == datetime.fromtimestamp(yesterday, UTC).strftime("%Y-%m-%d")
    assert trail(sink) == [yesterday_lines, today_lines + later]


async def test_daily_rotation_follows_the_clock_it_is_given(tmp_path: Path) -> None:
    clock = [time.time()]
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_daily=True, now=lambda: clock[0])
    first, second = batch(1), batch(1)
    await sink.write(first)
    clock[0] += DAY
    await sink.write(second)
    assert trail(sink) == [first, second]


async def test_no_daily_rotation_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path)
    first, second = batch(1), batch(1)
    await sink.write(first)
    os.utime(path, (time.time() - DAY, time.time() - DAY))
    await sink.write(second)
    await sink.maintain()
    assert trail(sink) == [first + second]


async def test_maintain_rotates_a_quiet_file_after_its_day(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path, rotate_daily=True)
    lines = batch(2)
    await sink.write(lines)
    await sink.maintain()
    assert sink.files() == [path]  # still today's
    os.utime(path, (time.time() - DAY, time.time() - DAY))
    await sink.maintain()
    assert not path.exists()
    assert trail(sink) == [lines]


async def test_retention_deletes_only_old_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path, rotate_bytes=1, retention=3600)
    for _ in range(4):
        await sink.write(batch(1))
    old, older, recent = sink.files()[:3]
    stamp = "2020-01-01T00-00-00.000"
    unrelated = [
        tmp_path / "other.jsonl",
        tmp_path / "audit-notes.jsonl",
        tmp_path / f"audit-{stamp}.json",
        tmp_path / f"audit-{stamp}.jsonl.gz",
        tmp_path / f"auditx-{stamp}.jsonl",
    ]
    for p in unrelated:
        p.write_text("keep\n")
    shelf = tmp_path / "audit-2021-01-01T00-00-00.000.jsonl"  # named like one, but a folder
    shelf.mkdir()
    unrelated.append(shelf)
    long_ago = time.time() - 7200
    for p in [old, older, path, *unrelated]:
        os.utime(p, (long_ago, long_ago))
    os.utime(recent, (time.time() - 60, time.time() - 60))

    await sink.maintain()
    assert not old.exists() and not older.exists()
    assert recent.exists() and path.exists()  # the live file is never deleted, however old
    assert all(p.exists() for p in unrelated)
    assert sink.files() == [recent, path]


async def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_bytes=1)
    for _ in range(3):
        await sink.write(batch(1))
    for p in sink.files():
        os.utime(p, (0, 0))
    await sink.maintain()
    assert len(sink.files()) == 3


@pytest.mark.parametrize("fsync", [True, False])
async def test_fsync_after_each_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    path = tmp_path / "audit.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sink = JsonlFileSink(path, fsync=fsync)
    for _ in range(3):
        await sink.write(batch(2))
    assert synced.count(os.stat(path).st_ino) == (3 if fsync else 0)
    if fsync:  # the directory too, once, so the new file's name is durable
        assert synced.count(os.stat(tmp_path).st_ino) == 1


async def test_write_raises_when_the_file_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    sink = JsonlFileSink(tmp_path / "not-a-dir" / "audit.jsonl")
    with pytest.raises(OSError):
        await sink.write(batch(1))


_FULL_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from proxy.audit.sinks import JsonlFileSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    asyncio.run(JsonlFileSink(Path(sys.argv[1])).write(["x" * 99] * 10))
except OSError as exc:
    print("raised", exc.errno)
"""


def test_a_write_cut_short_leaves_no_part_of_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    before = dump(rec()) + "\n"
    path.write_text(before)
    # A file size limit makes the kernel write part of the batch, then refuse the rest.
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(path), str(len(before) + 450)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["raised", "27"]  # EFBIG
    assert path.read_text() == before


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rotate_bytes"):
        JsonlFileSink(tmp_path / "a.jsonl", rotate_bytes=0)
    with pytest.raises(ValueError, match="retention"):
        JsonlFileSink(tmp_path / "a.jsonl", retention=-1)


# --- StdoutSink ---------------------------------------------------------------------------


async def test_stdout_prints_lines(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink()
    lines = batch(3)
    await sink.write(lines)
    await sink.maintain()
    await sink.close()
    assert capsys.readouterr().out == "\n".join(lines) + "\n"
    assert sink.name == "stdout" and StdoutSink("console").name == "console"


# --- HttpSink -----------------------------------------------------------------------------


@dataclass
class Post:
    path: str
    target: str  # path and query as sent
    headers: dict[str, str]
    raw: bytes
    peer: tuple[str, int]

    @property
    def body(self) -> bytes:
        if self.headers.get("Content-Encoding") == "gzip":
            return gzip.decompress(self.raw)
        return self.raw


Answer = Callable[[Post], Awaitable[web.StreamResponse]]


@dataclass
class Collector:
    """A real HTTP collector that records every POST and answers as the test says."""

    server: TestServer
    posts: list[Post] = field(default_factory=list)
    answer: Answer | None = None

    def url(self, path: str = "/ingest") -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def collector(aiohttp_server: Any) -> Collector:
    holder: list[Collector] = []

    async def ingest(request: web.Request) -> web.StreamResponse:
        me = holder[0]
        assert request.transport is not None
        post = Post(
            request.path,
            request.raw_path,
            dict(request.headers),
            await request.read(),
            request.transport.get_extra_info("peername"),
        )
        me.posts.append(post)
        if me.answer is not None:
            return await me.answer(post)
        if request.path == "/services/collector/event":
            return web.json_response({"text": "Success", "code": 0})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", ingest)
    # Bodies as sent: the test itself checks that they are gzip.
    c = Collector(await aiohttp_server(app, auto_decompress=False))
    holder.append(c)
    return c


def splunk_events(body: bytes) -> list[dict[str, Any]]:
    text, decoder, out, at = body.decode(), json.JSONDecoder(), [], 0
    while at < len(text):
        obj, at = decoder.raw_decode(text, at)
        out.append(obj)
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def received(fmt: str, body: bytes) -> list[dict[str, Any]]:
    """Return the records a collector got, in order, whatever the format."""
    if fmt == "jsonl":
        return [json.loads(x) for x in body.decode().splitlines()]
    if fmt == "splunk":
        return [e["event"] for e in splunk_events(body)]
    if fmt == "elastic":
        return [json.loads(x) for x in body.decode().splitlines()[1::2]]
    values = [v for s in json.loads(body)["streams"] for v in s["values"]]
    records = [json.loads(line) for _, line in values]  # streams interleave by time
    return sorted(records, key=lambda r: (Decimal(str(r["ts"])), r["id"]))


async def elastic_ok(post: Post) -> web.StreamResponse:
    items = [
        {"create": {"_id": json.loads(a)["create"]["_id"], "status": 201}}
        for a in post.body.decode().splitlines()[::2]
    ]
    return web.json_response({"took": 1, "errors": False, "items": items})


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_each_format_delivers_the_batch_in_order(
    collector: Collector, fmt: str, gz: bool
) -> None:
    if fmt == "elastic":
        collector.answer = elastic_ok
    path = "/services/collector/event" if fmt == "splunk" else "/ingest"
    sink = HttpSink("collector", collector.url(path), format=fmt, gzip=gz)
    lines = [dump(rec(e, n=i)) for i, e in enumerate(["access.allow", "access.deny"] * 3)]
    await sink.write(lines)
    await sink.close()

    [post] = collector.posts
    assert received(fmt, post.body) == [json.loads(x) for x in lines]
    if gz:
        assert post.headers["Content-Encoding"] == "gzip" and post.raw[:2] == b"\x1f\x8b"
    else:
        assert "Content-Encoding" not in post.headers and post.raw == post.body


async def test_jsonl_body_and_headers(collector: Collector) -> None:
    sink = HttpSink(
        "vector",
        collector.url(),
        headers={"Authorization": Secret("Bearer t0ken-value"), "X-Scope-OrgID": "ops"},
    )
    lines = batch(3)
    await sink.write(lines)
    await sink.write([])  # nothing to send: no request
    await sink.close()
    [post] = collector.posts
    assert post.body == ("\n".join(lines) + "\n").encode()
    assert post.headers["Content-Type"] == "application/x-ndjson"
    assert post.headers["Authorization"] == "Bearer t0ken-value"
    assert post.headers["X-Scope-OrgID"] == "ops"
    assert post.headers["User-Agent"] == "jitgate"
    assert "Idempotency-Key" not in post.headers  # unchained records: no chain position


async def test_chained_batches_carry_an_idempotency_key(collector: Collector) -> None:
    sink = HttpSink("vector", collector.url())
    chained = [dump(rec(writer="5bde1fd49bd5", seq=n, mac=f"{n:064x}")) for n in (7, 8, 9)]
    await sink.write(chained)
    await sink.write(chained)  # sent again (a replay): the same key, for the receiver
    await sink.close()
    keys = [post.headers["Idempotency-Key"] for post in collector.posts]
    assert keys == ["5bde1fd49bd5:7-9", "5bde1fd49bd5:7-9"]


async def test_splunk_event_envelopes(collector: Collector) -> None:
    sink = HttpSink("splunk", collector.url("/services/collector/event"), format="splunk")
    lines = batch(3, "grant.approved")
    await sink.write(lines)
    await sink.close()
    [post] = collector.posts
    assert post.headers["Content-Type"] == "application/json"
    events = splunk_events(post.body)
    assert [e["event"] for e in events] == [json.loads(x) for x in lines]
    assert [e["time"] for e in events] == [json.loads(x)["ts"] for x in lines]
    assert {(e["sourcetype"], e["source"]) for e in events} == {("jitgate:audit", "jitgate")}
    assert all(line.encode() in post.body for line in lines)  # the signed bytes, verbatim
    assert [json.loads(x) for x in post.body.decode().splitlines()] == events  # one a line


@pytest.mark.parametrize(
    "status,answer",
    [
        (200, {"text": "Server is busy", "code": 9}),
        (200, {"text": "Success"}),
        (200, "<html>captive portal</html>"),
    ],
)
async def test_splunk_answer_without_code_0_raises(
    collector: Collector, status: int, answer: Any
) -> None:
    async def reply(post: Post) -> web.StreamResponse:
        if isinstance(answer, str):
            return web.Response(text=answer, status=status)
        return web.json_response(answer, status=status)

    collector.answer = reply
    sink = HttpSink("splunk", collector.url("/services/collector/event"), format="splunk")
    with pytest.raises(SinkError, match="splunk") as err:
        await sink.write(batch(1))
    await sink.close()
    assert (answer if isinstance(answer, str) else answer["text"]) in str(err.value)


@dataclass
class Elastic:
    """Enough of the _bulk API: create by id, 409 for an existing id, 400 for a bad doc."""

    docs: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def bulk(self, post: Post) -> web.StreamResponse:
        lines = post.body.decode().splitlines()
        items = []
        for action, source in zip(lines[::2], lines[1::2], strict=True):
            doc_id = json.loads(action)["create"]["_id"]
            doc = json.loads(source)
            if "poison" in doc:
                error = {"type": "mapper_parsing_exception", "reason": "failed to parse [poison]"}
                items.append({"create": {"_id": doc_id, "status": 400, "error": error}})
            elif doc_id in self.docs:
                error = {"type": "version_conflict_engine_exception", "reason": "exists"}
                items.append({"create": {"_id": doc_id, "status": 409, "error": error}})
            else:
                self.docs[doc_id] = doc
                items.append({"create": {"_id": doc_id, "status": 201}})
        errors = any(i["create"]["status"] >= 300 for i in items)
        return web.json_response({"took": 3, "errors": errors, "items": items})


async def test_elastic_bulk_creates_by_id_and_resending_is_safe(collector: Collector) -> None:
    es = Elastic()
    collector.answer = es.bulk
    sink = HttpSink("es", collector.url("/jitgate-audit/_bulk"), format="elastic")
    lines = batch(4)
    await sink.write(lines)
    await sink.write(lines)  # a retry after a lost answer: every item is a 409
    await sink.close()

    assert len(collector.posts) == 2
    body = collector.posts[0].body.decode()
    assert body.endswith("\n")
    actions = [json.loads(x) for x in body.splitlines()[::2]]
    assert actions == [{"create": {"_id": json.loads(x)["id"]}} for x in lines]
    assert collector.posts[0].headers["Content-Type"] == "application/x-ndjson"
    assert es.docs == {json.loads(x)["id"]: json.loads(x) for x in lines}


async def test_elastic_item_failure_raises_naming_the_first(collector: Collector) -> None:
    es = Elastic()
    collector.answer = es.bulk
    sink = HttpSink("es", collector.url("/jitgate-audit/_bulk"), format="elastic")
    good = batch(2)
    await sink.write(good)
    bad = [dump(rec(poison=1)), dump(rec(poison=2))]
    with pytest.raises(SinkError) as err:
        await sink.write([*good, bad[0], dump(rec()), bad[1]])
    await sink.close()
    message = str(err.value)
    assert "es:" in message and "2 of 5" in message
    assert json.loads(bad[0])["id"] in message and "mapper_parsing_exception" in message
    assert json.loads(bad[1])["id"] not in message


@pytest.mark.parametrize("answer", [{"took": 1}, ["not", "a", "bulk", "answer"]])
async def test_elastic_answer_without_items_raises(collector: Collector, answer: Any) -> None:
    async def reply(post: Post) -> web.StreamResponse:
        return web.json_response(answer)

    collector.answer = reply
    sink = HttpSink("es", collector.url("/_bulk"), format="elastic")
    with pytest.raises(SinkError, match="es"):
        await sink.write(batch(1))
    await sink.close()


async def test_loki_streams_by_event_with_nanosecond_stamps(collector: Collector) -> None:
    sink = HttpSink("loki", collector.url("/loki/api/v1/push"), format="loki")
    events = ["access.allow", "access.deny", "access.allow", "grant.approved", "access.deny"]
    lines = [dump(rec(e, n=i)) for i, e in enumerate(events)]
    await sink.write(lines)
    await sink.close()

    [post] = collector.posts
    assert post.path == "/loki/api/v1/push"
    assert post.headers["Content-Type"] == "application/json"
    streams = json.loads(post.body)["streams"]
    assert [s["stream"] for s in streams] == [
        {"job": "jitgate-audit", "event": e}
        for e in ["access.allow", "access.deny", "grant.approved"]
    ]
    by_event = {s["stream"]["event"]: s["values"] for s in streams}
    for event, values in by_event.items():
        mine = [x for x in lines if json.loads(x)["event"] == event]
        assert [line for _, line in values] == mine
        assert [ns for ns, _ in values] == [
            str(int(Decimal(str(json.loads(x)["ts"])) * 1_000_000_000)) for x in mine
        ]


def body_of(n: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(n))


@pytest.mark.parametrize("status", [500, 429, 400, 302])
async def test_an_answer_outside_2xx_raises_with_status_and_body(
    collector: Collector, status: int
) -> None:
    text = body_of(300)

    async def reply(post: Post) -> web.StreamResponse:
        return web.Response(text=text, status=status)

    collector.answer = reply
    sink = HttpSink("collector-a", collector.url())
    with pytest.raises(SinkError) as err:
        await sink.write(batch(2))
    await sink.close()
    message = str(err.value)
    assert "collector-a" in message and f"HTTP {status}" in message
    assert text[:200] in message and text[:201] not in message


async def test_a_redirect_is_not_followed(collector: Collector) -> None:
    async def reply(post: Post) -> web.StreamResponse:
        if post.path == "/moved":
            return web.Response(status=204)
        raise web.HTTPFound("/moved")

    collector.answer = reply
    sink = HttpSink("collector-a", collector.url("/old"))
    with pytest.raises(SinkError, match="HTTP 302"):
        await sink.write(batch(1))
    await sink.close()
    assert [p.path for p in collector.posts] == ["/old"]


async def test_a_slow_collector_times_out(collector: Collector) -> None:
    async def reply(post: Post) -> web.StreamResponse:
        await asyncio.sleep(5)  # intended: a collector slower than the sink's 0.2 s timeout
        return web.Response(status=204)

    collector.answer = reply
    sink = HttpSink("slow", collector.url(), timeout=0.2)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"slow: no answer within 0\.2s"):
        await sink.write(batch(1))
    assert time.monotonic() - started < 2
    await sink.close()


async def test_connection_refused_raises() -> None:
    sink = HttpSink("gone", f"http://127.0.0.1:{free_port()}/ingest")
    with pytest.raises(SinkError, match="gone: POST failed"):
        await sink.write(batch(1))
    await sink.close()


async def test_header_secrets_never_reach_the_error(collector: Collector) -> None:
    token = "0f1e2d3c-4b5a-6978-secret"

    async def reply(post: Post) -> web.StreamResponse:  # a collector that echoes the header
        body = {"text": f"Invalid token {post.headers['Authorization']}", "code": 4}
        return web.json_response(body, status=403)

    collector.answer = reply
    sink = HttpSink(
        "splunk",
        collector.url("/services/collector/event"),
        format="splunk",
        headers={"Authorization": Secret(f"Splunk {token}")},
    )
    with pytest.raises(SinkError) as err:
        await sink.write(batch(1))
    await sink.close()
    assert collector.posts[0].headers["Authorization"] == f"Splunk {token}"
    message = str(err.value)
    assert "splunk" in message and "HTTP 403" in message and "Invalid token" in message
    assert token not in message and token not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None


async def test_a_token_in_the_url_never_reaches_the_error(collector: Collector) -> None:
    token = "q9-url-token-4711"

    async def reply(post: Post) -> web.StreamResponse:
        text = f"bad key {post.headers['X-Key']} for {post.target}"
        return web.Response(text=text, status=401)

    collector.answer = reply
    url = str(collector.server.make_url("/ingest").with_query(api_key=token))
    sink = HttpSink("vector", Secret(url), headers=[("X-Key", Secret("k-other-7d3f"))])
    with pytest.raises(SinkError) as err:
        await sink.write(batch(1))
    await sink.close()
    assert collector.posts[0].headers["X-Key"] == "k-other-7d3f"  # pairs work as headers too
    assert collector.posts[0].target == f"/ingest?api_key={token}"
    message = str(err.value)
    assert "HTTP 401" in message and "/ingest" in message
    assert token not in message and "k-other-7d3f" not in message


async def test_one_session_reused_and_closed(collector: Collector) -> None:
    sink = HttpSink("vector", collector.url())
    await sink.write(batch(1))
    await sink.write(batch(1))
    assert collector.posts[0].peer == collector.posts[1].peer  # one kept-alive connection
    await sink.close()
    await sink.close()
    await sink.write(batch(1))  # a write after close opens a new session
    await sink.close()
    assert len(collector.posts) == 3 and collector.posts[2].peer != collector.posts[0].peer


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="syslog"):
        HttpSink("x", "http://127.0.0.1:1/", format="syslog")
