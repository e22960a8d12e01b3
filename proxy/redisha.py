"""Redis high availability: the clients connect_redis builds for Sentinel and for a cluster,
and what the grant store needs on top of them.

- `SentinelRedis`: redis-py's client of the master Sentinel names, which also closes the
  sentinel clients.
- `SlotPool`: connections to the master of the one hash slot that every jitgate key is in
  (the key prefix carries a hash tag), found by asking the cluster's nodes.
- `master_moved`: whether a subscription's server is still the master (the event feed ends
  when it is not, since what was announced on the new master meanwhile was missed).
- `durable_script`: a script followed by WAIT, so a change reaches the replicas before it
  is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("jitgate.redis")
ASK_EVERY = 1.0  # how often a subscription asks whether its server is still the master


class SentinelRedis(Redis):
    """A client of the master that Sentinel names; closing it closes the sentinel clients too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


class SlotConnection(Connection):
    """A connection to the node that is the master of its pool's hash slot when it connects."""

    def __init__(self, **kwargs: Any) -> None:
        self.slot_pool: SlotPool = kwargs.pop("slot_pool")
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        # Every new socket, also when redis-py reconnects a connection by itself.
        self.host, self.port = await self.slot_pool.owner()
        await super()._connect()  # type: ignore[no-untyped-call]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except (MovedError, ClusterDownError, TryAgainError) as exc:
            # The slot moved (a failover) or the cluster is in doubt: connect anew, to the
            # master the cluster names then.
            await self.disconnect()
            raise RedisConnectionError(f"the cluster's slot moved: {exc}") from exc


class SlotSSLConnection(SlotConnection, SSLConnection):
    pass


class SlotPool(ConnectionPool):
    """Connections to the master of the one hash slot that every jitgate key is in.

    jitgate's keys share a hash tag (in redis.key_prefix), so one node serves them all: the
    scripts run there, and the event feed subscribes there, which keeps its ping behind
    every announcement. The master is asked of the cluster's nodes (CLUSTER SLOTS) for
    every new connection, as the sentinels are asked through Sentinel.
    """

    def __init__(
        self, nodes: Iterable[tuple[str, int]], key: str, asking: dict[str, Any], **kw: Any
    ) -> None:
        kw["connection_class"] = SlotSSLConnection if kw.pop("ssl", False) else SlotConnection
        super().__init__(**kw)
        self.connection_kwargs["slot_pool"] = self
        self.nodes = list(nodes)
        self.slot = key_slot(key.encode())
        self.asking = asking
        self.master: tuple[str, int] | None = None
        self._nodes: dict[tuple[str, int], Redis] = {}  # clients to ask, kept open

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the whole pool closes: so do the clients it asks with
            nodes, self._nodes = list(self._nodes.values()), {}
            for node in nodes:
                await node.aclose()

    async def owner(self) -> tuple[str, int]:
        """Return the address of the slot's master: as the first node that answers says,
        and as that master confirms (a node that has not heard of a failover yet names the
        old master, which knows better)."""
        problems = []
        for host, port in list(self.nodes):
            try:
                named = await self._ask(host, port)
                if named is not None and named != (host, port):
                    named = await self._ask(*named)
            except RedisError as exc:
                problems.append(f"{host}:{port}: {exc}")
                continue
            if named is None:
                problems.append(f"{host}:{port}: slot {self.slot} is not served")
                continue
            self.nodes.remove((host, port))  # asked first from now on
            self.nodes.insert(0, (host, port))
            if named != self.master:
                self.master = named
                await self.disconnect(inuse_connections=False)
            return named
        raise RedisConnectionError(
            f"no cluster node names the master of slot {self.slot}: {'; '.join(problems)}"
        )

    async def _ask(self, host: str, port: int) -> tuple[str, int] | None:
        """Return the slot's master as the node at host:port sees it (None: not served)."""
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[host, port] = Redis(host=host, port=port, **self.asking)
        ranges = await node.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        named = None
        for start, end, *servers in ranges:
            for server in servers:  # learn every node, in case the ones given go
                if (address := (server[0].decode() or host, int(server[1]))) not in self.nodes:
                    self.nodes.append(address)
            if int(start) <= self.slot <= int(end):
                named = (servers[0][0].decode() or host, int(servers[0][1]))
        return named


Script = Callable[..., Awaitable[Any]]


def durable_script(
    redis: Redis, text: str, replicas: int, within: float, *, what: str = "a grant change"
) -> Script:
    """Register a script whose every run, when `replicas` > 0, is followed on its connection
    by WAIT: it returns once that many replicas have the change, or after `within` seconds
    (logged: the change then stands on the master alone, and a failover may lose it)."""
    script = redis.register_script(text)
    if replicas <= 0:
        return script

    async def run(keys: list[Any], args: list[Any]) -> Any:
        pipe = redis.pipeline(transaction=False)
        await script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", replicas, max(1, round(within * 1000)))
        reply, acknowledged = await pipe.execute()
        if int(acknowledged) < replicas:
            log.warning(
                "%s reached %s of %d replica(s) within %gs: until it replicates, "
                "a failover would lose it",
                what,
                acknowledged,
                replicas,
                within,
            )
        return reply

    return run


async def master_moved(pubsub: PubSub) -> bool:
    """Whether the sentinels (or the cluster) now name a master other than the one `pubsub`
    is connected to.

    False for a client of one server. Raises (a ConnectionError) while they name no master,
    during a failover: the subscription's server is in doubt then too.
    """
    pool, conn = pubsub.connection_pool, pubsub.connection
    if not isinstance(conn, Connection):
        return False
    if isinstance(pool, SentinelConnectionPool):
        return bool(await pool.get_master_address() != (conn.host, conn.port))
    if isinstance(pool, SlotPool):
        return await pool.owner() != (conn.host, conn.port)
    return False
