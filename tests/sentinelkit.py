"""A real Redis master, a replica and redis-sentinel processes on free ports, for HA tests.

`SentinelKit.start()` starts the master, a replica (`--replicaof`) that is in sync with it,
then the sentinels, and returns once every sentinel monitors the master, knows the replica
and the other sentinels, so a failover can happen as soon as the master goes. The timeouts
are short (`down_after` ms before the master counts as down) so a failover takes seconds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis as redis_sync
from conftest import free_port
from waiting import eventually_sync

MASTER_NAME = "jm"


def _binary(name: str) -> str:
    sbin = Path("/usr/sbin") / name
    found = shutil.which(name) or (str(sbin) if sbin.exists() else None)
    assert found, f"{name} is required for the Redis HA tests (.ci/run installs it)"
    return found


class SentinelKit:
    """A master, one replica and `sentinels` sentinels watching them, in one temp dir."""

    def __init__(
        self,
        *,
        sentinels: int = 3,
        quorum: int = 2,
        down_after: int = 1000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.password = password  # requirepass of the servers (and masterauth)
        self.sentinel_password = sentinel_password  # requirepass of the sentinels
        self.dir = Path(tempfile.mkdtemp(prefix="jitgate-sentinel-"))
        self.ports = {"a": free_port(), "b": free_port()}  # redis servers by name
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.quorum = quorum
        self.down_after = down_after
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.master = "a"  # the name of the server started as master

    # -- addresses -----------------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def redis(self, name: str) -> redis_sync.Redis:
        port = self.ports[name]
        return redis_sync.Redis(port=port, password=self.password, socket_timeout=2)

    def sentinel(self, i: int = 0) -> redis_sync.Redis:
        port = self.sentinel_ports[i]
        return redis_sync.Redis(port=port, password=self.sentinel_password, socket_timeout=2)

    def master_port(self) -> int | None:
        """The master's port as the first sentinel names it."""
        with self.sentinel() as s:
            found = s.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(found[1]) if found else None

    # -- processes -----------------------------------------------------------------------

    def _server(self, name: str, *extra: str) -> None:
        port = self.ports[name]
        log = self.dir / f"redis-{name}.log"
        if self.password:
            extra = (*extra, "--requirepass", self.password, "--masterauth", self.password)
        self.procs[name] = subprocess.Popen(
            [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--dbfilename", f"dump-{name}.rdb", "--logfile", str(log),
             "--notify-keyspace-events", "Ex", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def up() -> bool:
            try:
                with self.redis(name) as c:
                    return bool(c.ping())
            except redis_sync.ConnectionError:
                assert self.procs[name].poll() is None, f"redis-server {name} exited"
                return False

        eventually_sync(up, within=10, what=f"redis-server {name} to answer")

    def _sentinel_process(self, i: int, port: int) -> None:
        conf = self.dir / f"sentinel-{i}.conf"
        auth = ""
        if self.password:
            auth += f"sentinel auth-pass {MASTER_NAME} {self.password}\n"
        if self.sentinel_password:  # the sentinels' own, which they use with each other too
            auth += f"requirepass {self.sentinel_password}\n"
            auth += f"sentinel sentinel-pass {self.sentinel_password}\n"
        conf.write_text(
            auth + f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / f'sentinel-{i}.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports[self.master]} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after}\n"
            f"sentinel failover-timeout {MASTER_NAME} 4000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.procs[f"sentinel-{i}"] = subprocess.Popen(
            [_binary("redis-sentinel"), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _replication(self, name: str) -> dict[str, object]:
        with self.redis(name) as c:
            return dict(c.info("replication"))

    def start(self) -> SentinelKit:
        self._server("a")
        self._server("b", "--replicaof", "127.0.0.1", str(self.ports["a"]))
        eventually_sync(
            lambda: self._replication("b").get("master_link_status") == "up",
            within=15,
            what="the replica to sync with the master",
        )
        for i, port in enumerate(self.sentinel_ports):
            self._sentinel_process(i, port)
        others = len(self.sentinel_ports) - 1

        def ready() -> bool:
            for i in range(len(self.sentinel_ports)):
                try:
                    with self.sentinel(i) as s:
                        state = s.sentinel_master(MASTER_NAME)
                        replicas = s.sentinel_slaves(MASTER_NAME)
                except redis_sync.RedisError:
                    return False
                if int(state["num-other-sentinels"]) < others or not replicas:
                    return False
                # Linked and answering: a replica the sentinels could promote now.
                linked = (
                    r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas
                )
                if not all(linked):
                    return False
            return True

        eventually_sync(ready, within=20, interval=0.1, what="the sentinels to know each other")
        return self

    def kill(self, name: str) -> None:
        """SIGKILL a process (a server by name, or "sentinel-N"): it answers nothing more."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        """The tail of every log, for a failing test's message."""
        out = []
        for log in sorted(self.dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"== {log.name}\n" + "\n".join(lines))
        return "\n".join(out)
