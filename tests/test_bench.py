"""`make bench`'s script runs end to end: every target answers, nothing is timed or judged.

It runs with the aiohttp upstream and the Python load generator, so it needs neither nginx
nor wrk; the figures it prints are not looked at, only that each target served 200s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(180)
def test_bench_runs_every_target() -> None:
    argv = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--duration", "1", "--warmup", "0",
        "--connections", "4", "--loadgen", "python", "--upstream", "aiohttp", "--latency", "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["upstream"] == "bench/upstream.py (aiohttp)"
    assert set(report["results"]) == {"a", "b", "c", "d"}
    for key, result in report["results"].items():
        assert result["requests"] > 0 and result["errors"] == 0, (key, result)
    assert set(report["ratios"]) >= {"c/b", "c/d"}
    # Every request jitgate served left its decision in the file and the stream.
    audit = report["audit"]
    assert audit["allow_records_in_file"] >= audit["requests_sent"] > 0
    assert audit["stream_length"] >= audit["requests_sent"]
    # The grant checks went through the local view, most answered from memory.
    checks = report["grant_checks"]
    assert checks["view"] > checks["redis"] > 0
    # The open-loop runs reached both targets at the same rate.
    latency = report["latency"]
    for key in ("a", "c"):
        assert latency[key]["rps"] > 0 and latency[key]["errors"] == 0, (key, latency)
    assert latency["added_p99_ms"] is not None


@pytest.mark.timeout(180)
def test_kept_bench_runs() -> None:
    """bench/kept.py end to end on small figures: a body each way, revocations, cuts."""
    argv = [
        sys.executable, str(ROOT / "bench" / "kept.py"), "--bytes", "8MiB", "--revocations",
        "5", "--cuts", "2", "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["body"]["bytes"] == 8 << 20
    for way in ("download", "upload"):
        assert report["body"][way]["rss_growth_mib"] >= 0
    assert report["revocation"]["rounds"] == 5
    assert report["revocation"]["from_revoke_sent_ms"]["max"] > 0
    assert report["live_cut"]["rounds"] == 2


@pytest.mark.timeout(120)
def test_authz_bench_runs() -> None:
    """bench/authz.py end to end: every decision a 200, each with its audit record."""
    argv = [
        sys.executable, str(ROOT / "bench" / "authz.py"), "--duration", "1", "--warmup", "0",
        "--connections", "4", "--loadgen", "python", "--upstream", "aiohttp", "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["decisions"] > 0 and report["errors"] == 0
    assert report["decisions_per_s"] > 0 and report["target"] == 10_000
    audit = report["audit"]
    # Every decision asked (the load generator's and the check before it) left a record.
    assert audit["records_in_file"]["access.allow"] >= audit["decisions_sent"] > 0
    assert audit["records_in_file"]["access.deny"] == 0
    assert audit["stream_length"] >= audit["decisions_sent"]
    assert sum(report["grant_checks"].values()) >= audit["decisions_sent"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("script", "count", "ways"),
    [
        ("grantcheck.py", "--checks", {"direct", "pipelined", "view"}),
        ("client.py", "--requests", {"session", "pool"}),
    ],
)
def test_side_by_side_benches_run(script: str, count: str, ways: set[str]) -> None:
    """bench/grantcheck.py and bench/client.py end to end on few calls: a row each way."""
    argv = [sys.executable, str(ROOT / "bench" / script), count, "320", "--rounds", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0] for line in out.stdout.splitlines()[2 : 2 + len(ways)]}
    assert rows == ways, out.stdout


@pytest.mark.timeout(180)
def test_workers_bench_runs() -> None:
    """bench/workers.py end to end on short runs: one worker and two each served 200s."""
    argv = [
        sys.executable, str(ROOT / "bench" / "workers.py"), "--duration", "1", "--warmup", "0",
        "--rounds", "1", "--connections", "4", "--loadgen", "python", "--upstream", "aiohttp",
        "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["results"]) == {"1", "2"}
    for key, result in report["results"].items():
        assert result["requests"] > 0 and result["errors"] == 0, (key, result)
    assert report["ratio"] is not None


@pytest.mark.timeout(120)
def test_subjects_bench_runs() -> None:
    """bench/subjects.py on a small trail: each lookup finds every record of its subject."""
    argv = [
        sys.executable, str(ROOT / "bench" / "subjects.py"), "--records", "5000", "--runs", "1",
        "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["records"] == 5000 and report["subjects"] > 1
    for name in ("typical", "busiest"):
        lookup = report["lookups"][name]
        assert lookup["records"] == lookup["expected"] > 0 and lookup["views"] >= 1, lookup
