"""npm packages the tests use, installed on demand from a package.json and its lock file.

    from npmkit import npm_ci
    modules = npm_ci(Path(__file__).parent / "a11y")   # tests/a11y/node_modules

`npm ci` runs once per directory and manifest: a stamp in node_modules holds the hash of
the manifests it was made from, and a file lock outside the tree lets parallel test runs
install once. Used by tests/idp.py (the test IdP) and tests/test_accessibility.py (axe-core).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

STAMP = ".jitgate-installed"  # in node_modules: the hash of the manifests it was made from
MANIFESTS = ("package.json", "package-lock.json")


class NpmError(RuntimeError):
    """npm is missing, or installing a directory's packages failed."""


def manifest_hash(directory: Path) -> str:
    """The hash of directory's package.json and package-lock.json (absent ones count too)."""
    digest = hashlib.sha256()
    for name in MANIFESTS:
        path = directory / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
    return digest.hexdigest()


_installed: set[Path] = set()


def npm_ci(directory: Path) -> Path:
    """Install directory's npm packages (`npm ci` from the lock file) unless they are current.

    Returns directory/node_modules. Without a lock file `npm install` runs instead.
    """
    directory = directory.resolve()
    modules = directory / "node_modules"
    if directory in _installed:
        return modules
    stamp = modules / STAMP
    # A lock outside the tree (npm ci deletes node_modules): parallel test runs install once.
    tag = hashlib.sha1(bytes(directory)).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"jitgate-npm-{directory.name}-{tag}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == manifest_hash(directory)):
            npm = shutil.which("npm")
            if npm is None:
                raise NpmError("npm is not on PATH (it comes with Node.js)")
            has_lock = (directory / "package-lock.json").exists()
            cmd = [npm, "ci"] if has_lock else [npm, "install"]
            done = subprocess.run(
                [*cmd, "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise NpmError(f"{' '.join(cmd)} in {directory} failed:\n{done.stderr[-2000:]}")
            # npm install may have written the lock file: hash what is there now.
            stamp.write_text(manifest_hash(directory))
    _installed.add(directory)
    return modules
