"""A real nginx for the tests, running a shipped config with only its addresses changed.

`authz_conf` reads deploy/nginx/jitgate-authz.conf and changes exactly the three lines
marked CHANGE (the replay tool, jitgate, the listen port); `Nginx` runs it in a temp dir
(one process, no daemon, its own pid, logs and temp paths) on the free port given.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AUTHZ_CONF = ROOT / "deploy" / "nginx" / "jitgate-authz.conf"


def binary() -> str:
    """nginx's path; without one the test is skipped, except under CI, where it fails."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        message = "nginx is not installed (Debian: apt-get install nginx-light; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _replace_once(text: str, pattern: str, new: str) -> str:
    out, n = re.subn(pattern, new, text, flags=re.M)
    assert n == 1, f"{AUTHZ_CONF.name}: expected one line matching {pattern!r}, found {n}"
    return out


def authz_conf(*, listen: int, jitgate: int, replay_tool: int, host: str = "127.0.0.1") -> str:
    """The shipped forward-auth config with its three CHANGE lines pointed at the tests'."""
    text = AUTHZ_CONF.read_text()
    text = _replace_once(
        text,
        r"^(\s*)server \S+;(\s*# CHANGE: the replay tool)",
        rf"\1server {host}:{replay_tool};\2",
    )
    text = _replace_once(
        text, r"^(\s*)server \S+;(\s*# CHANGE: jitgate)", rf"\1server {host}:{jitgate};\2"
    )
    return _replace_once(text, r"^(\s*)listen \S+;(\s*# CHANGE)", rf"\1listen {host}:{listen};\2")


MAIN = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/site.conf;
}}
"""


class Nginx:
    """One nginx process serving `site` (a config for the http block) on `port`."""

    def __init__(self, site: str, port: int) -> None:
        self.binary = binary()
        self.dir = Path(tempfile.mkdtemp(prefix="jitgate-nginx-"))
        self.port = port
        (self.dir / "site.conf").write_text(site)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(MAIN.format(dir=self.dir))
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        """`nginx -t`: the config parses (raises with nginx's own message if not)."""
        out = subprocess.run(
            [self.binary, "-t", *self._where()],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr

    def start(self) -> None:
        self.check()
        self.proc = subprocess.Popen(
            [self.binary, *self._where()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{self.error_log()}") from None
                time.sleep(0.02)

    def _where(self) -> list[str]:
        # -e: the start-up error log too, so that nginx writes nothing outside the temp dir.
        return ["-p", str(self.dir), "-c", str(self.conf), "-e", str(self.dir / "error.log")]

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
