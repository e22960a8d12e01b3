"""harden/run.py, the `make harden` runner: each check's line, failures, time-outs, the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("harden_run", ROOT / "harden" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _runner()


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"check_{name}.py"
    path.write_text(f"import sys, time\n{body}\n")
    return path


@pytest.mark.parametrize(
    ("body", "passed", "figure"),
    [
        ("print('good: 3 of 3 fine PASS')", True, "3 of 3 fine"),
        ("print('bad: 1 of 3 fine FAIL'); sys.exit(1)", False, "1 of 3 fine"),
        # A PASS line with a non-zero exit is a failure, and so is a crash without a line.
        ("print('odd: 3 of 3 fine PASS'); sys.exit(3)", False, "3 of 3 fine"),
        ("raise SystemExit('it broke')", False, "exit 1, no result line: it broke"),
        ("time.sleep(30)", False, "no answer within 1 s"),
    ],
)
def test_run_check(tmp_path: Path, body: str, passed: bool, figure: str) -> None:
    outcome = run.run_check(script(tmp_path, "x", body), timeout=1)
    assert (outcome.passed, outcome.figure) == (passed, figure)


def test_the_table_goes_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "security.md"
    doc.write_text(f"# Title\n\n{run.BEGIN}\nold table\n{run.END}\n\nafter\n")
    outcomes = [run.Outcome("check_a.py", "a", "x | y", True, 1.2)]
    run.write_table(doc, run.table(outcomes, 3.0, 0.5))
    text = doc.read_text()
    assert "old table" not in text and text.endswith(f"{run.END}\n\nafter\n")
    assert "| `a` | x \\| y | PASS | 1 s |" in text
    assert "(load average 0.5 at the start)" in text and "(1 of 1 passed)" in text


def test_every_check_is_a_script_named_for_its_line() -> None:
    checks = sorted((ROOT / "harden").glob("check_*.py"))
    assert {"check_paths.py", "check_api.py", "check_jwt.py"} <= {c.name for c in checks}
    for check in checks:
        assert 'if __name__ == "__main__":' in check.read_text(), check.name
