"""Shared fixtures: a real redis-server per session, real upstream servers, real proxies."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from storagekit import Storage, start_storage

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.grantstore import RedisGrants

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789abcdef0123456789abcdef"
ISSUER = "jitgate-test"
AUDIENCE = "jitgate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server on a free TCP port, which a test may stop and start again."""

    def __init__(self, *, persist: bool = False, fsync: str = "always") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="jitgate-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.persist = persist  # an append-only file, fsync'd always: kill loses nothing
        self.fsync = fsync  # or everysec: kill loses the last second, and no write waits

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required for the tests (.ci/run installs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", self.fsync,
             "--dir", str(self.dir), "--notify-keyspace-events", "Ex"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis_sync.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that kill it."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@dataclass
class Upstream:
    """A real upstream HTTP server that records every request it receives."""

    server: TestServer
    hits: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.hits]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    holder: list[Upstream] = []

    async def anything(request: web.Request) -> web.StreamResponse:
        holder[0].hits.append((request.method, request.raw_path, dict(request.headers)))
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body_bytes": len(body),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    up = Upstream(await aiohttp_server(app))
    holder.append(up)
    return up


@pytest.fixture
async def grant_store(redis_url: str) -> AsyncIterator[RedisGrants]:
    """The grant store in the session's Redis (emptied for this test)."""
    redis = Redis.from_url(redis_url)
    yield RedisGrants(redis)
    await redis.aclose()


@pytest.fixture
async def storage(aiohttp_server: Any) -> Storage:
    """A real local "S3" that signs and checks its own presigned URLs (storagekit.py)."""
    return await start_storage(aiohttp_server)


def demo_policy(entitlements: str) -> str:
    """config/policy.yaml with its `entitlements:` section replaced by the given one."""
    policy = (ROOT / "config" / "policy.yaml").read_text()
    return policy.split("\nentitlements:")[0] + entitlements


def write_config(
    tmp: Path,
    *,
    upstream_url: str,
    redis_url: str | None,
    extra: str = "",
    policy_text: str | None = None,
    read_timeout: float = 5,
    listen: str = "",
) -> Path:
    """Write a config and the demo policy into tmp and return the config path."""
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text or (ROOT / "config" / "policy.yaml").read_text())
    cfg = tmp / "jitgate.yaml"
    cfg.write_text(
        f"""
listen: {{host: 127.0.0.1, port: 0{", " + listen if listen else ""}}}
upstream: {{url: "{upstream_url}", connect_timeout: 2, read_timeout: {read_timeout}}}
redis: {{url: {f'"{redis_url}"' if redis_url else "null"}, timeout: 0.5}}
state_dir: state
policy: {{file: policy.yaml}}
identity:
  algorithms: [HS256]
  hs_secret: {SECRET}
  dev_key: {SECRET}
  issuer: {ISSUER}
  audience: {AUDIENCE}
audit:
  file: audit.jsonl
  flush_interval: 0.05
{extra}
"""
    )
    return cfg


def count_round_trips(client: Any) -> list[object]:
    """Count the connections a redis.asyncio client takes from now on (one per command or
    pipeline: one round trip each); the list grows by one each time."""
    sent: list[object] = []
    real = client.connection_pool.get_connection

    async def counted(*args: Any, **kw: Any) -> Any:
        sent.append(args)
        return await real(*args, **kw)

    client.connection_pool.get_connection = counted
    return sent


def make_token(sub: str = "alice", *, groups: list[str] | None = None, **claims: Any) -> str:
    now = int(time.time())
    # Valid for longer than the whole suite runs: some modules mint theirs at import.
    payload: dict[str, Any] = {
        "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 4 * 3600,
    }  # fmt: skip
    if groups:
        payload["groups"] = groups
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(sub: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub)}"}


ProxyFactory = Callable[..., Any]


@pytest.fixture
async def make_proxy(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream, redis_url: str
) -> AsyncIterator[ProxyFactory]:
    """Start jitgate in front of the recording upstream; keyword args change the config.

    At the end every audit record the proxies wrote is checked against the JSON Schema.
    """
    clients: list[TestClient] = []

    async def factory(
        *, extra: str = "", upstream_url: str | None = None, redis: str | None = None,
        policy_text: str | None = None,
    ) -> TestClient:  # fmt: skip
        cfg = write_config(
            tmp_path,
            upstream_url=upstream_url or upstream.url,
            redis_url=redis or redis_url,
            extra=extra,
            policy_text=policy_text,
        )
        settings = settings_mod.load(cfg, environ={})
        client: TestClient = await aiohttp_client(build_app(settings))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()  # flushes the audit log
    check_audit_file(tmp_path / "audit.jsonl")


AUDIT_SCHEMA = json.loads((ROOT / "config" / "audit-record.schema.json").read_text())


def check_audit_file(path: Path) -> None:
    """Assert that every record in an audit file fits config/audit-record.schema.json."""
    if not path.exists():
        return
    validator = jsonschema.Draft202012Validator(
        AUDIT_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for n, line in enumerate(path.read_text().splitlines(), 1):
        errors = sorted(validator.iter_errors(json.loads(line)), key=str)
        assert not errors, f"{path.name}:{n}: {errors[0].message} in {line}"


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> AsyncIterator[TestClient]:
    yield await make_proxy()
