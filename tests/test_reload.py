"""Policy hot reload: a real file watcher, a real SIGHUP, real Redis and upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import ROOT, ProxyFactory, Upstream, bearer, write_config
from waiting import eventually

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.state import STATE

SNAPSHOTS = "/api/projects/1/session_recordings/demo-1/snapshots"
BASE = (ROOT / "config" / "policy.yaml").read_text()
ROUTE_SCOPE = '    access: protected\n    scope: "recording:{project}/{recording}"\n'
assert BASE.count(ROUTE_SCOPE) == 1
# The recording route becomes public: a request without a token now reaches the upstream.
PUBLIC = BASE.replace(ROUTE_SCOPE, "    access: public\n")
BAD = BASE.replace(ROUTE_SCOPE, ROUTE_SCOPE.replace("/{recording}", "/{x}"))
BAD_LINE = BAD.splitlines().index('    scope: "recording:{project}/{x}"') + 1


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def running_version(client: TestClient) -> str:
    return client.app[STATE].config.policy.version


def reloads(client: TestClient, result: str) -> float:
    value = client.app[STATE].metrics.registry.get_sample_value(
        "jitgate_policy_reloads_total", {"result": result}
    )
    return value or 0.0


async def until(cond: Callable[[], bool], what: str, within: float = 15.0) -> None:
    await eventually(cond, within=within, what=what)


def replace_file(path: Path, text: str) -> None:
    """Save the way editors do: write a new file, then rename it over the old one."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def policy_records(client: TestClient, tmp_path: Path) -> list[dict[str, Any]]:
    await client.app[STATE].audit.flush(force=True)
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"].startswith("policy.")]


@pytest.fixture
def start_unwatched(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream, redis_url: str
) -> Callable[[], Any]:
    """Start jitgate with policy.watch off (set through the config's environment layer)."""

    async def factory() -> TestClient:
        cfg = write_config(tmp_path, upstream_url=upstream.url, redis_url=redis_url)
        settings = settings_mod.load(cfg, environ={"JITGATE_POLICY__WATCH": "false"})
        assert settings.policy_watch is False
        client: TestClient = await aiohttp_client(build_app(settings))
        return client

    return factory


async def test_file_change_is_picked_up_and_changes_the_decision(
    make_proxy: ProxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    client = await make_proxy()
    old = version_of(BASE)
    assert running_version(client) == old
    assert (await client.get(SNAPSHOTS)).status == 401
    assert upstream.paths() == []

    replace_file(tmp_path / "policy.yaml", PUBLIC)
    new = version_of(PUBLIC)
    await until(lambda: running_version(client) == new, "the watcher to load the new policy")

    assert (await client.get(SNAPSHOTS)).status == 200
    assert upstream.paths() == [SNAPSHOTS]
    (rec,) = await policy_records(client, tmp_path)
    assert rec["event"] == "policy.reloaded"
    assert rec["previous_version"] == old and rec["policy_version"] == new
    assert rec["actor"] == "file-watch" and rec["file"] == str(tmp_path / "policy.yaml")
    text = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_policy_reloads_total{result="ok"} 1.0' in text
    assert f'jitgate_policy_loaded_timestamp_seconds{{version="{new}"}}' in text
    assert f'version="{old}"' not in text


async def test_bad_policy_keeps_the_old_one_until_fixed(
    make_proxy: ProxyFactory,
    upstream: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jitgate.reload")
    client = await make_proxy()
    old = version_of(BASE)
    path = tmp_path / "policy.yaml"

    path.write_text(BAD)  # written in place this time, not renamed
    await until(lambda: reloads(client, "error") >= 1, "the failed reload")
    assert running_version(client) == old
    assert (await client.get(SNAPSHOTS)).status == 401
    assert (await client.get(SNAPSHOTS, headers=bearer())).status == 403
    expected = f"{path}:{BAD_LINE}: routes[4].scope: unknown parameter {{x}}"
    assert expected in caplog.messages
    text = await (await client.get("/_jit/metrics")).text()
    assert 'jitgate_policy_reloads_total{result="error"} 1.0' in text
    assert f'jitgate_policy_loaded_timestamp_seconds{{version="{old}"}}' in text
    (failed,) = await policy_records(client, tmp_path)
    assert failed["event"] == "policy.reload_failed" and failed["actor"] == "file-watch"
    assert failed["policy_version"] == old and failed["errors"] == [expected]
    assert failed["file"] == str(path)

    replace_file(path, PUBLIC)
    await until(lambda: running_version(client) == version_of(PUBLIC), "the fixed policy")
    assert (await client.get(SNAPSHOTS)).status == 200
    assert upstream.paths() == [SNAPSHOTS]
    events = [r["event"] for r in await policy_records(client, tmp_path)]
    assert events == ["policy.reload_failed", "policy.reloaded"]
    assert reloads(client, "error") == 1 and reloads(client, "ok") == 1


async def test_deleted_file_keeps_the_old_policy(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy()
    path = tmp_path / "policy.yaml"
    path.unlink()
    await until(lambda: reloads(client, "error") >= 1, "the failed reload")
    assert running_version(client) == version_of(BASE)
    assert any(m.startswith(f"{path}: cannot read") for m in caplog.messages)
    assert (await client.get(SNAPSHOTS)).status == 401

    path.write_text(PUBLIC)
    await until(lambda: running_version(client) == version_of(PUBLIC), "the new file")


async def test_sighup_reloads_when_watching_is_off(
    start_unwatched: Callable[[], Any], upstream: Upstream, tmp_path: Path
) -> None:
    client = await start_unwatched()
    old, new = version_of(BASE), version_of(PUBLIC)
    replace_file(tmp_path / "policy.yaml", PUBLIC)
    await asyncio.sleep(0.5)  # intended: a watcher would have reloaded by now
    assert running_version(client) == old
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "policy-watch"]

    os.kill(os.getpid(), signal.SIGHUP)
    await until(lambda: running_version(client) == new, "the SIGHUP reload")
    assert (await client.get(SNAPSHOTS)).status == 200
    assert upstream.paths() == [SNAPSHOTS]
    (rec,) = await policy_records(client, tmp_path)
    assert rec["event"] == "policy.reloaded" and rec["actor"] == "SIGHUP"
    assert rec["previous_version"] == old and rec["policy_version"] == new


async def test_unchanged_content_is_not_a_reload(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    client = await make_proxy()
    reloader = client.app[STATE].reloader
    before = client.app[STATE].config
    assert await reloader.reload_now() == "unchanged"
    (tmp_path / "policy.yaml").write_text(BASE)  # rewritten, same bytes
    await until(lambda: reloads(client, "unchanged") >= 2, "the watcher's unchanged reload")
    assert client.app[STATE].config is before
    assert await policy_records(client, tmp_path) == []
    assert reloads(client, "ok") == 0 and reloads(client, "error") == 0


async def test_reload_now_reports_each_result(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    client = await make_proxy()
    reloader = client.app[STATE].reloader
    path = tmp_path / "policy.yaml"
    await reloader.stop()  # only the explicit calls below reload
    path.write_text(BAD)
    assert await reloader.reload_now("test") == "error"
    path.write_text(PUBLIC)
    assert await reloader.reload_now("test") == "ok"
    assert await reloader.reload_now("test") == "unchanged"
    path.write_text(BASE)
    assert await reloader.reload_now("test") == "ok"
    text = await (await client.get("/_jit/metrics")).text()
    for result, n in (("ok", 2), ("error", 1), ("unchanged", 1)):
        assert f'jitgate_policy_reloads_total{{result="{result}"}} {n}.0' in text
    versions = [ln for ln in text.splitlines() if ln.startswith("jitgate_policy_loaded_")]
    assert len(versions) == 1 and f'version="{version_of(BASE)}"' in versions[0]
    records = await policy_records(client, tmp_path)
    assert [(r["event"], r["actor"]) for r in records] == [
        ("policy.reload_failed", "test"),
        ("policy.reloaded", "test"),
        ("policy.reloaded", "test"),
    ]


async def test_cleanup_stops_the_watcher_and_the_signal_handler(
    make_proxy: ProxyFactory,
) -> None:
    client = await make_proxy()
    assert [t for t in asyncio.all_tasks() if t.get_name() == "policy-watch"]
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
    await client.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "policy-watch"]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def kubelet_write(volume: Path, files: dict[str, str], generation: int) -> None:
    """Update a volume the way the kubelet updates a mounted ConfigMap (its atomic writer).

    Each version lives in a timestamped directory; `..data` is a symlink to the current
    one and every key is a symlink through it (`policy.yaml -> ..data/policy.yaml`). An
    update writes a new directory, points `..data_tmp` at it, renames that over `..data`
    and removes the old directory: the key's own symlink never changes.
    """
    version = volume / f"..2026_12_04_07_00_0{generation}.{1000 + generation}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    (volume / "..data_tmp").symlink_to(version.name)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.replace(volume / "..data_tmp", volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")
    if old is not None:
        for child in (volume / old).iterdir():
            child.unlink()
        (volume / old).rmdir()


async def test_a_configmap_update_is_picked_up(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    volume = tmp_path / "policy-volume"
    volume.mkdir()
    kubelet_write(volume, {"policy.yaml": BASE}, 1)
    cfg = write_config(tmp_path, upstream_url=upstream.url, redis_url=redis_url)
    environ = {"JITGATE_POLICY__FILE": str(volume / "policy.yaml")}
    client: TestClient = await aiohttp_client(build_app(settings_mod.load(cfg, environ=environ)))
    assert running_version(client) == version_of(BASE)
    assert (await client.get(SNAPSHOTS)).status == 401

    kubelet_write(volume, {"policy.yaml": PUBLIC}, 2)
    await until(lambda: running_version(client) == version_of(PUBLIC), "the ConfigMap's new policy")
    assert (await client.get(SNAPSHOTS)).status == 200
    (rec,) = await policy_records(client, tmp_path)
    assert rec["actor"] == "file-watch" and rec["file"] == str(volume / "policy.yaml")

    kubelet_write(volume, {"policy.yaml": BAD}, 3)  # a bad update keeps the running policy
    await until(lambda: reloads(client, "error") >= 1, "the failed reload")
    assert running_version(client) == version_of(PUBLIC)
