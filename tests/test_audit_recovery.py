"""After a crash: replay writes no record twice, the heir says where the dead chain ended,
and `jitgate audit verify` tells a crash and a duplicate from tampering."""

from __future__ import annotations

import json
from pathlib import Path

import redis as redis_sync
from redis.asyncio import Redis
from test_audit_verify import STREAM, config, errors, save, trail, verify
from waiting import eventually

from proxy import settings as settings_mod
from proxy.app import make_audit_log
from proxy.audit import RECOVERED, AuditLog, record
from proxy.metrics import Metrics


def crash(log: AuditLog) -> None:
    """Stop a log as SIGKILL would: no close, no final checkpoint; its lock goes."""
    assert log._task is not None
    log._task.cancel()
    assert log.spool is not None and log.spool._lock is not None
    log.spool._lock.close()
    log.spool._lock = None


def stream(redis_url: str) -> list[dict[str, object]]:
    with redis_sync.Redis.from_url(redis_url) as c:
        return [json.loads(e[1][b"record"]) for e in c.xrange(STREAM)]


async def test_replay_after_a_crash_writes_nothing_twice_and_verify_is_clean(
    tmp_path: Path, redis_url: str
) -> None:
    with redis_sync.Redis.from_url(redis_url) as c:
        c.delete(STREAM)
    cfg = config(tmp_path, redis_url, every=10_000, interval=600)
    s = settings_mod.load(cfg, environ={"JITGATE_STATE_DIR": str(tmp_path / "state")})
    redis = Redis.from_url(redis_url)
    dead = make_audit_log(s, redis, Metrics())
    await dead.start()
    for i in range(40):
        dead.emit(record("access.allow", user=f"u{i}", n=i))
    await dead.flush(force=True)
    assert len(trail(cfg)) == 40 and len(stream(redis_url)) == 40
    # The crash came between the sinks taking the records and their cursors being saved.
    assert dead.spool is not None
    for cursor in dead.spool.dir.glob("cursor.*"):
        cursor.write_text("25")
    for i in range(40, 45):
        dead.emit(record("access.allow", user=f"u{i}", n=i))  # spooled, never delivered
    crash(dead)

    heir = make_audit_log(s, redis, Metrics())
    await heir.start()
    await eventually(lambda: len(trail(cfg)) >= 46, what="the replay")
    await heir.close()
    await redis.aclose()

    for recs in ([json.loads(x) for x in trail(cfg)], stream(redis_url)):
        seqs = [r["seq"] for r in recs if r["writer"] == dead.writer]
        assert seqs == list(range(1, 46))  # each once, in order
        (told,) = [r for r in recs if r["event"] == RECOVERED]
        assert told["writer"] == heir.writer and told["recovered_writer"] == dead.writer
        assert told["last_seq"] == 45
    for source in (["--file", str(tmp_path / "audit.jsonl")], ["--redis"]):
        out = verify(cfg, *source)
        assert out.returncode == 0, out.stdout
        assert not errors(out) and "warning" not in out.stdout, out.stdout
        assert f"writer {dead.writer}: seq 1..45, 45 records, 0 checkpoints, " in out.stdout
        assert "crashed, recovered at seq 45" in out.stdout
        out = verify(cfg, *source, "--strict")
        assert out.returncode == 0, out.stdout  # recovered is not "still running"
    out = verify(cfg, "--json")  # no source: every sink the config names
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert [r["source"] for r in report["sources"]] == [str(tmp_path / "audit.jsonl"), STREAM]
    assert all(r["clean"] and r["records"] == 47 for r in report["sources"])


async def test_verify_without_a_source_checks_every_sink_and_names_the_unreadable(
    tmp_path: Path, redis_url: str
) -> None:
    with redis_sync.Redis.from_url(redis_url) as c:
        c.delete(STREAM)
    cfg = config(tmp_path, redis_url)
    with cfg.open("a") as fh:
        fh.write("  http: [{name: siem, url: 'http://127.0.0.1:9/ingest'}]\n")
    out = verify(cfg)
    assert out.returncode == 0, out.stderr
    assert f"{STREAM}: 0 records from 0 writers: clean" in out.stdout
    assert "http:siem: an HTTP collector cannot be read back" in out.stdout
    save(cfg, ['{"event": "access.allow"}'])
    out = verify(cfg)
    assert out.returncode == 1 and len(errors(out)) == 1
    assert f"{tmp_path / 'audit.jsonl'}: 1 records from 0 writers: 1 errors" in out.stdout
    # The stream cannot be read (the embedded Redis is not running): the file still is.
    embedded = cfg.read_text().replace(f'"{redis_url}"', "null")
    cfg.write_text(embedded)
    out = verify(cfg)
    assert out.returncode == 1 and len(errors(out)) == 1  # the file's finding comes first
    assert "jit:audit: cannot be verified: jitgate's embedded Redis is not running" in out.stdout
    save(cfg, [])
    out = verify(cfg)
    assert out.returncode == 2 and "0 records from 0 writers: clean" in out.stdout
    text = cfg.read_text().replace("  file: audit.jsonl\n", "  redis: null\n")
    cfg.write_text(text.replace("  http: [{name: siem, url: 'http://127.0.0.1:9/ingest'}]\n", ""))
    out = verify(cfg)
    assert out.returncode == 2 and "names no audit file or Redis stream" in out.stderr


async def test_records_missing_after_the_recovered_seq_are_an_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, None)
    s = settings_mod.load(cfg, environ={"JITGATE_STATE_DIR": str(tmp_path / "state")})
    dead = make_audit_log(s, None, Metrics())
    await dead.start()
    for i in range(6):
        dead.emit(record("access.allow", n=i))
    await dead.flush(force=True)
    crash(dead)
    heir = make_audit_log(s, None, Metrics())
    await heir.start()
    await heir.close()
    lines = [x for x in trail(cfg) if not (dead.writer in x and '"seq":6,' in x)]
    save(cfg, lines)
    out = verify(cfg, "--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 1
    (line,) = errors(out)
    assert "ends after seq 5, but crashed at seq 6" in line and "deleted records 6" in line


async def test_a_byte_identical_duplicate_is_a_warning_an_edited_one_an_error(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, None)
    s = settings_mod.load(cfg, environ={"JITGATE_STATE_DIR": str(tmp_path / "state")})
    log = make_audit_log(s, None, Metrics())
    await log.start()
    for i in range(5):
        log.emit(record("access.allow", user="alice", n=i))
    await log.close()
    lines = trail(cfg)
    path = tmp_path / "audit.jsonl"
    save(cfg, [*lines[:4], lines[1], lines[2], *lines[4:]])  # seq 2 and 3 delivered twice
    out = verify(cfg, "--file", str(path), "--json")
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    found = [(p["severity"], p["kind"], p["seq"], p["location"]) for p in report["problems"]]
    assert found == [
        ("warning", "duplicate", 2, f"{path}:5"),
        ("warning", "duplicate", 3, f"{path}:6"),
    ]
    assert f"duplicate of seq 2 at {path}:2 (byte-identical)" in report["problems"][0]["message"]
    assert report["writers"][0]["duplicates"] == 2

    edited = json.loads(lines[1])
    edited["user"] = "mallory"
    save(cfg, [*lines[:4], json.dumps(edited, separators=(",", ":")), *lines[4:]])
    out = verify(cfg, "--file", str(path))
    assert out.returncode == 1
    assert len(errors(out)) == 1 and "mac mismatch" in errors(out)[0]
