"""The bus: one node's whole connection to the cluster's Redis, and the parts that use it.

``Bus`` is an async context manager: entering reaches Redis (with backoff, up to
``connect_timeout_seconds``) and starts the node's tasks: the feed (its one subscription), the
part batcher's timer, the leases' renewals (every lease the node holds, together) and the
heartbeat (presence, quota slots, and the health check). Leaving flushes the batched parts, says
the node is leaving and closes the connections. While inside, losing Redis sets ``health`` to
``unavailable``; every part reconnects by itself and the health is ``ok`` again once Redis answers.
Nothing else in the runtime imports ``redis``.

The parts, each with its guarantees in its own module: ``log`` (translog: appends with tseqs
allocated in Redis), ``feed`` (deliveries in tseq order, each once), ``batcher`` (streamed parts
coalesced, never reordered), ``replay`` (sessions' windows), ``dedup`` (inbound envelope ids),
``leases`` (one holder at a time), ``quotas`` (per-user slots and rates), ``nodes`` (presence).
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

import anyio

from haip_runtime.cluster.batcher import PartBatcher
from haip_runtime.cluster.dedup import InboundDedup
from haip_runtime.cluster.dialing import COMMAND_SOCKET_TIMEOUT, CONNECT_TIMEOUT, command_client, reach
from haip_runtime.cluster.feed import Feed
from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.leases import Leases
from haip_runtime.cluster.pipe import Pipe
from haip_runtime.cluster.presence import Presence
from haip_runtime.cluster.quotas import Quotas
from haip_runtime.cluster.replay import ReplayStreams
from haip_runtime.cluster.translog import TransactionLog
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.exceptions import ClusterError

logger = logging.getLogger("haip_runtime.cluster")


def make_node_id() -> str:
    """A node name unique enough among a cluster's nodes: the host name and a random part."""
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"


class Bus:
    """This node's parts of the cluster, over one command connection pool, one pipelined connection for
    appends and one subscriber connection."""

    def __init__(self, config: ClusterConfig, agents: Sequence[str] = ()):
        self.config = config
        self.node_id = config.node_id or make_node_id()
        self.health = BusHealth()
        self.keys = Keyspace(config.key_prefix, config.database)
        self.redis = command_client(config.redis_url)
        #: The hot path (appends): one pipelined connection, see ``pipe``.
        self.pipe = Pipe(config.redis_url, timeout=COMMAND_SOCKET_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
        self.log = TransactionLog(
            self.redis,
            self.pipe,
            self.keys,
            self.health,
            node=self.node_id,
            max_events=config.log_max_events,
            idle_seconds=config.log_idle_seconds,
            max_bytes=config.log_max_bytes,
        )
        self.feed = Feed(config.redis_url, self.redis, self.log, self.keys, self.health, self.node_id)
        self.batcher = PartBatcher(self.log, batch_ms=config.part_batch_ms, batch_bytes=config.part_batch_bytes)
        self.replay = ReplayStreams(
            self.redis,
            self.pipe,
            self.keys,
            self.health,
            max_events=config.replay_max_events,
            max_age_seconds=config.replay_max_age_seconds,
            max_bytes=config.replay_max_bytes,
            node=self.node_id,
        )
        self.dedup = InboundDedup(self.redis, self.keys, self.health, ttl_seconds=config.dedup_seconds)
        self.leases = Leases(
            self.redis, self.pipe, self.keys, self.health, node=self.node_id, ttl_seconds=config.lease_seconds
        )
        self.feed.on_lost = self.leases.doubt  # a Redis restarted without its data lost every lease
        self.quotas = Quotas(self.redis, self.pipe, self.keys, self.health, slot_ttl_seconds=config.slot_ttl_seconds)
        self.nodes = Presence(
            self.redis, self.keys, self.health, node=self.node_id, ttl_seconds=config.node_ttl_seconds, agents=agents
        )
        self._stack = AsyncExitStack()
        #: The heartbeat's scope, and set once it has stopped: a node leaving stops beating first (a beat
        #: after the leave wrote the node and its agents back, for another node to read as live).
        self._beating = anyio.CancelScope()
        self._beat_stopped = anyio.Event()

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._close_clients)
            await reach(self.redis, self.health, self.config.connect_timeout_seconds)
            await self.nodes.beat()
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            with anyio.fail_after(self.config.connect_timeout_seconds):
                await tg.start(self.feed.run)
            await tg.start(self.batcher.run)
            await tg.start(self.leases.run)
            tg.start_soon(self._heartbeat)
            self._stack = stack.pop_all()
        logger.info("cluster: node %s joined through %s", self.node_id, self.config.masked_url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.move_on_after(2, shield=True):
            try:
                await self.batcher.flush_all()
                self._beating.cancel()
                await self._beat_stopped.wait()
                await self.nodes.leave()
            except ClusterError as error:
                logger.warning("cluster: leaving without telling redis: %s", error)
        await self._stack.aclose()

    async def tell(self, node: str, notice: bytes) -> bool:
        """Send ``notice`` to ``node`` (its feed's ``on_notice``); ``False`` if no such node listens now
        (it died, or left): Redis tells how many subscribers a message reached."""
        with translating(self.health, f"tell node {node}"):
            return int(await self.redis.publish(self.keys.node_channel(node), notice)) > 0

    async def _heartbeat(self) -> None:
        """Beat (presence, quota slots) every ``heartbeat_seconds``; while Redis is away, retry sooner."""
        retry = 0.05
        try:
            with self._beating:
                while True:
                    try:
                        await self.nodes.beat()
                        await self.quotas.refresh()
                    except ClusterError:
                        await anyio.sleep(min(retry, self.config.heartbeat_seconds))
                        retry = min(retry * 2, 1.0)
                        continue
                    retry = 0.05
                    await anyio.sleep(self.config.heartbeat_seconds)
        finally:
            self._beat_stopped.set()

    async def _close_clients(self) -> None:
        with anyio.move_on_after(2, shield=True):
            await self.redis.aclose()
            await self.pipe.aclose()
