"""The HMAC-chained audit trail and `jitgate audit verify`, on real files and a real Redis."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from pathlib import Path
from typing import Any

import redis as redis_sync
from conftest import SECRET
from redis.asyncio import Redis
from test_cli import run
from waiting import eventually

from proxy import settings as settings_mod
from proxy.app import make_audit_log
from proxy.audit import CHECKPOINT, AuditLog, record
from proxy.audit.sinks import JsonlFileSink
from proxy.metrics import Metrics

KEY = "audit-chain-key-0123456789abcdef-0123456789"
STREAM = "jit:audit"


def config(tmp: Path, redis_url: str | None, *, every: int = 1000, interval: float = 60.0,
           key: str | None = KEY, key_id: str = "k1") -> Path:  # fmt: skip
    cfg = tmp / "jitgate.yaml"
    cfg.write_text(
        f"""
upstream: {{url: "http://127.0.0.1:1"}}
redis: {{url: {f'"{redis_url}"' if redis_url else "null"}}}
identity: {{hs_secret: {SECRET}}}
audit:
  file: audit.jsonl
  flush_interval: 0.05
  key_id: {key_id}
  checkpoint_every: {every}
  checkpoint_interval: {interval}
"""
        + (f"  hmac_key: {key}\n" if key else "")
    )
    return cfg


async def write_trail(cfg: Path, n: int = 12) -> list[AuditLog]:
    """Two writers (as two proxies would be) interleaving into one file and one stream."""
    s = settings_mod.load(cfg, environ={})
    redis = Redis.from_url(s.redis.url) if s.redis.url else None
    logs = [make_audit_log(s, redis, Metrics()) for _ in range(2)]
    for log in logs:
        await log.start()
    for i in range(n):
        logs[i % 2].emit(record("access.allow", user=f"u{i}", scope="recording:1/demo-1", n=i))
    for log in logs:
        await log.close()
    if redis is not None:
        await redis.aclose()
    return logs


def verify(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("audit", "verify", "--config", str(cfg), *args)


def trail(cfg: Path) -> list[str]:
    return (cfg.parent / "audit.jsonl").read_text().splitlines()


def save(cfg: Path, lines: list[str]) -> None:
    (cfg.parent / "audit.jsonl").write_text("".join(x + "\n" for x in lines))


def where(lines: list[str], writer: str, seq: int) -> int:
    """Index of the writer's record seq in lines."""
    for i, text in enumerate(lines):
        rec = json.loads(text)
        if rec["writer"] == writer and rec["seq"] == seq:
            return i
    raise AssertionError(f"no {writer} seq {seq}")


def errors(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [x for x in out.stdout.splitlines() if ": error: " in x]


async def test_records_carry_a_verifiable_chain(tmp_path: Path) -> None:
    log = AuditLog([JsonlFileSink(tmp_path / "a.jsonl")], hmac_key=KEY.encode(), key_id="k7")
    log.emit(record("access.allow", user="alice"))
    log.emit(record("access.deny", user="bob"))
    await log.close()
    recs = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert {r["writer"] for r in recs} == {log.writer} and len(log.writer) == 12
    assert recs[0]["prev"] == "" and recs[1]["prev"] == recs[0]["mac"]
    for r in recs:
        assert r["kid"] == "k7"
        body = json.dumps(
            {k: v for k, v in r.items() if k != "mac"}, sort_keys=True, separators=(",", ":")
        )
        assert r["mac"] == hmac.new(KEY.encode(), body.encode(), hashlib.sha256).hexdigest()
    end = recs[-1]
    assert end["event"] == CHECKPOINT and end["final"] is True
    assert end["checkpoint_seq"] == 3 and end["head"] == recs[1]["mac"]


async def test_without_a_key_no_chain_fields_and_verify_refuses(tmp_path: Path) -> None:
    cfg = config(tmp_path, None, key=None)
    await write_trail(cfg, n=3)
    recs = [json.loads(x) for x in trail(cfg)]
    assert len(recs) == 3 and not any("mac" in r or "seq" in r for r in recs)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 2 and "no audit.hmac_key" in out.stderr


async def test_checkpoints_every_n_records_and_every_t_seconds(tmp_path: Path) -> None:
    log = AuditLog(
        [JsonlFileSink(tmp_path / "a.jsonl")],
        hmac_key=KEY.encode(),
        checkpoint_every=3,
        checkpoint_interval=0.1,
        flush_interval=0.02,
    )
    await log.start()
    for i in range(7):
        log.emit(record("access.allow", n=i))

    def checkpoints() -> int:
        path = tmp_path / "a.jsonl"
        text = path.read_text() if path.exists() else ""
        whole = text[: text.rfind("\n") + 1].splitlines()  # a batch may be half written
        return sum(json.loads(x)["event"] == CHECKPOINT for x in whole)

    # Idle past the interval: the open window gets a checkpoint (the third) by itself.
    await eventually(lambda: checkpoints() >= 3, what="the checkpoint of the open window")
    await log.close()
    events = [json.loads(x)["event"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    a = "access.allow"
    assert events == [a, a, a, CHECKPOINT, a, a, a, CHECKPOINT, a, CHECKPOINT, CHECKPOINT]


async def test_untouched_trail_verifies_clean_in_file_and_stream(
    tmp_path: Path, redis_url: str
) -> None:
    cfg = config(tmp_path, redis_url, every=4)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    with redis_sync.Redis.from_url(redis_url) as c:
        entries = c.xrange(STREAM)
    assert [e[1][b"record"].decode() for e in entries] == lines  # both sinks: the same chain
    assert KEY not in "".join(lines)

    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].endswith(": 16 records from 2 writers: clean")
    out = verify(cfg, "--redis", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["source"] == STREAM and report["clean"] and report["problems"] == []
    assert {w["writer"] for w in report["writers"]} == {log.writer for log in logs}
    for w in report["writers"]:
        assert (w["first_seq"], w["last_seq"], w["checkpoints"], w["closed"]) == (1, 8, 2, True)
    assert verify(cfg, "--file", str(tmp_path / "audit.jsonl"), "--strict").returncode == 0


async def test_an_edited_field_is_reported_as_modified(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    i = where(lines, logs[0].writer, 3)
    rec = json.loads(lines[i])
    rec["user"] = "mallory"
    lines[i] = json.dumps(rec, separators=(",", ":"))
    save(cfg, lines)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 1
    path = tmp_path / "audit.jsonl"
    assert errors(out) == [
        f"{path}:{i + 1}: error: mac mismatch: record modified "
        f"(id {rec['id']}, writer {logs[0].writer}, seq 3)"
    ]


async def test_a_deleted_line_is_reported_with_the_gap(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    w = logs[1].writer
    gone = where(lines, w, 4)
    del lines[gone]
    save(cfg, lines)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"), "--json")
    assert out.returncode == 1
    (problem,) = json.loads(out.stdout)["problems"]
    assert problem["kind"] == "deleted" and problem["writer"] == w and problem["seq"] == 5
    assert problem["location"] == f"{tmp_path / 'audit.jsonl'}:{where(lines, w, 5) + 1}"
    assert problem["message"].startswith("deleted records 4 (after ")


async def test_inserted_lines_are_caught(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    path = tmp_path / "audit.jsonl"
    i = where(lines, logs[0].writer, 2)
    forged = json.loads(lines[i])
    forged.update(id="f" * 28, user="mallory")  # chain fields copied, mac now wrong
    bare = record("access.allow", user="mallory", scope="recording:1/demo-1")
    lines[i + 1 : i + 1] = [json.dumps(forged), json.dumps(bare)]
    save(cfg, lines)
    out = verify(cfg, "--file", str(path))
    assert out.returncode == 1
    assert errors(out) == [
        f"{path}:{i + 2}: error: mac mismatch: forged record (inserted) "
        f"(id {'f' * 28}, writer {logs[0].writer}, seq 2)",
        f"{path}:{i + 3}: error: unchained record: no valid chain fields (inserted) "
        f"(id {bare['id']})",
    ]


async def test_a_forged_next_record_does_not_hide_the_real_one(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    w = logs[0].writer
    i = where(lines, w, 3)
    forged = json.loads(lines[i])
    forged.update(user="mallory", mac="0" * 64)  # claims seq 3, inserted before the real one
    lines.insert(i, json.dumps(forged))
    save(cfg, lines)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 1
    (line,) = errors(out)
    assert line.startswith(f"{tmp_path / 'audit.jsonl'}:{i + 1}: error: mac mismatch")


async def test_reordered_lines_are_caught(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    w = logs[0].writer
    a, b = where(lines, w, 2), where(lines, w, 3)
    lines[a], lines[b] = lines[b], lines[a]
    save(cfg, lines)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"), "--json")
    assert out.returncode == 1
    found = [(p["kind"], p["seq"], p["location"]) for p in json.loads(out.stdout)["problems"]]
    path = tmp_path / "audit.jsonl"
    assert found == [("deleted", 3, f"{path}:{a + 1}"), ("reordered", 2, f"{path}:{b + 1}")]


async def test_a_truncated_tail_is_caught(tmp_path: Path) -> None:
    cfg = config(tmp_path, None, every=3, interval=0.2)
    logs = await write_trail(cfg)
    lines = trail(cfg)
    path = tmp_path / "audit.jsonl"
    w = logs[0].writer
    # Cut right after writer 0's last periodic checkpoint (seq 4): the final one is gone.
    cut = where(lines, w, 4)
    assert json.loads(lines[cut])["event"] == CHECKPOINT
    save(cfg, lines[: cut + 1])
    out = verify(cfg, "--file", str(path))
    assert out.returncode == 0, out.stdout  # it might be a writer still running: a warning
    assert (
        f"{path}:{cut + 1}: warning: ends after seq 4 without a closing checkpoint "
        f"(truncated, or the writer crashed or is still running) (writer {w}, seq 4)"
    ) in out.stdout
    out = verify(cfg, "--file", str(path), "--strict")
    assert out.returncode == 1
    assert f"{path}:{cut + 1}: error: ends after seq 4 without a closing checkpoint" in out.stdout

    # Cut after a plain record: a live writer would have checkpointed within the interval,
    # so once that time (twice the 0.2 s interval) has passed since the record, it is an error.
    save(cfg, lines[: where(lines, w, 5) + 1])

    def stale() -> subprocess.CompletedProcess[str] | None:
        out = verify(cfg, "--file", str(path))
        return out if out.returncode == 1 else None

    out = await eventually(stale, what="the open tail to be older than the checkpoint interval")
    assert out.returncode == 1
    assert "error: ends after seq 5 without a closing checkpoint" in out.stdout


async def test_stream_tampering_is_located_by_entry_id(tmp_path: Path, redis_url: str) -> None:
    cfg = config(tmp_path, redis_url)
    logs = await write_trail(cfg)
    w = logs[1].writer
    with redis_sync.Redis.from_url(redis_url) as c:
        entries: list[Any] = c.xrange(STREAM)
        recs = [json.loads(e[1][b"record"]) for e in entries]
        gone = next(i for i, r in enumerate(recs) if r["writer"] == w and r["seq"] == 2)
        after = next(i for i, r in enumerate(recs) if r["writer"] == w and r["seq"] == 3)
        c.xdel(STREAM, entries[gone][0])
        forged = c.xadd(STREAM, {"record": json.dumps(record("access.allow", user="m"))})
    out = verify(cfg, "--redis", "--json")
    assert out.returncode == 1
    found = [(p["kind"], p["location"]) for p in json.loads(out.stdout)["problems"]]
    assert found == [
        ("deleted", f"{STREAM} entry {entries[after][0].decode()}"),
        ("unchained", f"{STREAM} entry {forged.decode()}"),
    ]


def test_usage_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    out = verify(cfg, "--file", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert verify(cfg, "--file", "x", "--redis").returncode == 2


async def test_a_record_signed_with_another_key_id_is_reported(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    await write_trail(cfg, n=2)
    config(tmp_path, None, key_id="k2")
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 1
    assert "signed with key id 'k1', not the configured 'k2'" in out.stdout


async def test_a_rotated_trail_verifies_across_its_files(tmp_path: Path) -> None:
    sink = JsonlFileSink(tmp_path / "audit.jsonl", rotate_bytes=2000)
    log = AuditLog([sink], hmac_key=KEY.encode(), batch_size=3, flush_interval=0.01)
    await log.start()
    for i in range(30):
        log.emit(record("access.allow", user=f"u{i}", scope="recording:1/demo-1"))
        await log.flush()
    await log.close()
    files = [str(f) for f in sink.files()]
    assert len(files) >= 4
    cfg = config(tmp_path, None)
    out = verify(cfg, "--file", *files)
    assert out.returncode == 0 and not errors(out), out.stdout
    # Only the newest file: its chain starts part-way, as after retention; not an error.
    alone = verify(cfg, "--file", files[-1])
    assert alone.returncode == 0, alone.stdout
    # A rotated file in the middle deleted: the records it held are missing.
    gap = verify(cfg, "--file", *files[:1], *files[2:])
    assert gap.returncode == 1 and any("deleted records" in x for x in errors(gap)), gap.stdout
