"""Run every harden/check_*.py (sorted), print each one's line and a summary.

Each check runs as its own process with this interpreter (the project's venv) and a hard
time limit. The table of the run is written into docs/security.md, between the
`harden:begin` and `harden:end` markers; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "security.md"
BEGIN, END = "<!-- harden:begin -->", "<!-- harden:end -->"
LINE = re.compile(r"^(?P<name>[\w-]+): (?P<figure>.*) (?P<result>PASS|FAIL)$")


@dataclass
class Outcome:
    script: str
    name: str
    figure: str
    passed: bool
    seconds: float


def run_check(script: Path, timeout: float) -> Outcome:
    """Run one check; a crash, a time-out or a missing line counts as a failure."""
    started = time.monotonic()
    name = script.stem.removeprefix("check_")
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        seconds = time.monotonic() - started
        return Outcome(script.name, name, f"no answer within {timeout:g} s", False, seconds)
    seconds = time.monotonic() - started
    found = [m for m in map(LINE.match, done.stdout.splitlines()) if m is not None]
    if not found:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        figure = f"exit {done.returncode}, no result line: {tail[:200]}"
        return Outcome(script.name, name, figure, False, seconds)
    m = found[-1]
    if m["result"] == "FAIL" or done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
    passed = m["result"] == "PASS" and done.returncode == 0
    return Outcome(script.name, m["name"], m["figure"], passed, seconds)


def table(outcomes: list[Outcome], total: float, load: float) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        f"Last run: {when}, {os.cpu_count()} CPUs (load average {load:.1f} at the start), "
        f"{total:.0f} s in all "
        f"({sum(o.passed for o in outcomes)} of {len(outcomes)} passed).",
        "",
        "| check | figure | result | time |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        figure = o.figure.replace("|", "\\|")
        rows.append(
            f"| `{o.name}` | {figure} | {'PASS' if o.passed else 'FAIL'} | {o.seconds:.0f} s |"
        )
    return "\n".join(rows)


def write_table(doc: Path, text: str) -> None:
    """Replace what is between the markers in `doc` with `text`."""
    content = doc.read_text()
    start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
    doc.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="run only these checks (names or files)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per check")
    parser.add_argument("--no-write", action="store_true", help="leave docs/security.md alone")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("check_*.py"))
    if args.only:
        wanted = {w.removeprefix("check_").removesuffix(".py") for w in args.only}
        scripts = [s for s in scripts if s.stem.removeprefix("check_") in wanted]
        if not scripts:
            print(f"no such check: {', '.join(args.only)}", file=sys.stderr)
            return 2
    started, load = time.monotonic(), os.getloadavg()[0]  # other work slows the checks
    outcomes = []
    for script in scripts:
        outcome = run_check(script, args.timeout)
        outcomes.append(outcome)
        print(
            f"{outcome.name}: {outcome.figure} {'PASS' if outcome.passed else 'FAIL'}"
            f"  ({outcome.seconds:.0f} s)",
            flush=True,
        )
    total = time.monotonic() - started
    failed = [o.name for o in outcomes if not o.passed]
    print(
        f"harden: {len(outcomes) - len(failed)} of {len(outcomes)} checks passed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    if not args.no_write and not args.only:
        write_table(DOC, table(outcomes, total, load))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
