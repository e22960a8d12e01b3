"""What the checks share: the test helpers on the path, and the one line each prints."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The checks use the tests' own real parts (tests/pathfuzz.py, nginxkit.py, conftest.py).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


def verdict(name: str, figure: str, ok: bool, details: list[str] | None = None) -> int:
    """Print the check's one line (and what failed, below it); return the exit code."""
    print(f"{name}: {figure} {'PASS' if ok else 'FAIL'}", flush=True)
    for line in (details or [])[:20]:
        print(f"  {line}", file=sys.stderr)
    return 0 if ok else 1
