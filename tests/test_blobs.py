"""Presigned storage URLs rewritten into grant-bound blob URLs, end to end.

jitgate in front of a fake replay app whose answers carry presigned URLs of a real local
"S3" (storagekit.py: it checks its own signatures and expiry); Redis is real. A blob URL
must open for its user under a live grant, and for nobody else, never after revocation,
expiry or tampering, never with Redis down; the raw storage URL never reaches the client.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ROOT, SECRET, ProxyFactory, RedisServer, bearer
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from storagekit import Storage
from waiting import past

from proxy.authorize import Authorizer
from proxy.errors import ConfigErrors
from proxy.grantstore import RedisGrants
from proxy.policyfile import compile_text
from proxy.policytest import Explanation, decide_request
from proxy.settings import load

SESSION = "7391450123456789012"
SCOPE = f"session:5/{SESSION}"
REPLAY = f"/api/5/sessions/{SESSION}/replay"
FILES = {
    f"/mobs/{SESSION}/dom.mobs": b"\x00dom-start" * 1000,
    f"/mobs/{SESSION}/dom.mobe": b"\x00dom-end",
    f"/mobs/{SESSION}/devtools.mob": b"\x00devtools",
}
POLICY = """
version: 1
default: identity
hierarchy:
  - scope: "session:{project}/{session}"
    covered_by: ["project:{project}"]
routes:
  - id: replay
    path: /api/{project}/sessions/{session}/replay
    scope: "session:{project}/{session}"
    blobs: {fields: [data.domURL, data.devtoolsURL, data.canvas.url]}
  - id: raw
    path: /raw/{project}/{session}/{name}
    scope: "session:{project}/{session}"
    blobs: {fields: [url]}
"""


@dataclass
class Replay:
    """The fake replay app: the replay JSON, and any body under /raw/{p}/{s}/{name}."""

    url: str = ""
    raw: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    storage: Storage = field(default_factory=Storage)


@pytest.fixture
async def replay(aiohttp_server: Any, storage: Storage) -> Replay:
    fake = Replay(storage=storage)
    storage.objects.update(FILES)
    shape = json.loads((ROOT / "tests/fixtures/presets/openreplay/replay.json").read_text())

    async def replay_json(request: web.Request) -> web.Response:
        data = dict(shape["data"])
        data["domURL"] = [storage.presign(p) for p in list(FILES)[:2]]
        data["devtoolsURL"] = [storage.presign(list(FILES)[2])]
        data["canvas"] = [{"url": storage.presign("/mobs/none.tar")}, {"url": None}]
        return web.json_response({"data": data})

    async def raw(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        status, kind, body = fake.raw[name]
        resp = web.Response(status=status, body=body, content_type=kind)
        if name.endswith(".gz"):  # sent compressed whatever the request asked for
            resp.headers["Content-Encoding"] = "gzip"
        return resp

    app = web.Application()
    app.router.add_get("/api/{project}/sessions/{session}/replay", replay_json)
    app.router.add_get("/raw/{project}/{session}/{name}", raw)
    fake.url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gate(make_proxy: ProxyFactory, replay: Replay, storage: Storage) -> TestClient:
    return await make_proxy(upstream_url=replay.url, policy_text=POLICY, extra=storage.config())


async def grant(
    store: RedisGrants, user: str = "alice", scope: str = SCOPE, ttl: float = 600
) -> str:
    return (await store.add(user, scope, ttl, "blob test", "test")).id


async def blob_urls(gate: TestClient, storage: Storage, user: str = "alice") -> list[str]:
    """Open the replay; check no storage URL is in it; return its blob URLs, in order."""
    resp = await gate.get(REPLAY, headers=bearer(user))
    assert resp.status == 200
    text = await resp.text()
    assert storage.url not in text and "X-Amz-" not in text
    assert resp.headers["Cache-Control"] == "no-store"
    data = json.loads(text)["data"]
    urls = [*data["domURL"], *data["devtoolsURL"], data["canvas"][0]["url"]]
    assert data["canvas"][1]["url"] is None
    assert all(u.startswith("/_jit/blob/") for u in urls)
    return urls


def audit_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_urls_are_rewritten_and_open_under_the_grant(
    gate: TestClient, storage: Storage, grant_store: RedisGrants, tmp_path: Path
) -> None:
    grant_id = await grant(grant_store)
    urls = await blob_urls(gate, storage)
    for url, (path, body) in zip(urls, FILES.items(), strict=False):
        resp = await gate.get(url, headers=bearer())
        assert resp.status == 200, await resp.text()
        assert await resp.read() == body
        assert resp.headers["Cache-Control"] == "private, no-store"
        assert storage.hits[-1] == (path, 200)
    # The storage's own answer (a file that is not there) goes back as it came.
    missing = await gate.get(urls[3], headers=bearer())
    assert missing.status == 404 and storage.hits[-1] == ("/mobs/none.tar", 404)
    # Nothing of the client's goes to storage but what a range request needs.
    assert all("Authorization" not in h and "Cookie" not in h for h in storage.headers)
    ranged = await gate.get(urls[0], headers={**bearer(), "Range": "bytes=0-3"})
    assert storage.headers[-1]["Range"] == "bytes=0-3" and ranged.status in (200, 206)
    await gate.close()  # flushes the audit log
    records = [r for r in audit_lines(tmp_path) if r["route"] == "_blob"]
    # Each fetch: its decision, before a byte is sent, then how it ended (access.done).
    fetches = [r for r in records if r["event"] == "access.allow"]
    done = {r["decision_id"]: r for r in records if r["event"] == "access.done"}
    assert len(fetches) == 5 and set(done) == {r["id"] for r in fetches}
    assert {(r["user"], r["scope"], r["grant_id"]) for r in fetches} == {("alice", SCOPE, grant_id)}
    assert all(r["path"] == "/_jit/blob" and "route replay" in r["reasons"][1] for r in fetches)
    assert sorted(r["status"] for r in done.values()) == sorted([200, 200, 200, 404, ranged.status])
    replays = [r for r in audit_lines(tmp_path) if r["route"] == "replay"]
    (rewritten,) = [r for r in replays if r["event"] == "access.done"]
    assert "4 presigned URL(s) rewritten" in rewritten["reasons"][-1]


async def test_a_url_copied_before_revocation_fails_after_it(
    gate: TestClient, storage: Storage, grant_store: RedisGrants, tmp_path: Path
) -> None:
    grant_id = await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    assert (await gate.get(url, headers=bearer())).status == 200
    await grant_store.revoke(grant_id, "test")
    resp = await gate.get(url, headers=bearer())
    assert resp.status == 403
    assert f"no active grant for {SCOPE}" in await resp.text()
    assert len(storage.hits) == 1  # the refused fetch never reached storage
    # A new grant for the scope opens it again: the URL is bound to the scope's grant.
    await grant(grant_store, scope="project:5")
    assert (await gate.get(url, headers=bearer())).status == 200
    await gate.close()
    denied = [r for r in audit_lines(tmp_path) if r["event"] == "access.deny"]
    assert denied[0]["route"] == "_blob" and denied[0]["status"] == 403


async def test_revocation_cuts_a_download_in_flight(
    gate: TestClient, storage: Storage, grant_store: RedisGrants, tmp_path: Path
) -> None:
    grant_id = await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    path, body = next(iter(FILES.items()))
    storage.held[path] = asyncio.Event()  # storage sends half, then goes silent
    resp = await gate.get(url, headers=bearer())
    assert resp.status == 200
    first = await resp.content.readexactly(len(body) // 2)
    assert first == body[: len(body) // 2]
    await grant_store.revoke(grant_id, "test")
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 10)
    await gate.close()
    fetch = [r for r in audit_lines(tmp_path) if r["route"] == "_blob"][-1]
    assert fetch["event"] == "access.done" and "upstream error: grant ended" in fetch["reasons"]


async def test_a_url_opens_for_its_own_user_only(
    gate: TestClient, storage: Storage, grant_store: RedisGrants, tmp_path: Path
) -> None:
    await grant(grant_store)
    await grant(grant_store, user="bob")  # bob may see the session, but not with alice's URL
    url = (await blob_urls(gate, storage))[0]
    resp = await gate.get(url, headers=bearer("bob"))
    assert resp.status == 403 and "another user" in await resp.text()
    assert (await gate.get(url)).status == 401
    resp = await gate.get(url, headers={"Authorization": "Bearer e30.e30.e30.e30.e30"})
    assert resp.status == 401 and "malformed token" in await resp.text()
    assert storage.hits == []
    await gate.close()
    refused = [r for r in audit_lines(tmp_path) if r.get("decision") == "unauthenticated"]
    assert [r["reason_code"] for r in refused] == ["no_credentials", "token_malformed"]


async def test_an_expired_url_fails(
    make_proxy: ProxyFactory, replay: Replay, storage: Storage, grant_store: RedisGrants
) -> None:
    gate = await make_proxy(
        upstream_url=replay.url, policy_text=POLICY, extra=storage.config().replace("5m", "1s")
    )
    await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    issued = time.time()
    await past(issued + 1)
    resp = await gate.get(url, headers=bearer())
    assert resp.status == 403 and "expired" in await resp.text()
    assert storage.hits == []


async def test_a_url_never_outlives_its_grant(
    gate: TestClient, storage: Storage, grant_store: RedisGrants
) -> None:
    await grant(grant_store, ttl=1)
    url = (await blob_urls(gate, storage))[0]
    await grant(grant_store, scope="project:5")  # even with another grant afterwards
    await past(time.time() + 1)
    resp = await gate.get(url, headers=bearer())
    assert resp.status == 403 and "expired" in await resp.text()


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1],  # one character
        lambda t: t[:40],  # cut short
        lambda t: t[:20] + t[21:],  # one character less
        lambda t: "gAAAAA" + t[6:][::-1],  # reversed
    ],
)
async def test_a_tampered_url_fails(
    gate: TestClient, storage: Storage, grant_store: RedisGrants, change: Any, tmp_path: Path
) -> None:
    await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    token = url.rsplit("/", 1)[1]
    resp = await gate.get(f"/_jit/blob/{change(token)}", headers=bearer("mallory"))
    assert resp.status == 403 and "not valid" in await resp.text()
    assert storage.hits == []
    await gate.close()
    (refused,) = [r for r in audit_lines(tmp_path) if r["route"] == "_blob"]
    assert (refused["event"], refused["user"]) == ("access.deny", "mallory")
    assert token[:20] not in json.dumps(refused)  # the token is never written down


async def test_a_url_made_with_another_key_fails(
    gate: TestClient, storage: Storage, grant_store: RedisGrants
) -> None:
    await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    assert (await gate.get(url, headers=bearer())).status == 200
    # The same ticket sealed by another deployment's key: it does not open here.
    body = {"u": storage.presign(next(iter(FILES))), "s": "alice", "c": SCOPE, "g": "g-1",
            "e": time.time() + 60, "r": "replay"}  # fmt: skip
    forged = Fernet(Fernet.generate_key()).encrypt(json.dumps(body).encode()).decode()
    resp = await gate.get(f"/_jit/blob/{forged}", headers=bearer())
    assert resp.status == 403 and "not valid" in await resp.text()
    assert len(storage.hits) == 1


async def test_redis_down_means_no_blob(
    own_redis: RedisServer,
    make_proxy: ProxyFactory,
    replay: Replay,
    storage: Storage,
    tmp_path: Path,
) -> None:
    gate = await make_proxy(
        upstream_url=replay.url,
        policy_text=POLICY,
        extra=storage.config(),
        redis=own_redis.url,
    )
    redis = Redis.from_url(own_redis.url)
    await grant(RedisGrants(redis))
    await redis.aclose()
    url = (await blob_urls(gate, storage))[0]
    own_redis.kill()
    resp = await gate.get(url, headers=bearer())
    assert resp.status == 503 and "failing closed" in await resp.text()
    assert storage.hits == []
    own_redis.start()  # the audit queue drains at shutdown instead of waiting out its grace


JSON = "application/json"
EVIL = b'"https://s3.evil.invalid/x?sig=1"'


@pytest.mark.parametrize(
    ("name", "kind", "body", "why"),
    [
        ("foreign", JSON, b'{"url": ' + EVIL + b"}", "origin"),
        ("relative", JSON, b'{"url": "/mobs/x?X-Amz-Signature=1"}', "origin"),
        ("html", "text/html", b"<p>see " + EVIL + b"</p>", "not JSON"),
        ("shape", JSON, b'{"url": {"href": ' + EVIL + b"}}", "holds a dict"),
        ("big", JSON, b'{"url": "' + b"x" * 5000 + b'"}', "over blobs.max_bytes"),
    ],
)
async def test_a_body_that_cannot_be_rewritten_is_refused(
    make_proxy: ProxyFactory,
    replay: Replay,
    storage: Storage,
    grant_store: RedisGrants,
    name: str,
    kind: str,
    body: bytes,
    why: str,
) -> None:
    gate = await make_proxy(
        upstream_url=replay.url, policy_text=POLICY, extra=storage.config(", max_bytes: 4096")
    )
    await grant(grant_store)
    replay.raw[name] = (200, kind, body)
    resp = await gate.get(f"/raw/5/{SESSION}/{name}", headers=bearer())
    text = await resp.text()
    assert resp.status == 502 and why in text, text
    assert "sig=1" not in text and "X-Amz" not in text


@pytest.mark.parametrize(
    ("name", "status", "body"),
    [
        ("empty", 200, b""),
        ("without", 200, b'{"other": ' + EVIL + b"}"),
        ("null", 200, b'{"url": null}'),
        ("error", 404, b'{"errors": ["session not found"]}'),
    ],
)
async def test_a_body_without_urls_passes_unchanged(
    gate: TestClient, replay: Replay, grant_store: RedisGrants, name: str, status: int, body: bytes
) -> None:
    await grant(grant_store)
    replay.raw[name] = (status, JSON, body)
    resp = await gate.get(f"/raw/5/{SESSION}/{name}", headers=bearer())
    assert resp.status == status and await resp.read() == body


async def test_a_compressed_answer_is_decoded_and_rewritten(
    gate: TestClient, replay: Replay, storage: Storage, grant_store: RedisGrants
) -> None:
    await grant(grant_store)
    path = next(iter(FILES))
    plain = json.dumps({"url": storage.presign(path)}).encode()
    replay.raw["answer.gz"] = (200, JSON, gzip.compress(plain))
    resp = await gate.get(f"/raw/5/{SESSION}/answer.gz", headers=bearer())
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    url = (await resp.json())["url"]
    assert url.startswith("/_jit/blob/")
    assert await (await gate.get(url, headers=bearer())).read() == FILES[path]


async def test_the_storage_origin_must_still_be_allowed(
    make_proxy: ProxyFactory, replay: Replay, storage: Storage, grant_store: RedisGrants
) -> None:
    gate = await make_proxy(upstream_url=replay.url, policy_text=POLICY, extra=storage.config())
    await grant(grant_store)
    url = (await blob_urls(gate, storage))[0]
    # The same Redis (same key) behind a jitgate whose blobs.origins no longer has it.
    other = await make_proxy(
        upstream_url=replay.url,
        policy_text=POLICY,
        extra='blobs: {origins: ["https://minio.example.com"]}\n',
    )
    resp = await other.get(url, headers=bearer())
    assert resp.status == 403 and "blobs.origins" in await resp.text()
    assert storage.hits == []


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ("access: identity\n    blobs: {fields: [url]}", "only protected routes"),
        ('scope: "s:{p}"\n    blobs: [url]', "must be a mapping"),
        ('scope: "s:{p}"\n    blobs: {fields: []}', "is required"),
        ('scope: "s:{p}"\n    blobs: {fields: ["a..b"]}', "dotted key path"),
        ('scope: "s:{p}"\n    blobs: {fields: [a], scope: x}', "unknown field"),
    ],
)
def test_policy_blobs_errors_name_the_place(route: str, error: str) -> None:
    text = f"version: 1\nroutes:\n  - id: r\n    path: /x/{{p}}\n    {route}\n"
    with pytest.raises(ConfigErrors) as info:
        compile_text(text, "policy.yaml")
    assert "policy.yaml:" in str(info.value) and "routes[0]" in str(info.value)
    assert error in str(info.value)


BASE = f"upstream: {{url: http://127.0.0.1:1}}\nidentity: {{hs_secret: {SECRET}}}\n"


@pytest.mark.parametrize(
    ("blobs", "error"),
    [
        ('{origins: ["https://minio.example.com/bucket"]}', "blobs.origins[0]: must be a storage"),
        ('{origins: ["ftp://minio.example.com"]}', "blobs.origins[0]"),
        ('{origins: ["https://key:secret@minio.example.com"]}', "must not carry credentials"),
        ("{ttl: 2h}", "blobs.ttl: must be more than 0 and at most 3600s"),
        ("{ttl: 0}", "blobs.ttl"),
        ("{speed: 1}", "blobs.speed: unknown field"),
    ],
)
def test_settings_blobs_errors(tmp_path: Path, blobs: str, error: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(f"{BASE}blobs: {blobs}\n")
    with pytest.raises(ConfigErrors) as info:
        load(cfg, environ={})
    assert error in str(info.value)


def test_settings_blobs_origins_are_normalised(tmp_path: Path) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(f'{BASE}blobs: {{origins: ["HTTPS://Minio.Example.com", "http://[::1]:9000/"]}}')
    origins = load(cfg, environ={}).blobs.origins
    assert origins == ("https://minio.example.com:443", "http://[::1]:9000")


async def test_forward_auth_refuses_routes_that_hand_out_presigned_urls(
    make_proxy: ProxyFactory, replay: Replay, storage: Storage, grant_store: RedisGrants
) -> None:
    # The answer would go from the upstream to the client past jitgate: no rewriting.
    extra = storage.config() + "forward_auth: {enabled: true, trusted_proxies: [127.0.0.1/32]}\n"
    gate = await make_proxy(upstream_url=replay.url, policy_text=POLICY, extra=extra)
    await grant(grant_store)
    headers = {"X-Original-URI": REPLAY, "X-Original-Method": "GET", **bearer()}
    resp = await gate.get("/_jit/authz", headers={**headers, "Accept": "application/json"})
    assert resp.status == 403
    assert "forward-auth cannot rewrite" in json.dumps(await resp.json())
    raw = await gate.get(
        "/_jit/authz", headers={**headers, "X-Original-URI": f"/raw/5/{SESSION}/x"}
    )
    assert raw.status == 403


async def test_policy_explain_names_the_blob_fields() -> None:
    # No identity: decided without asking for grants, so none are needed here.
    auth = Authorizer(compile_text(POLICY, "policy.yaml"), grants=None)  # type: ignore[arg-type]
    verdict = await decide_request(auth, None, "GET", REPLAY)
    assert verdict.to_dict()["blob_fields"] == [
        "data.domURL",
        "data.devtoolsURL",
        "data.canvas.url",
    ]
    lines = Explanation(verdict, None, (), "policy.yaml", "v", None).lines()
    assert any(line.startswith("blobs") and "data.canvas.url" in line for line in lines)


async def test_storage_behind_the_public_host_is_reached_at_its_own_address(
    make_proxy: ProxyFactory, replay: Replay, storage: Storage, grant_store: RedisGrants
) -> None:
    # The tool signs URLs for its public host (which is jitgate): jitgate connects to the
    # storage's own address and sends the Host the URL was signed for.
    public = "http://replay.invalid:8123"
    path = next(iter(FILES))
    signed = storage.presign(path).replace(storage.url, public)
    replay.raw["public"] = (200, JSON, json.dumps({"url": signed}).encode())
    extra = f'blobs: {{origins: ["{public}"], connect: {{"{public}": "{storage.url}"}}}}\n'
    gate = await make_proxy(upstream_url=replay.url, policy_text=POLICY, extra=extra)
    await grant(grant_store)
    answer = await gate.get(f"/raw/5/{SESSION}/public", headers=bearer())
    url = (await answer.json())["url"]
    got = await gate.get(url, headers=bearer())
    assert got.status == 200 and await got.read() == FILES[path]
    assert storage.headers[-1]["Host"] == "replay.invalid:8123"


@pytest.mark.parametrize(
    ("connect", "error"),
    [
        ('{"https://other.example.com": "http://n:80"}', "must name an origin listed"),
        ('{"https://minio.example.com": "http://n:80/path"}', "must be an http(s) address"),
        ('["http://n:80"]', "must map origins to strings"),
    ],
)
def test_settings_blobs_connect_errors(tmp_path: Path, connect: str, error: str) -> None:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(f'{BASE}blobs: {{origins: ["https://minio.example.com"], connect: {connect}}}\n')
    with pytest.raises(ConfigErrors) as info:
        load(cfg, environ={})
    assert error in str(info.value)
