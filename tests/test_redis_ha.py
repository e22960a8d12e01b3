"""Redis high availability against real processes: the settings; behind Sentinel, a master
killed under load, a coordinated failover of the event feed, TLS and the CLI; in a Redis
Cluster, the master of jitgate's slot killed under load and a coordinated failover."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from clusterkit import ClusterKit
from conftest import ROOT, Upstream, bearer, write_config
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from sentinelkit import MASTER_NAME, SentinelKit
from test_workers import Jitgate, serving
from waiting import eventually

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.errors import ConfigErrors
from proxy.grantstore import RedisGrants
from proxy.redisd import connect_redis
from proxy.settings import ClusterSettings, RedisSettings, SentinelSettings
from proxy.settings.read import Secret
from proxy.state import STATE

JITGATE = str(Path(sys.executable).parent / "jitgate")
SNAPSHOTS = "/api/projects/1/session_recordings/demo-{}/snapshots"
LIVE = "/api/projects/1/session_recordings/demo-1/live"
LOST = "a failover would lose it"


@pytest.fixture
def kit() -> Iterator[SentinelKit]:
    """A master, a replica and three sentinels (quorum 2), for this test alone."""
    k = SentinelKit(sentinels=3, quorum=2)
    try:
        yield k.start()
    finally:
        k.close()


@pytest.fixture(scope="module")
def small_kit() -> Iterator[SentinelKit]:
    """A master, a replica and one sentinel (quorum 1), shared by the module's quick tests;
    the servers and the sentinel each ask for a password."""
    k = SentinelKit(sentinels=1, quorum=1, password="redis-pw", sentinel_password="sentinel-pw")
    try:
        yield k.start()
    finally:
        k.close()


def sentinel_yaml(kit: SentinelKit, extra: str = "") -> str:
    addresses = ", ".join(f'"{a}"' for a in kit.sentinel_addresses)
    auth = "".join(
        f", {key}: {value}"
        for key, value in (("password", kit.password), ("sentinel_password", kit.sentinel_password))
        if value
    )
    return (
        f"redis: {{timeout: 0.5, {extra}"
        f"sentinel: {{master: {MASTER_NAME}, sentinels: [{addresses}]{auth}}}}}"
    )


def sentinel_config(tmp: Path, kit: SentinelKit, upstream_url: str, extra: str = "") -> Path:
    cfg = write_config(tmp, upstream_url=upstream_url, redis_url=None)
    text = cfg.read_text()
    assert "redis: {url: null, timeout: 0.5}" in text
    cfg.write_text(text.replace("redis: {url: null, timeout: 0.5}", sentinel_yaml(kit, extra)))
    return cfg


def settings_of(kit: SentinelKit) -> RedisSettings:
    addresses = tuple(("127.0.0.1", p) for p in kit.sentinel_ports)
    sentinel = SentinelSettings(
        MASTER_NAME,
        addresses,
        password=Secret(kit.password) if kit.password else None,
        sentinel_password=Secret(kit.sentinel_password) if kit.sentinel_password else None,
    )
    return RedisSettings(timeout=0.5, sentinel=sentinel)


# -- settings --------------------------------------------------------------------------


def _load(tmp_path: Path, redis_yaml: str) -> settings_mod.Settings:
    cfg = write_config(tmp_path, upstream_url="http://127.0.0.1:9", redis_url=None)
    text = cfg.read_text().replace("redis: {url: null, timeout: 0.5}", redis_yaml)
    cfg.write_text(text)
    return settings_mod.load(cfg, environ={})


def test_sentinel_settings_are_read(tmp_path: Path) -> None:
    s = _load(
        tmp_path,
        "redis:\n"
        "  wait_replicas: 1\n"
        "  sentinel:\n"
        "    master: main\n"
        "    sentinels: [10.0.0.1:26379, '[fd00::2]:26380', sentinel-3]\n"
        "    password: redis-secret\n"
        "    sentinel_password: sentinel-secret\n"
        "    db: 2\n",
    ).redis
    assert s.url is None and s.sentinel is not None
    assert s.sentinel.master == "main" and s.sentinel.db == 2
    assert s.sentinel.sentinels == (
        ("10.0.0.1", 26379),
        ("fd00::2", 26380),
        ("sentinel-3", 26379),
    )
    assert s.sentinel.password is not None and s.sentinel.password.reveal() == "redis-secret"
    assert "redis-secret" not in repr(s) and "sentinel-secret" not in repr(s)
    assert (s.wait_replicas, s.wait_timeout) == (1, 0.5)


@pytest.mark.parametrize(
    ("redis_yaml", "message"),
    [
        (
            'redis: {url: "redis://r:6379/0", sentinel: {master: m, sentinels: ["s:1"]}}',
            "redis.sentinel: set only one of redis.url, redis.sentinel and redis.cluster",
        ),
        (
            "redis: {sentinel: {master: m, sentinels: ['s:1']}, cluster: {nodes: ['r:1']}}",
            "redis.cluster: set only one of redis.url, redis.sentinel and redis.cluster",
        ),
        ("redis: {sentinel: {sentinels: ['s:1']}}", "redis.sentinel.master: is required"),
        ("redis: {sentinel: {master: m}}", "redis.sentinel.sentinels: is required"),
        ("redis: {sentinel: {master: m, sentinels: []}}", "must name at least one address"),
        (
            "redis: {sentinel: {master: m, sentinels: ['s:port']}}",
            "redis.sentinel.sentinels: must be host:port addresses",
        ),
        ("redis: {sentinel: {master: m, sentinels: ['s:1'], pasword: x}}", "unknown field"),
        (
            "redis: {cluster: {nodes: ['r:7000']}}",
            "redis.key_prefix: must carry a hash tag such as '{jit}:' with redis.cluster",
        ),
        ("redis: {key_prefix: '{}:', cluster: {nodes: ['r:7000']}}", "got '{}:'"),
        ("redis: {key_prefix: '{j}:', cluster: {nodes: []}}", "redis.cluster.nodes: must name"),
        ("redis: {key_prefix: '{j}:', cluster: {nodes: ['r:1'], db: 1}}", "unknown field"),
        ("redis: {wait_replicas: -1}", "redis.wait_replicas: must not be negative"),
        (
            "redis: {timeout: 0.5, wait_timeout: 0.5}",
            "redis.wait_timeout: must be shorter than redis.timeout (0.5s)",
        ),
    ],
)
def test_bad_redis_settings_are_refused(tmp_path: Path, redis_yaml: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, redis_yaml)
    assert message in str(info.value)


# -- a master killed under load ---------------------------------------------------------


def replay_upstream() -> web.Application:
    """JSON for any path, and an echoing WebSocket on LIVE: a live connection under a grant."""

    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get(LIVE, echo)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


async def closed(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Wait for the end of a WebSocket; return its close code."""
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.CLOSE:
            return int(msg.data)
        if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code or 0


async def kill_under_load(
    client: TestClient,
    kill: Callable[[], None],
    promoted: Callable[[], Awaitable[float | None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Write grants with WAIT 1, then kill the master under continuous protected requests
    from a user with a grant and one without, and a WebSocket open under the grant.

    `promoted` returns the time a replica was seen promoted, or None while not yet.
    """
    state = client.app[STATE]
    view = state.grant_view
    assert view is not None
    # Written with WAIT 1: each add returns once the replica has the grant.
    grants = [
        await state.grants.add("alice", f"recording:1/demo-{i}", 600, "ha test", "pytest")
        for i in range(20)
    ]
    assert LOST not in caplog.text
    assert (await client.get(SNAPSHOTS.format(1), headers=bearer("alice"))).status == 200
    assert (await client.get(SNAPSHOTS.format(1), headers=bearer("mallory"))).status == 403
    # The event feed runs on the master, and its probe works there.
    await eventually(view.current, what="the grant view to follow the master")
    live = await client.ws_connect(LIVE, headers=bearer("alice"))
    await live.send_str("hello")
    assert await live.receive_str() == "hello"

    seen: list[tuple[float, str, int]] = []
    stop = asyncio.Event()

    async def load(user: str, n: int) -> None:
        while not stop.is_set():
            r = await client.get(SNAPSHOTS.format(n), headers=bearer(user))
            seen.append((time.monotonic(), user, r.status))
            r.release()
            await asyncio.sleep(0.005)  # pacing: the Redis processes share the two cores

    loaders = [asyncio.create_task(load("alice", 1)), asyncio.create_task(load("mallory", 1))]
    try:
        await eventually(lambda: len(seen) > 20, what="the load to run")
        killed = time.monotonic()
        kill()
        # Failing closed: the feed ends, so the view empties and live connections are cut.
        await eventually(lambda: not view.current() and not len(view), what="the view to stop")
        assert await asyncio.wait_for(closed(live), 10) == 1008
        at = await eventually(promoted, within=30, interval=0.02, what="a replica promoted")

        def served_again() -> bool:
            return any(t > at and u == "alice" and s == 200 for t, u, s in seen)

        # Service is back within 5 s of the promotion.
        await eventually(served_again, within=5, what="alice to be served by the new master")
        await eventually(
            lambda: any(t > at and u == "mallory" and s == 403 for t, u, s in seen),
            within=5,
            what="mallory to be refused by the new master",
        )
    finally:
        stop.set()
        await asyncio.gather(*loaders)
        await live.close()

    during = [(u, s) for t, u, s in seen if t > killed]
    assert ("alice", 503) in during  # the failover was seen, and refused
    assert {s for _, u, s in seen if u == "alice"} <= {200, 503}
    assert {s for _, u, s in seen if u == "mallory"} <= {403, 503}  # never 200 without a grant
    refused = max(t for t, u, s in seen if u == "alice" and s == 503)
    back = min(t for t, u, s in seen if t > refused and u == "alice" and s == 200)
    print(f"after the kill: promoted at {at - killed:.2f}s, served at {back - killed:.2f}s")
    # No grant written before the kill is lost.
    for g in grants:
        found = await state.grants.get(g.id)
        assert found is not None and found.state == "active", g.id

    metrics = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_live_connections_cut_total{reason="redis_unavailable"} 1.0' in metrics
    # The event feed follows the new master: a revocation there holds here at once.
    await eventually(view.current, what="the grant view to follow the new master")
    assert await state.grants.revoke(grants[1].id) is not None
    assert (await client.get(SNAPSHOTS.format(1), headers=bearer("alice"))).status == 403
    # With the old master gone the new one has no replica: WAIT says so in the log.
    assert "a grant change reached 0 of 1 replica(s)" in caplog.text
    await state.audit.flush(force=True)
    assert "an audit batch reached 0 of 1 replica(s)" in caplog.text


async def test_master_killed_under_load_fails_closed_and_comes_back(
    kit: SentinelKit,
    aiohttp_client: Any,
    aiohttp_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="jitgate.redis")
    up = str((await aiohttp_server(replay_upstream())).make_url("")).rstrip("/")
    cfg = sentinel_config(tmp_path, kit, up, "wait_replicas: 1, wait_timeout: 0.3, ")
    client: TestClient = await aiohttp_client(build_app(settings_mod.load(cfg, environ={})))
    watcher = Redis(port=kit.sentinel_ports[0])
    switches = watcher.pubsub()
    await switches.subscribe("+switch-master")

    async def switched() -> float | None:
        msg = await switches.get_message(ignore_subscribe_messages=True, timeout=0.5)
        return time.monotonic() if msg and msg["type"] == "message" else None

    try:
        await kill_under_load(client, lambda: kit.kill("a"), switched, caplog)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{kit.logs()}") from exc
    finally:
        await switches.aclose()
        await watcher.aclose()
    assert kit.master_port() == kit.ports["b"]


# -- Sentinel: a coordinated failover, the old master left up -------------------------


async def test_the_event_feed_ends_when_sentinel_moves_the_master(small_kit: SentinelKit) -> None:
    """A failover that leaves the old master up (SENTINEL FAILOVER, or a partition) drops
    no connection: the feed itself notices that the sentinels name another master, ends
    (its followers fail closed), and a new feed subscribes on the new master."""
    client = connect_redis(settings_of(small_kit))
    store = RedisGrants(client)
    feed = store.events(ping_every=0.05)
    sentinel = Redis(port=small_kit.sentinel_ports[0], password=small_kit.sentinel_password)
    try:
        assert await anext(feed) == ("subscribed", "")
        before = small_kit.master_port()
        assert await sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        await ends_with_connection_error(feed)
        assert small_kit.master_port() != before
        await feed.aclose()  # type: ignore[attr-defined]

        feed = await _subscribe(store)
        grant = await store.add("alice", "recording:1/x", 60, "r", "pytest")
        await store.revoke(grant.id)
        await hear(feed, ("revoked", grant.id))
    finally:
        await feed.aclose()  # type: ignore[attr-defined]
        await sentinel.aclose()
        await client.aclose()


async def _subscribe(store: RedisGrants) -> Any:
    """A new event feed once subscribing works (the sentinels settle after a failover)."""
    feeds: list[Any] = []

    async def subscribed() -> bool:
        feed = store.events(ping_every=0.05)
        try:
            if await anext(feed) == ("subscribed", ""):
                feeds.append(feed)
                return True
        except ConnectionError:
            pass
        await feed.aclose()
        return False

    await eventually(subscribed, within=10, interval=0.1, what="a feed on the new master")
    return feeds[0]


# -- TLS ------------------------------------------------------------------------------


async def hear(feed: Any, event: tuple[str, str]) -> None:
    """Read the event feed until it yields `event` (each event within 5 s)."""
    kinds: list[tuple[str, str]] = []
    while event not in kinds:
        kinds.append(await asyncio.wait_for(anext(feed), 5))


async def ends_with_connection_error(feed: Any) -> None:
    """The feed ends (within 30 s) by raising ConnectionError: its followers fail closed."""

    async def drain() -> None:
        async for _ in feed:
            pass

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(drain(), 30)


async def grants_and_feed_work(client: Any, prefix: str = "jit:") -> None:
    """A grant is stored, found and revoked through `client`, and its feed hears it."""
    store = RedisGrants(client, prefix)
    feed = store.events(ping_every=0.05)
    try:
        assert await anext(feed) == ("subscribed", "")
        grant = await store.add("alice", "recording:1/demo-1", 60, "r", "pytest")
        assert await store.check("alice", ("recording:1/demo-1",)) is not None
        await store.revoke(grant.id)
        await hear(feed, ("revoked", grant.id))
    finally:
        await feed.aclose()


async def test_sentinel_and_redis_over_tls() -> None:
    """TLS only (servers, replication, sentinel), under a CA of the test's own: jitgate's
    client verifies both against redis.sentinel.tls_ca_file, and refuses without it."""
    kit = await asyncio.to_thread(SentinelKit(sentinels=1, quorum=1, tls=True).start)
    try:
        assert kit.ca_file is not None
        plain = settings_of(kit)
        assert plain.sentinel is not None
        verified = replace(plain.sentinel, tls=True, tls_ca_file=kit.ca_file)
        for refused in (plain.sentinel, replace(plain.sentinel, tls=True)):
            client = connect_redis(replace(plain, sentinel=refused))
            with pytest.raises(MasterNotFoundError):
                await client.ping()
            await client.aclose()
        client = connect_redis(replace(plain, sentinel=verified))
        try:
            await grants_and_feed_work(client)
        finally:
            await client.aclose()
    finally:
        kit.close()


def test_tls_ca_file_is_checked(tmp_path: Path) -> None:
    base = "redis: {sentinel: {master: m, sentinels: ['s:1'], "
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, base + "tls: true, tls_ca_file: missing.pem}}")
    assert "redis.sentinel.tls_ca_file: no such file:" in str(info.value)
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, base + "tls_ca_file: ca.pem}}")
    assert "redis.sentinel.tls_ca_file: needs redis.sentinel.tls: true" in str(info.value)
    s = _load(tmp_path, base + "tls: true, tls_ca_file: ca.pem}}").redis.sentinel
    assert s is not None and s.tls_ca_file == tmp_path / "ca.pem"


# -- the CLI through Sentinel -----------------------------------------------------------


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `jitgate ARGS --config cfg`."""
    return subprocess.run(
        [JITGATE, *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_reaches_redis_through_sentinel(
    small_kit: SentinelKit, tmp_path: Path, upstream: Upstream
) -> None:
    cfg = sentinel_config(tmp_path, small_kit, upstream.url)
    added = cli(cfg, "grants", "add", "--user", "carol", "--scope", "recording:1/demo-7",
                "--ttl", "5m", "--reason", "via sentinel")  # fmt: skip
    assert added.returncode == 0, added.stderr
    grant_id = added.stdout.split()[0]
    listed = cli(cfg, "grants", "list", "--user", "carol")
    assert listed.returncode == 0 and grant_id in listed.stdout, listed.stderr
    explained = cli(cfg, "policy", "explain", "GET", SNAPSHOTS.format(7), "--user", "carol")
    assert explained.returncode == 0 and grant_id in explained.stdout, explained.stderr
    queried = cli(cfg, "audit", "query", "--grant", grant_id, "--json")
    assert queried.returncode == 0 and f'"grant_id": "{grant_id}"' in queried.stdout


# -- Redis Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterKit]:
    """A Redis Cluster of three masters and three replicas, shared by the module."""
    k = ClusterKit()
    try:
        yield k.start()
    finally:
        k.close()


def cluster_settings(kit: ClusterKit) -> RedisSettings:
    nodes = tuple(("127.0.0.1", p) for p in kit.ports)
    return RedisSettings(timeout=0.5, key_prefix="{jit}:", cluster=ClusterSettings(nodes))


async def test_cluster_failover_moves_the_feed_and_the_clients(cluster: ClusterKit) -> None:
    """CLUSTER FAILOVER on the replica of jitgate's slot leaves the old master up, now a
    replica: the feed notices the new master and ends; a pooled connection to the old one
    gets MOVED, and the call goes to the new master instead of failing."""
    client, other = (
        connect_redis(cluster_settings(cluster)),
        connect_redis(cluster_settings(cluster)),
    )
    store, elsewhere = RedisGrants(client, "{jit}:"), RedisGrants(other, "{jit}:")
    grant = await store.add("alice", "recording:1/x", 60, "r", "pytest")
    assert await elsewhere.check("alice", ("recording:1/x",)) is not None  # pools a connection
    feed = store.events(ping_every=0.05)
    try:
        assert await anext(feed) == ("subscribed", "")
        master, _ = cluster.owner("{jit}:grants")
        with cluster.node(cluster.replica_of(master)) as replica:
            assert replica.execute_command("CLUSTER", "FAILOVER")
        await ends_with_connection_error(feed)
        assert cluster.owner("{jit}:grants")[0] != master
        found = await elsewhere.check("alice", ("recording:1/x",))
        assert found is not None and found[0] == grant.id
        await feed.aclose()  # type: ignore[attr-defined]
        feed = await _subscribe(store)
        await elsewhere.revoke(grant.id)
        await hear(feed, ("revoked", grant.id))
    finally:
        await feed.aclose()  # type: ignore[attr-defined]
        await client.aclose()
        await other.aclose()


def cluster_config(tmp: Path, kit: ClusterKit, upstream_url: str, extra: str = "") -> Path:
    nodes = ", ".join(f'"{a}"' for a in kit.addresses)
    redis_yaml = (
        f'redis: {{timeout: 0.5, {extra}key_prefix: "{{jit}}:", cluster: {{nodes: [{nodes}]}}}}'
    )
    cfg = write_config(tmp, upstream_url=upstream_url, redis_url=None)
    cfg.write_text(cfg.read_text().replace("redis: {url: null, timeout: 0.5}", redis_yaml))
    return cfg


def test_cli_reaches_the_cluster(cluster: ClusterKit, tmp_path: Path, upstream: Upstream) -> None:
    cfg = cluster_config(tmp_path, cluster, upstream.url)
    added = cli(cfg, "grants", "add", "--user", "dave", "--scope", "recording:1/demo-8",
                "--ttl", "5m", "--reason", "via the cluster")  # fmt: skip
    assert added.returncode == 0, added.stderr
    grant_id = added.stdout.split()[0]
    listed = cli(cfg, "grants", "list", "--user", "dave")
    assert listed.returncode == 0 and grant_id in listed.stdout, listed.stderr
    queried = cli(cfg, "audit", "query", "--grant", grant_id, "--json")
    assert queried.returncode == 0 and f'"grant_id": "{grant_id}"' in queried.stdout
    master, _ = cluster.owner("{jit}:grants")
    with cluster.node(master) as node:  # the keys are where jitgate's prefix puts them
        assert node.exists(f"{{jit}}:grant:{grant_id}", "{jit}:audit") == 2


async def test_cluster_master_killed_under_load(
    cluster: ClusterKit,
    aiohttp_client: Any,
    aiohttp_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same through a Redis Cluster of three masters and three replicas: jitgate's keys
    (prefix {jit}:) share one slot, and the master of that slot is killed."""
    caplog.set_level(logging.WARNING, logger="jitgate.redis")
    await asyncio.to_thread(cluster.settle)
    up = str((await aiohttp_server(replay_upstream())).make_url("")).rstrip("/")
    cfg = cluster_config(tmp_path, cluster, up, "wait_replicas: 1, wait_timeout: 0.3, ")
    client: TestClient = await aiohttp_client(build_app(settings_mod.load(cfg, environ={})))
    master, _ = cluster.owner("{jit}:grants")

    async def moved() -> float | None:
        owner, _ = await asyncio.to_thread(cluster.owner, "{jit}:grants")
        return time.monotonic() if owner != master else None

    try:
        await kill_under_load(client, lambda: cluster.kill(master), moved, caplog)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from exc


async def test_cluster_over_tls() -> None:
    """TLS only (clients, the cluster bus, replication) under a CA of the test's own: jitgate
    verifies the nodes against redis.cluster.tls_ca_file, and refuses without it."""
    kit = await asyncio.to_thread(ClusterKit(tls=True).start)
    try:
        plain = cluster_settings(kit)
        assert plain.cluster is not None and kit.ca_file is not None
        for refused in (plain.cluster, replace(plain.cluster, tls=True)):
            client = connect_redis(replace(plain, cluster=refused))
            with pytest.raises(RedisConnectionError):
                await client.ping()
            await client.aclose()
        verified = replace(plain.cluster, tls=True, tls_ca_file=kit.ca_file)
        client = connect_redis(replace(plain, cluster=verified))
        try:
            await grants_and_feed_work(client, "{jit}:")
        finally:
            await client.aclose()
    finally:
        kit.close()


# -- workers ---------------------------------------------------------------------------


def serve_workers(cfg: Path, tmp: Path, n: int) -> Jitgate:
    """Start `jitgate serve --workers n`; not yet waited on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITGATE_", "PROMETHEUS_"))}
    log_file = tmp / "jitgate.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--workers", str(n)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return Jitgate(proc, tmp, log_file)


async def test_workers_share_the_sentinel_master(
    small_kit: SentinelKit, tmp_path: Path, upstream: Upstream
) -> None:
    """`serve --workers 2` with redis.sentinel starts no embedded Redis: each worker reaches
    the master through the sentinels."""
    j = serve_workers(sentinel_config(tmp_path, small_kit, upstream.url), tmp_path, 2)
    client = connect_redis(settings_of(small_kit))
    try:
        serving(j)
        assert len(j.workers()) == 2 and not j.redis_servers(), j.log()
        await RedisGrants(client).add("erin", "recording:1/demo-3", 60, "r", "pytest")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{j.url}/_jit/readyz") as r:
                assert r.status == 200, await r.text()
            for _ in range(4):  # whichever worker answers
                async with http.get(j.url + SNAPSHOTS.format(3), headers=bearer("erin")) as r:
                    assert r.status == 200
    finally:
        await client.aclose()
        assert j.stop() == 0, j.log()
