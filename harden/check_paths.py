"""Differential path fuzzing: ≥ 10,000 generated targets, jitgate against four routers.

See tests/pathfuzz.py for the targets, the routers and the invariant.
"""

from __future__ import annotations

import argparse
import sys

from kit import verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=10_000)
    args = parser.parse_args()
    from pathfuzz import fuzz

    report = fuzz(args.examples)
    ok = report.targets >= args.examples and not report.violations
    return verdict("paths", report.line(), ok, report.violations)


if __name__ == "__main__":
    sys.exit(main())
