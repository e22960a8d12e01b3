"""Recording metadata: each tool's adapter, the Redis cache, fetching off the hot path, config."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, count_round_trips, free_port, write_config
from metadatakit import TOKEN, FakeTool, fake_tool, fixture
from redis.asyncio import Redis
from yarl import URL

from proxy import settings as settings_mod
from proxy.errors import ConfigErrors
from proxy.metadata import Metadata, MetadataCache, adapter_for
from proxy.settings.metadata import MetadataSettings, SubjectSettings
from proxy.settings.read import Secret


def settings(adapter: str, field: str, **kw: Any) -> MetadataSettings:
    kw.setdefault("token", Secret(TOKEN))
    return MetadataSettings(adapter, SubjectSettings(field, "plain"), **kw)


@pytest.mark.parametrize(
    ("adapter", "name", "scope", "field", "subject", "start", "urls", "props"),
    [
        ("posthog", "posthog_recording.json", "recording:1/0192ab-c1", "distinct_id",
         "user-7f3a", "https://shop.example/billing/invoices",
         ["https://shop.example/billing/invoices"], {"customer_type": "fintech"}),
        ("posthog", "posthog_recording.json", "recording:1/0192ab-c1", "person_id",
         "01937c1e-0000-0000-0000-000000000065", None, None, None),
        ("posthog", "posthog_recording.json", "recording:1/0192ab-c1", "email",
         "ada@example.com", None, None, None),
        ("sentry", "sentry_replay.json", "replay:acme/9f1c0d2e", "user_id", "u-7f3a",
         "https://shop.example/",
         ["https://shop.example/", "https://shop.example/billing/invoices",
          "https://shop.example/billing/card"], {"customer_type": ["fintech"]}),
        ("sentry", "sentry_replay.json", "replay:acme/9f1c0d2e", "email", "ada@example.com",
         None, None, None),
        ("openreplay", "openreplay_replay.json", "session:5/7391450123456789012", "user_id",
         "ada@example.com", None, [], {"customer_type": "fintech"}),
        ("openreplay", "openreplay_replay.json", "session:5/7391450123456789012", "user_uuid",
         "0f0e0d0c-0000-4000-8000-000000000001", None, None, None),
    ],
)  # fmt: skip
def test_each_adapter_reads_its_tool(
    adapter: str, name: str, scope: str, field: str, subject: str, start: str | None,
    urls: list[str] | None, props: dict[str, Any] | None,
) -> None:  # fmt: skip
    a = adapter_for(settings(adapter, field, properties=("customer_type", "not_there")))
    meta = a.read(scope, fixture(name))
    assert meta.subject == subject and meta.scope == scope
    if urls is not None:
        assert meta.start_url == start and list(meta.urls) == urls
        assert meta.properties == props  # only the chosen properties, those present
    assert Metadata.from_json(meta.to_json()) == meta


def test_adapters_know_only_their_scopes() -> None:
    assert adapter_for(settings("posthog", "distinct_id")).target("recording:1/a b") == (
        "/api/projects/1/session_recordings/a%20b"
    )
    assert adapter_for(settings("posthog", "distinct_id")).target("project:1") is None
    assert adapter_for(settings("sentry", "user_id")).target("recording:1/x") is None
    assert adapter_for(settings("openreplay", "user_id")).target("session:5/7") == (
        "/v2/api/5/sessions/7/replay"
    )
    bad = adapter_for(settings("sentry", "user_id"))
    with pytest.raises(Exception, match="no data object"):
        bad.read("replay:a/b", {"detail": "x"})


@pytest.fixture
async def tool(aiohttp_server: Any) -> FakeTool:
    return await fake_tool(aiohttp_server)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def cache_for(
    tool_url: str, redis: Redis, http: aiohttp.ClientSession, adapter: str, field: str,
    counted: list[str] | None = None, **kw: Any,
) -> MetadataCache:  # fmt: skip
    seen = counted if counted is not None else []
    return MetadataCache(
        adapter_for(settings(adapter, field, **kw)), redis, http, URL(tool_url),
        ttl=600, counted=seen.append,
    )  # fmt: skip


async def test_fetched_once_then_from_memory_then_from_redis(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sources: list[str] = []
    cache = cache_for(tool.url, redis, http, "posthog", "email", sources)
    meta, why = await cache.lookup("recording:1/demo-1", wait=5)
    assert why is None and meta is not None and meta.subject == "ada@example.com"
    again, _ = await cache.lookup("recording:1/demo-1", wait=5)
    assert again == meta and tool.metadata_hits() == ["/api/projects/1/session_recordings/demo-1"]
    ttl = await redis.pttl("jit:meta:recording:1/demo-1")
    assert 0 < ttl <= 600_000
    # Another replica (a new cache on the same Redis) reads it from Redis, not the tool.
    other = cache_for(tool.url, redis, http, "posthog", "email", sources)
    found, _ = await other.lookup("recording:1/demo-1", wait=5)
    assert found == meta and len(tool.metadata_hits()) == 1
    assert sources == ["upstream", "memory", "redis"]


async def test_what_a_list_reads_is_one_round_trip_and_never_waits(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    one = cache_for(tool.url, redis, http, "posthog", "email")
    for rid in ("demo-1", "demo-2"):
        await one.lookup(f"recording:1/{rid}", wait=5)
    hits = len(tool.metadata_hits())
    other = cache_for(tool.url, redis, http, "posthog", "email")  # another replica
    await other.lookup("recording:1/demo-1", wait=5)  # demo-1 in its memory, demo-2 in Redis
    sent = count_round_trips(redis)
    scopes = ["recording:1/demo-1", "recording:1/demo-2", "recording:1/demo-3", "project:1"]
    found = await other.cached(scopes, fetch=1)
    assert len(sent) == 1  # one MGET for all that memory did not have
    assert {s: m.subject if m else None for s, m in found.items()} == {
        "recording:1/demo-1": "ada@example.com",
        "recording:1/demo-2": "bo@example.com",
        "recording:1/demo-3": None,  # not known yet: fetched in the background
    }
    assert len(tool.metadata_hits()) == hits  # nothing asked of the tool meanwhile
    meta, _ = await other.lookup("recording:1/demo-3", wait=5)  # the fetch it started
    assert meta is not None and len(tool.metadata_hits()) == hits + 1


async def test_sentry_and_openreplay_through_their_routes(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sentry = cache_for(tool.url, redis, http, "sentry", "email")
    meta, why = await sentry.lookup("replay:acme/9f1c0d2e8a7b4c3d9e8f7a6b5c4d3e2f", wait=5)
    assert why is None and meta is not None and meta.subject == "ada@example.com"
    assert "https://shop.example/billing/card" in meta.urls
    openreplay = cache_for(tool.url, redis, http, "openreplay", "user_uuid")
    meta, why = await openreplay.lookup("session:5/7391450123456789012", wait=5)
    assert meta is not None and meta.subject == "0f0e0d0c-0000-4000-8000-000000000001"
    assert tool.metadata_hits() == [
        "/api/0/organizations/acme/replays/9f1c0d2e8a7b4c3d9e8f7a6b5c4d3e2f/",
        "/v2/api/5/sessions/7391450123456789012/replay",
    ]


async def test_failures_say_why_and_are_not_kept(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    sources: list[str] = []
    cache = cache_for(tool.url, redis, http, "posthog", "distinct_id", sources)
    meta, why = await cache.lookup("recording:1/gone", wait=5)
    assert meta is None and why == "posthog answered 404 for recording:1/gone's metadata"
    await cache.lookup("recording:1/gone", wait=5)
    assert len(tool.metadata_hits()) == 2 and not await redis.exists("jit:meta:recording:1/gone")
    wrong = cache_for(tool.url, redis, http, "posthog", "distinct_id", token=Secret("nope"))
    _, why = await wrong.lookup("recording:1/demo-1", wait=5)
    assert why is not None and "answered 401" in why
    down = cache_for(f"http://127.0.0.1:{free_port()}", redis, http, "posthog", "distinct_id")
    _, why = await down.lookup("recording:1/demo-1", wait=5)
    assert why is not None and why.startswith("cannot fetch recording:1/demo-1's metadata")
    _, why = await cache.lookup("project:1", wait=5)
    assert why == "project:1 does not name a posthog recording"
    assert sources == ["error", "error"]


async def test_a_lookup_waits_no_longer_than_asked_and_the_fetch_goes_on(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    cache = cache_for(tool.url, redis, http, "posthog", "distinct_id")
    meta, why = await cache.lookup("recording:1/demo-2", wait=0)
    assert meta is None and why == "metadata of recording:1/demo-2 not fetched within 0s"
    task = cache.prefetch("recording:1/demo-2")  # the same fetch, still under way
    assert task is not None
    found, _ = await task
    assert found is not None and found.subject == "user-bo"
    assert cache.prefetch("recording:1/demo-2") is None  # known now: nothing to start
    assert len(tool.metadata_hits()) == 1
    await cache.close()


def _demo_app(data_dir: Path | None = None) -> Any:
    path = ROOT / "deploy" / "demo" / "replay_app.py"
    spec = importlib.util.spec_from_file_location("jitgate_demo_replay_app_meta", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.create_app(data_dir)


async def test_the_demo_adapter_reads_the_demo_app(
    aiohttp_server: Any, redis: Redis, http: aiohttp.ClientSession
) -> None:
    server = await aiohttp_server(_demo_app())
    url = str(server.make_url("")).rstrip("/")
    cache = cache_for(url, redis, http, "demo", "distinct_id", token=None, properties=("email",))
    meta, why = await cache.lookup("recording:1/demo-1", wait=5)
    assert why is None and meta is not None
    assert meta.subject == "u_7f3a9c1e-eleanor"
    assert meta.start_url == "https://shop.acme-outfitters.example/checkout"
    assert meta.properties == {"email": "eleanor.vance@example.com"}
    assert meta.urls == ("https://shop.acme-outfitters.example/checkout",)


async def test_the_demo_app_names_every_page_its_recording_visited(
    aiohttp_server: Any, redis: Redis, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    src = ROOT / "deploy" / "demo" / "recordings"
    (tmp_path / "index.json").write_text((src / "index.json").read_text())
    for rid in ("demo-1", "demo-2", "demo-3"):
        events = json.loads((src / f"{rid}.json").read_text())
        if rid == "demo-2":  # it navigates on: a second page, and back to the first
            meta = next(e for e in events if e["type"] == 4)
            later = {**meta, "data": {**meta["data"], "href": "https://shop.example/billing/card"}}
            events += [later, meta]
        (tmp_path / f"{rid}.json").write_text(json.dumps(events))
    server = await aiohttp_server(_demo_app(tmp_path))
    url = str(server.make_url("")).rstrip("/")
    cache = cache_for(url, redis, http, "demo", "distinct_id", token=None)
    found, why = await cache.lookup("recording:1/demo-2", wait=5)
    assert why is None and found is not None
    assert found.urls == (
        "https://shop.acme-outfitters.example/account/profile",
        "https://shop.example/billing/card",
    )


def load(tmp_path: Path, section: str, environ: dict[str, str] | None = None) -> Any:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=None, extra=section)
    return settings_mod.load(cfg, environ=environ or {})


def test_config_reads_the_section(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "subject.key").write_text("k" * 40)
    s = load(
        tmp_path,
        "metadata:\n  adapter: sentry\n  url: https://sentry.example\n  token_file: token\n"
        "  ttl: 2h\n  properties: [customer_type]\n"
        "  subject: {field: email, audit: hash, key_file: subject.key}\n",
    ).metadata
    assert s.adapter == "sentry" and s.token.reveal() == TOKEN and s.ttl == 7200
    assert s.url == URL("https://sentry.example") and s.properties == ("customer_type",)
    assert s.subject.field == "email" and s.subject.key.reveal() == "k" * 40
    env = load(
        tmp_path,
        "metadata: {adapter: posthog, token_env: PH_KEY, subject: {audit: plain}}",
        {"PH_KEY": TOKEN},
    ).metadata
    assert env.token.reveal() == TOKEN and env.subject.field == "distinct_id"
    assert load(tmp_path, "").metadata is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("metadata: {adapter: fullstory, subject: {audit: plain}}",
         "metadata.adapter: must be one of"),
        ("metadata: {adapter: posthog, subject: {audit: plain}}",
         "posthog needs token_file or token_env"),
        ("metadata: {adapter: sentry, token_env: T, subject: {field: distinct_id, audit: plain}}",
         "sentry names a subject by user_id, email, username"),
        ("metadata: {adapter: demo}", "hash needs key_file, key_env or audit.hmac_key"),
        ("metadata: {adapter: demo, subject: {audit: sha1}}", "must be hash or plain"),
        ("metadata: {adapter: posthog, token_env: NOT_SET, subject: {audit: plain}}",
         "$NOT_SET is not set"),
        ("metadata: {adapter: posthog, token_env: T, token_file: t, subject: {audit: plain}}",
         "give token_file or token_env, not both"),
        ("metadata: {adapter: demo, subject: {key_env: T}}", "at least 32 characters"),
        ("metadata: {adapter: demo, url: ftp://x, subject: {audit: plain}}", "http(s) URL"),
        ("metadata: {adapter: demo, subject: {audit: plain}, colour: red}", "unknown field"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as err:
        load(tmp_path, section, {"T": "short"})
    assert message in str(err.value)


async def test_posthog_visited_urls_come_from_its_query_api(
    tool: FakeTool, redis: Redis, http: aiohttp.ClientSession
) -> None:
    cache = cache_for(tool.url, redis, http, "posthog", "distinct_id")
    meta, why = await cache.lookup("recording:1/demo-2", wait=5)
    assert why is None and meta is not None
    assert meta.start_url == "https://shop.example/"
    assert meta.urls == ("https://shop.example/", "https://shop.example/orders/77")
    (asked,) = tool.queries  # the id is a placeholder's value, never in the query's text
    assert asked["query"]["values"] == {"session_id": "demo-2"}
    assert "demo-2" not in asked["query"]["query"]
    assert tool.hits[-1] == "/api/projects/1/query/"
    answer = fixture("posthog_urls_query.json")
    a = adapter_for(settings("posthog", "distinct_id"))
    assert a.read_urls(answer) == (
        "https://shop.example/checkout",
        "https://shop.example/checkout/payment",
    )
    with pytest.raises(Exception, match="no results rows"):
        a.read_urls({"error": "x"})
    with pytest.raises(Exception, match="at least 2 visited URLs, not all read"):
        a.read_urls({**answer, "hasMore": True})
    # Other tools name the URLs in their own answer; the demo app in `visited_urls`.
    assert adapter_for(settings("sentry", "user_id")).urls_query("replay:acme/1") is None
    demo = adapter_for(settings("demo", "distinct_id"))
    assert demo.urls_query("recording:1/demo-2") is None
    body = {**fixture("posthog_recording.json"), "visited_urls": ["https://a.example/x"]}
    assert demo.read("recording:1/x", body).urls == (
        "https://shop.example/billing/invoices",
        "https://a.example/x",
    )
