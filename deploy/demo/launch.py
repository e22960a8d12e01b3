"""Run the demo: the replay app, with jitgate in front of it, until Ctrl-C.

`make demo` runs this. It reads config/jitgate.yaml (or $JITGATE_CONFIG, with the
usual JITGATE_* overrides), starts the demo replay app on the upstream URL's port,
starts `jitgate serve` (which starts its own redis-server when no Redis URL is set),
waits until jitgate is ready and prints what to open.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Handle both explicitly: a shell that starts us in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(ROOT))
    from proxy.errors import ConfigError, ConfigErrors
    from proxy.settings import load

    config = Path(os.environ.get("JITGATE_CONFIG", ROOT / "config" / "jitgate.yaml"))
    try:
        settings = load(config)
    except (ConfigError, ConfigErrors) as exc:
        print(f"demo: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    up = settings.upstream.url
    proxy_url = f"http://{settings.listen.host}:{settings.listen.port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "deploy" / "demo" / "replay_app.py"),
                    "--host",
                    up.host or "127.0.0.1",
                    "--port",
                    str(up.port),
                ],
            )
        )
        procs.append(subprocess.Popen([str(BIN / "jitgate"), "serve", "--config", str(config)]))
        if not wait_ready(f"{proxy_url}{settings.prefix}/readyz", procs):
            print("demo: jitgate did not become ready; see the messages above", file=sys.stderr)
            return 1
        jit = os.path.relpath(BIN / "jitgate")
        print(
            f"""
  jitgate demo is running.

  Replay app (protected):  {proxy_url}/
  Replay app (direct):     {up}   <- what jitgate protects; not for users
  Metrics:                 {proxy_url}{settings.prefix}/metrics

  In a browser (README, "Quick start: the whole loop in a browser"):
  1. Two people:  {jit} token mint --sub alice --groups eng       (the engineer)
                  {jit} token mint --sub bob --groups approvers   (the approver)
  2. Open {proxy_url}/ and sign in with alice's token; open a recording:
     "Access needed", with the request forms.
  3. Request the whole project: a reason, ticket INC-42, 5m. The page waits.
  4. In a private window, open {proxy_url}{settings.prefix}/approvals, sign in with
     bob's token and approve. alice's tab goes on to the recording by itself.
  5. Watch it; the bar counts down. After 5 minutes, reload: "Access needed" again.

  From the command line:
     export TOKEN=$({jit} token mint --sub alice)
     curl -H "Authorization: Bearer $TOKEN" {proxy_url}/api/projects/1/session_recordings/demo-1/snapshots
     {jit} grants add --user alice --scope recording:1/demo-1 --ttl 5m --reason "ticket 42"
     (the same curl now answers 200 with the rrweb events; {jit} grants revoke <id> ends it)

  Press Ctrl-C to stop.
""",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
