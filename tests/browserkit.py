"""What the real-browser tests share: Chromium, and jitgate as a process in front of a page.

Playwright's sync API drives Debian's chromium (/usr/bin/chromium; Playwright's own browser
downloads are never used), so jitgate runs as a `jitgate serve` process, as in production,
and shares nothing with pytest's event loop. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
JITGATE = str(Path(sys.executable).parent / "jitgate")


def need_browser() -> Any:
    """Return playwright's sync_playwright; skip (fail under CI) when it cannot run."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (Debian/Ubuntu: apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    ARTIFACTS.mkdir(exist_ok=True)
    return sync_playwright


@contextmanager
def upstream(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve handler on a free port in a thread; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve(cfg: Path, port: int) -> Iterator[str]:
    """Run `jitgate serve` with cfg on port until it is ready; yield its base URL."""
    cfg.write_text(cfg.read_text().replace("port: 0", f"port: {port}"))
    base = f"http://127.0.0.1:{port}"
    log_path = cfg.parent / "jitgate.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [JITGATE, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 20
            while not ready(base):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "jitgate did not become ready"
                time.sleep(0.1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/_jit/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:  # URLError is an OSError
        return False
