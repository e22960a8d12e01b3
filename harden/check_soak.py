"""A three-minute soak for `make harden` (harden/soak.py; `make soak` runs thirty)."""

from __future__ import annotations

import sys

import soak  # harden/ is the script's directory

if __name__ == "__main__":
    sys.exit(soak.main(["--minutes", "3", "--reload", "30"]))
