"""What the real-browser tests share: Chromium, the demo replay app, and jitgate in front.

Playwright's sync API drives Debian's chromium (/usr/bin/chromium; Playwright's own browser
downloads are never used), so jitgate runs as a `jitgate serve` process, as in production,
and shares nothing with pytest's event loop. So does the demo replay app
(deploy/demo/replay_app.py), the upstream the browser tests put jitgate in front of.
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import os
import re
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
from conftest import ROOT, free_port

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
JITGATE = str(Path(sys.executable).parent / "jitgate")
DEMO_APP = ROOT / "deploy" / "demo" / "replay_app.py"


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


def launch(pw: Any) -> Any:
    """Start headless Debian Chromium with a playwright instance from need_browser()."""
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)


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
def demo_app(log_path: Path, tries: int = 3) -> Iterator[str]:
    """Run the demo replay app on a free port until /healthz answers; yield its base URL.

    It runs as `make demo` runs it (`python deploy/demo/replay_app.py --host --port`), its
    output in log_path. A port taken between free_port() and the app's bind makes the app
    exit: it is then started again on another port, up to `tries` times.
    """
    for _ in range(tries):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(DEMO_APP), "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 20
                while proc.poll() is None and not answers(f"{base}/healthz"):
                    assert time.monotonic() < deadline, f"no /healthz:\n{log_path.read_text()}"
                    time.sleep(0.05)
                if proc.poll() is None:
                    yield base
                    return
            finally:
                stop(proc)
    raise AssertionError(f"the demo replay app did not start:\n{log_path.read_text()}")


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
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process started here, and kill it if it does not stop in time."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def playing(page: Any, recording: str = "demo-1") -> None:
    """Wait until the demo's player page has fetched the recording's events and plays them."""
    assert page.inner_text("h1") == f"Recording {recording}"
    page.wait_for_selector("#status.ok", timeout=15_000)  # replay.js: the events loaded
    status = page.inner_text("#status")
    assert re.match(r"\d+ events · ", status), status
    assert page.locator("#player .rr-player").count() == 1


def ready(base: str) -> bool:
    return answers(f"{base}/_jit/readyz")


def answers(url: str) -> bool:
    """True once url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:  # URLError is an OSError
        return False
