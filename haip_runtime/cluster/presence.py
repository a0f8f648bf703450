"""Which nodes are alive: each beats into one sorted set (score: when it is no longer alive).

Times are Redis's clock, so nodes' clocks need not agree. A node that stops beating drops out of
``live`` ``node_ttl_seconds`` after its last beat; one that leaves says so at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace

#: KEYS: nodes, node agents. ARGV: node, ttl ms (0: only list), its agents (comma-separated). The live
#: nodes, after dropping the expired. A beat writes the node's agents too (``able`` reads them; again at
#: each beat: a Redis restarted without its data forgot them).
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


#: KEYS: nodes. ARGV: node. Until when the node is alive (ms, Redis's clock; 0: not in the set), and now.
ALIVE_UNTIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0'), now}
"""


#: KEYS: nodes, node agents. ARGV: a node ('': any), agent names. 1 if a live node (that one) runs every
#: one of them (by what each node wrote of its agents with its beat), else 0.
ABLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local have = (ARGV[1] == '' or ARGV[1] == node) and redis.call('HGET', KEYS[2], node)
  if have then
    local all = true
    for i = 2, #ARGV do
      if not string.find(',' .. have .. ',', ',' .. ARGV[i] .. ',', 1, true) then
        all = false
        break
      end
    end
    if all then return 1 end
  end
end
return 0
"""


#: KEYS: epoch. ARGV: a new epoch. The cluster's epoch, made by the first node to ask after Redis lost it.
EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


class Presence:
    def __init__(
        self,
        redis: Redis,
        keys: Keyspace,
        health: BusHealth,
        *,
        node: str,
        ttl_seconds: float,
        agents: Sequence[str] = (),
    ):
        self._redis = redis
        self._keys = keys
        self._health = health
        self._node = node
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        #: This node's agents, as other nodes read them (``able``).
        self.agents = ",".join(sorted(agents))
        self._beat = redis.register_script(BEAT)
        self._able = redis.register_script(ABLE)
        self._epoch = redis.register_script(EPOCH)
        self._alive_until = redis.register_script(ALIVE_UNTIL)

    async def beat(self) -> list[str]:
        """Say this node is alive for another ``node_ttl_seconds``; the live nodes."""
        return await self._run(self._ttl_ms, "beat")

    async def able(self, agents: Sequence[str], node: str = "") -> bool:
        """Whether a live node (``node``, if given) runs every one of ``agents`` (a node lacking some of a
        conversation's agents defers its turns to one, if there is one)."""
        keys = [self._keys.nodes(), self._keys.node_agents()]
        with translating(self._health, "find a node with the agents"):
            return bool(await self._able(keys=keys, args=[node, *agents]))

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
            await self._redis.hdel(self._keys.node_agents(), self._node)

    async def _run(self, ttl_ms: int, doing: str) -> list[str]:
        with translating(self._health, doing):
            nodes = await self._beat(
                keys=[self._keys.nodes(), self._keys.node_agents()], args=[self._node, ttl_ms, self.agents]
            )
        return sorted(node.decode() for node in nodes)
