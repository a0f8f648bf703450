"""Leases: one holder at a time for a name (a transaction's runs), for as long as it keeps renewing.

``acquire`` sets the lease only if nobody holds it and returns a token that starts with a fencing
number (it grows with every acquisition of the name, so a store can refuse a late write of an
older holder). ``renew`` and ``release`` compare the token and extend or delete in one script, so a
holder whose lease expired and went to another can neither extend nor delete the new one.
``hold`` keeps one alive: it renews every third of the time to live and, when renewing fails
(taken over, or Redis not reached before the lease would have run out by this node's clock), sets
``lost`` — the holder must stop what the lease guarded.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.replies import text
from haip_runtime.exceptions import ClusterError

logger = logging.getLogger("haip_runtime.cluster")

#: KEYS: lease, fence. ARGV: holder, ttl ms. The token, or nil if held.
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = string.format('%d', redis.call('INCR', KEYS[2])) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""
#: KEYS: lease. ARGV: token, ttl ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
#: KEYS: lease. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class HeldLease:
    """A lease kept alive by ``Leases.hold``."""

    name: str
    token: str
    #: Set when the lease is no longer this holder's (stop the guarded work).
    lost: anyio.Event = field(default_factory=anyio.Event)

    @property
    def fence(self) -> int:
        """Grows with each acquisition of the name: a later holder has a larger one."""
        return int(self.token.split(":", 1)[0])


class Leases:
    def __init__(self, redis: Redis, keys: Keyspace, health: BusHealth, *, node: str, ttl_seconds: float):
        self._redis = redis
        self._keys = keys
        self._health = health
        self._node = node
        self._ttl = ttl_seconds
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    async def acquire(self, name: str, ttl: float | None = None) -> str | None:
        """The token of a new lease on ``name``, or ``None`` if someone holds it."""
        holder = f"{self._node}:{secrets.token_hex(6)}"
        keys = [self._keys.lease(name), self._keys.fence(name)]
        with translating(self._health, f"acquire lease {name}"):
            return text(await self._acquire(keys=keys, args=[holder, self._ms(ttl)]))

    async def renew(self, name: str, token: str, ttl: float | None = None) -> bool:
        """Extend the lease if ``token`` still holds it."""
        with translating(self._health, f"renew lease {name}"):
            return bool(await self._renew(keys=[self._keys.lease(name)], args=[token, self._ms(ttl)]))

    async def release(self, name: str, token: str) -> bool:
        """Give the lease up if ``token`` still holds it (another holder's lease is left alone)."""
        with translating(self._health, f"release lease {name}"):
            return bool(await self._release(keys=[self._keys.lease(name)], args=[token]))

    async def left(self, name: str) -> float:
        """Seconds until the lease on ``name`` runs out unless renewed (0: nobody holds it)."""
        with translating(self._health, f"read lease {name}"):
            return max(int(await self._redis.pttl(self._keys.lease(name))), 0) / 1000

    async def wait_acquire(self, name: str, ttl: float | None = None) -> str:
        """Acquire ``name``, waiting while another holds it: the next try is when its lease would expire.

        How the next turn of a dead owner's transaction lands elsewhere. Bound it with ``anyio.fail_after``.
        """
        while True:
            token = await self.acquire(name, ttl)
            if token is not None:
                return token
            with translating(self._health, f"read lease {name}"):
                left_ms = int(await self._redis.pttl(self._keys.lease(name)))
            await anyio.sleep(max(left_ms, 1) / 1000)

    async def holder(self, name: str) -> str | None:
        """The token holding ``name`` now, if any."""
        with translating(self._health, f"read lease {name}"):
            return text(await self._redis.get(self._keys.lease(name)))

    @asynccontextmanager
    async def hold(
        self, name: str, ttl: float | None = None, *, on_lost: Callable[[HeldLease], None] | None = None
    ) -> AsyncIterator[HeldLease | None]:
        """Acquire ``name`` and keep it renewed inside the block (``None``: someone else holds it).

        Released when the block ends (if still held). ``lease.lost`` is set, and ``on_lost`` called,
        when it stops being this holder's.
        """
        ttl = ttl if ttl is not None else self._ttl
        sent = anyio.current_time()
        token = await self.acquire(name, ttl)
        if token is None:
            yield None
            return
        lease = HeldLease(name, token)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep, lease, ttl, sent + ttl, on_lost)
                try:
                    yield lease
                finally:
                    tg.cancel_scope.cancel()
                    if not lease.lost.is_set():
                        with anyio.move_on_after(2, shield=True):
                            try:
                                await self.release(name, token)
                            except ClusterError:
                                pass  # it expires by itself
        except BaseExceptionGroup as group:  # the block's own error, as it raised it (the keeper raises none)
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def keep(self, name: str, token: str, ttl: float | None = None) -> None:
        """Renew the lease ``token`` holds every third of the TTL; return once it is lost (taken over,
        or Redis not reached before it would have run out by this node's clock). Cancel to stop."""
        ttl = ttl if ttl is not None else self._ttl
        await self._keep(HeldLease(name, token), ttl, anyio.current_time() + ttl, None)

    async def _keep(
        self, lease: HeldLease, ttl: float, deadline: float, on_lost: Callable[[HeldLease], None] | None
    ) -> None:
        """Renew every third of ``ttl``; give up once renewing fails for good or the deadline passes."""
        while True:
            await anyio.sleep(max(0.0, min(ttl / 3, deadline - anyio.current_time())))
            sent = anyio.current_time()
            if sent >= deadline:
                break
            try:
                if not await self.renew(lease.name, lease.token, ttl):
                    break
            except ClusterError:
                continue  # try again until the deadline: the lease may still be ours
            deadline = sent + ttl
        logger.warning("lease %s lost", lease.name)
        lease.lost.set()
        if on_lost is not None:
            on_lost(lease)

    def _ms(self, ttl: float | None) -> int:
        return max(1, int((ttl if ttl is not None else self._ttl) * 1000))
