"""Per-user limits counted across the cluster: slots (sessions, open transactions) and rates.

Slots: one sorted set per (user, kind), a member per holder (a session id, a transaction id) scored
with when it expires. ``acquire_slot`` drops expired members and adds one only under the limit, in
one script. The node refreshes the slots it holds at every heartbeat, so a dead node's slots free
themselves: tolerance, the count may include a dead node's slots for up to ``slot_ttl_seconds``; a
node cut off from Redis longer than that may see its slots taken by others.

Rates: a sliding window approximated from two fixed windows (the previous one weighted by how much
of it still overlaps the window), counted in Redis so every node sees one count. Tolerance: exact
for the count; the approximation assumes the previous window's hits were spread evenly (at most
the previous window's count too many or too few in the worst case, in practice within a few per cent).
"""

from __future__ import annotations

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.pipe import Pipe
from haip_runtime.cluster.replies import Arg

#: KEYS: slots. ARGV: holder, limit, ttl ms. 1 held (new or refreshed), 0 full.
ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS: slots... ARGV: ttl ms, then for each key its holder. Every slot this node holds is written again,
#: also one Redis lost (restarted empty) or let expire (a heartbeat late): the node still holds it.
REFRESH = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], until_, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""

#: KEYS: none (rate keys are made here from ARGV so one script does both windows). ARGV: key stem, limit,
#: window ms. 1 counted, 0 over the limit (not counted).
HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
local index = math.floor(now / window)
local current_key = ARGV[1] .. string.format('%d', index)
local current = tonumber(redis.call('GET', current_key) or '0')
local previous = tonumber(redis.call('GET', ARGV[1] .. string.format('%d', index - 1)) or '0')
local overlap = 1 - (now - index * window) / window
if previous * overlap + current + 1 > tonumber(ARGV[2]) then return 0 end
redis.call('INCR', current_key)
redis.call('PEXPIRE', current_key, window * 2)
return 1
"""


class Quotas:
    """Cluster-wide slots and rates; refresh the slots this node holds at every heartbeat."""

    def __init__(self, redis: Redis, pipe: Pipe, keys: Keyspace, health: BusHealth, *, slot_ttl_seconds: float):
        self._redis = redis
        #: Where slots are acquired (in every handshake, a resume on another node's too): the bus's pipe.
        self._pipe = pipe
        self._keys = keys
        self._health = health
        self._ttl_ms = max(1, int(slot_ttl_seconds * 1000))
        self._held: set[tuple[str, str, str]] = set()
        self._refresh = redis.register_script(REFRESH)
        self._hit = redis.register_script(HIT)

    @property
    def held(self) -> int:
        """Slots this node holds (and refreshes)."""
        return len(self._held)

    async def acquire_slot(self, user: str, kind: str, holder: str, limit: int) -> bool:
        """Take one of ``user``'s ``limit`` slots of ``kind`` for ``holder``; ``False`` if all are taken."""
        args: list[Arg] = [holder, limit, self._ttl_ms]
        with translating(self._health, f"acquire a {kind} slot of {user}"):
            got = await self._pipe.script(ACQUIRE_SLOT, [self._keys.slots(user, kind)], args)
        if got:
            self._held.add((user, kind, holder))
        return bool(got)

    def let_go(self, user: str, kind: str, holder: str) -> None:
        """Stop refreshing a slot another node holds now (a session taken over there: same holder);
        Redis is left as it is, for that node to keep or release."""
        self._held.discard((user, kind, holder))

    async def release_slot(self, user: str, kind: str, holder: str) -> None:
        self._held.discard((user, kind, holder))
        with translating(self._health, f"release a {kind} slot of {user}"):
            await self._redis.zrem(self._keys.slots(user, kind), holder)

    async def holders(self, user: str, kind: str) -> list[str]:
        """Who holds ``user``'s live slots of ``kind``, every node's (the least recently refreshed first)."""
        key = self._keys.slots(user, kind)
        with translating(self._health, f"list the {kind} slots of {user}"):
            now_ms = int((await self._redis.time())[0]) * 1000
            found = await self._redis.zrangebyscore(key, f"({now_ms}", "+inf")
        return [holder.decode() if isinstance(holder, bytes) else str(holder) for holder in found or []]

    async def count(self, user: str, kind: str) -> int:
        """Live slots of ``user``'s ``kind``, over every node."""
        key = self._keys.slots(user, kind)
        with translating(self._health, f"count the {kind} slots of {user}"):
            now_ms = int((await self._redis.time())[0]) * 1000
            return int(await self._redis.zcount(key, f"({now_ms}", "+inf"))

    async def refresh(self) -> None:
        """Extend every slot this node holds by ``slot_ttl_seconds``, writing again any Redis lost (one script run)."""
        held = sorted(self._held)
        if not held:
            return
        keys = [self._keys.slots(user, kind) for user, kind, _ in held]
        with translating(self._health, "refresh the quota slots"):
            await self._refresh(keys=keys, args=[self._ttl_ms, *(holder for _, _, holder in held)])

    async def hit(self, user: str, kind: str, limit: int, window_seconds: float) -> bool:
        """Count one event of ``kind`` for ``user``; ``False`` (not counted) past ``limit`` per window."""
        stem = self._keys.rate_stem(user, kind)
        with translating(self._health, f"count a {kind} of {user}"):
            return bool(await self._hit(keys=[], args=[stem, limit, max(1, int(window_seconds * 1000))]))
