"""Which nodes are alive: each beats into one sorted set (score: when it is no longer alive).

Times are Redis's clock, so nodes' clocks need not agree. A node that stops beating drops out of
``live`` ``node_ttl_seconds`` after its last beat; one that leaves says so at once.
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace

#: KEYS: nodes. ARGV: node, ttl ms (0: only list). The live nodes, after dropping the expired.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[2]) > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


#: KEYS: nodes. ARGV: node. Until when the node is alive (ms, Redis's clock; 0: not in the set), and now.
ALIVE_UNTIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0'), now}
"""


#: KEYS: epoch. ARGV: a new epoch. The cluster's epoch, made by the first node to ask after Redis lost it.
EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


class Presence:
    def __init__(self, redis: Redis, keys: Keyspace, health: BusHealth, *, node: str, ttl_seconds: float):
        self._redis = redis
        self._keys = keys
        self._health = health
        self._node = node
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._beat = redis.register_script(BEAT)
        self._epoch = redis.register_script(EPOCH)
        self._alive_until = redis.register_script(ALIVE_UNTIL)

    async def beat(self) -> list[str]:
        """Say this node is alive for another ``node_ttl_seconds``; the live nodes."""
        return await self._run(self._ttl_ms, "beat")

    async def live(self) -> list[str]:
        """The nodes heard from within their time to live, sorted."""
        return await self._run(0, "list the nodes")

    async def epoch(self) -> str:
        """The cluster's epoch: the same on every node, new only when Redis lost what it held (a restart
        without persistence), which is exactly when the sessions' windows are gone too."""
        with translating(self._health, "read the cluster's epoch"):
            return str((await self._epoch(keys=[self._keys.epoch()], args=[secrets.token_hex(8)])).decode())

    async def alive_until(self, node: str) -> tuple[int, int]:
        """Until when ``node`` is alive by its last beat (ms, Redis's clock; 0: it is not in the set), and now."""
        with translating(self._health, "read a node's last beat"):
            until, now = await self._alive_until(keys=[self._keys.nodes()], args=[node])
        return int(until), int(now)

    async def leave(self) -> None:
        with translating(self._health, "leave the cluster"):
            await self._redis.zrem(self._keys.nodes(), self._node)

    async def _run(self, ttl_ms: int, doing: str) -> list[str]:
        with translating(self._health, doing):
            nodes = await self._beat(keys=[self._keys.nodes()], args=[self._node, ttl_ms])
        return sorted(node.decode() for node in nodes)
