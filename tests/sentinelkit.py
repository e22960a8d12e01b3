"""A real Redis master, a replica and redis-sentinel processes on free ports, for HA tests.

`SentinelKit.start()` starts the master, a replica (`--replicaof`) that is in sync with it,
then the sentinels, and returns once every sentinel monitors the master, knows the replica
and the other sentinels, so a failover can happen as soon as the master goes. The timeouts
are short (`down_after` ms before the master counts as down) so a failover takes seconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from waiting import eventually_sync

MASTER_NAME = "jm"


_PACKAGES = {"redis-server": "redis-server", "redis-sentinel": "redis-sentinel"}


def binary(name: str) -> str:
    """The path of a Redis program; without it the test is skipped, except under CI, where
    it fails."""
    sbin = Path("/usr/sbin") / name
    found = shutil.which(name) or (str(sbin) if sbin.exists() else None)
    if found is None:
        package = _PACKAGES.get(name, "redis-tools")
        message = f"{name} is not installed (.ci/run installs it; Debian: {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
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
        tls: bool = False,
    ) -> None:
        self.password = password  # requirepass of the servers (and masterauth)
        self.sentinel_password = sentinel_password  # requirepass of the sentinels
        self.dir = Path(tempfile.mkdtemp(prefix="jitgate-sentinel-"))
        # TLS only, everywhere (clients, replication, sentinels), under a CA of the kit's own.
        self.ca_file = certificates(self.dir) if tls else None
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

    def _tls_client(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file else {}

    def _tls_server(self) -> list[str]:
        if self.ca_file is None:
            return []
        return [
            "tls-cert-file", str(self.dir / "server.pem"),
            "tls-key-file", str(self.dir / "server.key"),
            "tls-ca-cert-file", str(self.ca_file),
            "tls-auth-clients", "no",
            "tls-replication", "yes",
        ]  # fmt: skip

    def redis(self, name: str) -> redis_sync.Redis:
        return self._client(self.ports[name], self.password)

    def sentinel(self, i: int = 0) -> redis_sync.Redis:
        return self._client(self.sentinel_ports[i], self.sentinel_password)

    def _client(self, port: int, password: str | None) -> redis_sync.Redis:
        tls = self._tls_client()
        return redis_sync.Redis("127.0.0.1", port, password=password, socket_timeout=2, **tls)

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
        tls = self._tls_server()
        ports = ["--port", str(port)]
        if tls:
            ports = ["--port", "0", "--tls-port", str(port)]
            ports += [f"--{a}" if i % 2 == 0 else a for i, a in enumerate(tls)]
        self.procs[name] = subprocess.Popen(
            [binary("redis-server"), *ports, "--bind", "127.0.0.1",
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
        if self.ca_file is not None:
            tls = self._tls_server()
            auth += f"port 0\ntls-port {port}\n"
            auth += "".join(f"{k} {v}\n" for k, v in zip(tls[::2], tls[1::2], strict=True))
        else:
            auth += f"port {port}\n"
        conf.write_text(
            auth + "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / f'sentinel-{i}.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports[self.master]} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after}\n"
            f"sentinel failover-timeout {MASTER_NAME} 4000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.procs[f"sentinel-{i}"] = subprocess.Popen(
            [binary("redis-sentinel"), str(conf)],
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


def certificates(where: Path) -> Path:
    """Write a CA and a server certificate for 127.0.0.1 signed by it; return the CA's file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jitgate test CA")])

    def cert(name: x509.Name, public: Any, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            b = b.add_extension(x509.SubjectAlternativeName([ip]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    pem = serialization.Encoding.PEM
    (where / "ca.pem").write_bytes(cert(ca_name, ca_key.public_key(), True).public_bytes(pem))
    server = cert(server_name, key.public_key(), False)
    (where / "server.pem").write_bytes(server.public_bytes(pem))
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    (where / "server.key").write_bytes(key.private_bytes(pem, pkcs8, none))
    return where / "ca.pem"
