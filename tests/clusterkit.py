"""A real Redis Cluster of three masters and three replicas on free ports, for HA tests.

`ClusterKit.start()` starts six `redis-server --cluster-enabled yes`, joins them with
`redis-cli --cluster create ... --cluster-replicas 1`, and returns once every node says the
cluster is ok and every master's replica is in sync. `node_timeout` is short (ms before a
silent master counts as failing) so a replica takes over within seconds.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import redis as redis_sync
from conftest import free_port
from redis.crc import key_slot
from sentinelkit import binary, certificates
from waiting import eventually_sync


def _low_port() -> int:
    """A free port below 55536: cluster nodes refuse higher ones."""
    while True:
        port = random.randrange(20000, 55000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class ClusterKit:
    def __init__(self, *, node_timeout: int = 1000, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="jitgate-cluster-"))
        # TLS only, everywhere (clients, the cluster bus, replication), under the kit's CA.
        self.ca_file = certificates(self.dir) if tls else None
        self.ports = [_low_port() for _ in range(6)]
        self.node_timeout = node_timeout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def node(self, port: int) -> redis_sync.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file else {}
        return redis_sync.Redis(
            "127.0.0.1", port, socket_timeout=2, socket_connect_timeout=1, **tls
        )

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def owner(self, key: str) -> tuple[int, list[int]]:
        """The port of the master of `key`'s slot, and its replicas', as a live node says."""
        slot = key_slot(key.encode())
        with self.node(self.alive()[0]) as c:
            for start, end, master, *replicas in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1]), [int(r[1]) for r in replicas]
        raise AssertionError(f"slot {slot} is not served")

    def replica_of(self, master: int) -> int:
        """The port of a live replica of the master on `master`."""
        for port in self.alive():
            with self.node(port) as c:
                info = c.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master:
                return port
        raise AssertionError(f"no replica of {master}")

    def settle(self) -> None:
        """Wait until every node says the cluster is ok and every master has a replica."""
        eventually_sync(self._settled, within=30, interval=0.1, what="the cluster to be ok")

    def start(self) -> ClusterKit:
        tls: list[str] = []
        if self.ca_file is not None:
            tls = ["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "no",
                   "--tls-cert-file", str(self.dir / "server.pem"),
                   "--tls-key-file", str(self.dir / "server.key"),
                   "--tls-ca-cert-file", str(self.ca_file)]  # fmt: skip
        for port in self.ports:
            ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
            self.procs[port] = subprocess.Popen(
                [binary("redis-server"), *ports, *tls, "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-port", str(free_port()),
                 "--cluster-node-timeout", str(self.node_timeout),
                 "--cluster-replica-validity-factor", "0",
                 "--logfile", str(self.dir / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            eventually_sync(lambda p=port: self._ping(p), within=30, what=f"node {port}")
        subprocess.run(
            [binary("redis-cli"), *(["--tls", "--cacert", str(self.ca_file)] if tls else []),
             "--cluster", "create", *self.addresses,
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.settle()
        return self

    def _ping(self, port: int) -> bool:
        try:
            with self.node(port) as c:
                return bool(c.ping())
        except redis_sync.ConnectionError:
            return False

    def _settled(self) -> bool:
        for port in self.alive():
            with self.node(port) as c:
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "master" and int(info["connected_slaves"]) < 1:
                    return False
                if info["role"] == "slave" and info["master_link_status"] != "up":
                    return False
        return True

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for log in sorted(self.dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-10:]
            out.append(f"== {log.name}\n" + "\n".join(lines))
        return "\n".join(out)
