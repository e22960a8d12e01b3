"""schemathesis against a running jitgate's API as three roles; see tests/apifuzz.py."""

from __future__ import annotations

import argparse
import sys

from kit import verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=100, help="per operation and role")
    parser.add_argument("--max-time", type=int, default=60, help="seconds per role")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from apifuzz import fuzz_with_own_redis

    report = fuzz_with_own_redis(examples=args.examples, seed=args.seed, max_time=args.max_time)
    return verdict("api", report.line(), not report.failures, report.failures)


if __name__ == "__main__":
    sys.exit(main())
