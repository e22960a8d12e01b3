"""API fuzzing: schemathesis against a running jitgate's own OpenAPI document.

`jitgate serve` runs as a process in front of the demo replay app, with a real
redis-server and the demo policy. schemathesis reads `/_jit/api/openapi.json` and, once
per role (an admin, an approver, a plain user, each with its own bearer token), runs its
phases (the documented examples, coverage, fuzzing, and stateful sequences that follow the
document's links from a new request to the grant's operations). A run passes with no
5xx answer and no answer outside the document: status codes, content types and bodies
must all be the documented ones.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from browserkit import demo_app, serve
from conftest import RedisServer, free_port, make_token, write_config

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,ignored_auth"
)
ROLES = {  # who fuzzes: subject and groups (config: admins are the security group)
    "admin": ("sam", ["security"]),
    "approver": ("bob", ["approvers"]),
    "user": ("alice", ["eng"]),
}
_CASES = re.compile(r"(\d+) generated")
SCOPES = ["recording:1/demo-1", "recording:1/demo-2", "project:1", "project:2", "recording:x/y"]
# Requests made before the run, so that half the generated grant ids are real ones:
# (role, body) with a recording auto-approved, a project pending, a break-glass grant.
SEED = [
    ("user", {"scope": "recording:1/demo-1", "reason": "seed", "duration": "15m"}),
    ("user", {"scope": "project:1", "reason": "seed", "ticket": "INC-1", "duration": "1h"}),
    ("admin", {"scope": "recording:1/demo-2", "reason": "seed"}),
]
CONFIG = """
[dictionaries.scopes]
values = {scopes}
[dictionaries.grants]
values = {grants}
[parameters]
"body.scope" = {{ dictionary = "scopes", probability = 0.5 }}
"path.grant_id" = {{ dictionary = "grants", probability = 0.5 }}
"""


@dataclass
class RoleRun:
    role: str
    cases: int
    passed: bool
    output: str = ""

    def failure(self) -> str:
        # schemathesis's own account: from its FAILURES section to the summary.
        text = self.output
        start = text.find("FAILURES")
        return text[start if start >= 0 else -3000 :][:6000]


@dataclass
class Report:
    runs: list[RoleRun] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(r.cases for r in self.runs)

    @property
    def failures(self) -> list[str]:
        return [f"{r.role}:\n{r.failure()}" for r in self.runs if not r.passed]

    def line(self) -> str:
        per = ", ".join(f"{r.role} {r.cases}" for r in self.runs)
        bad = [r.role for r in self.runs if not r.passed]
        return (
            f"{self.cases} generated requests ({per}), "
            f"{'failures as ' + ', '.join(bad) if bad else '0 5xx, 0 answers outside the schema'}"
        )


@contextlib.contextmanager
def running_jitgate(redis_url: str, tmp: Path) -> Iterator[str]:
    """`jitgate serve` before the demo app, with the demo policy; yield its base URL."""
    with demo_app(tmp / "demo.log") as upstream:
        cfg = write_config(
            tmp, upstream_url=upstream, redis_url=redis_url, extra="admins: {groups: [security]}"
        )
        with serve(cfg, free_port()) as base:
            yield base


def token(role: str) -> str:
    sub, groups = ROLES[role]
    return make_token(sub, groups=groups)


def seed_grants(base: str) -> list[str]:
    """Make the SEED requests through the API; return the new grants' ids."""
    ids = []
    for role, body in SEED:
        request = urllib.request.Request(
            f"{base}/_jit/api/requests",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token(role)}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            ids.append(json.load(resp)["id"])
    return ids


def write_schemathesis_config(where: Path, grants: list[str]) -> Path:
    """Known scopes and grant ids, offered half the time in place of random strings."""
    path = where / "schemathesis.toml"
    path.write_text(CONFIG.format(scopes=json.dumps(SCOPES), grants=json.dumps(grants)))
    return path


def fuzz_role(
    base: str, role: str, config: Path, *, examples: int, seed: int, max_time: int | None
) -> RoleRun:
    argv = [
        SCHEMATHESIS, "--config-file", str(config), "run", f"{base}/_jit/api/openapi.json",
        "--checks", CHECKS,
        "-H", f"Authorization: Bearer {token(role)}", "--seed", str(seed),
        "--max-examples", str(examples), "--generation-database", "none",
        "--no-color", "--workers", "1", "--request-timeout", "10",
    ]  # fmt: skip
    if max_time is not None:
        argv += ["--max-time", str(max_time)]
    # Run where its cache (.schemathesis/) goes with the config, not into the repository.
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, check=False, cwd=config.parent
    )
    found = _CASES.findall(done.stdout)
    cases = int(found[-1]) if found else 0
    return RoleRun(role, cases, done.returncode == 0 and cases > 0, done.stdout + done.stderr)


def fuzz(redis_url: str, *, examples: int, seed: int = 1, max_time: int | None = None) -> Report:
    """Fuzz the API once per role against one running jitgate."""
    report = Report()
    tmp = Path(tempfile.mkdtemp(prefix="jitgate-apifuzz-"))
    with running_jitgate(redis_url, tmp) as base:
        config = write_schemathesis_config(tmp, seed_grants(base))
        for role in ROLES:
            run = fuzz_role(base, role, config, examples=examples, seed=seed, max_time=max_time)
            report.runs.append(run)
    return report


def fuzz_with_own_redis(*, examples: int, seed: int = 1, max_time: int | None = None) -> Report:
    redis = RedisServer()
    redis.start()
    try:
        return fuzz(redis.url, examples=examples, seed=seed, max_time=max_time)
    finally:
        redis.close()
