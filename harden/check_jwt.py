"""The JWT attack table against a running jitgate; see tests/jwtattack.py."""

from __future__ import annotations

import argparse
import asyncio
import sys

from kit import verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", type=int, default=500, help="made-up kids sent at once")
    args = parser.parse_args()
    from jwtattack import run_with_own_redis

    report = asyncio.run(run_with_own_redis(burst=args.burst))
    return verdict("jwt", report.line(), not report.failures, report.failures)


if __name__ == "__main__":
    sys.exit(main())
