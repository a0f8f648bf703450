"""Inbound dedup shared by every node: an envelope id resent to another node is still seen once.

One key per (session, envelope id), set with ``SET NX`` and a time to live: memory is bounded by the
rate of inbound envelopes times ``dedup_seconds``, and a duplicate arriving later than that is taken
as new (a client resends within its resume, far sooner).
"""

from __future__ import annotations

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace


class InboundDedup:
    def __init__(self, redis: Redis, keys: Keyspace, health: BusHealth, *, ttl_seconds: float):
        self._redis = redis
        self._keys = keys
        self._health = health
        self._ttl_ms = max(1, int(ttl_seconds * 1000))

    async def seen(self, session: str, envelope_id: str) -> bool:
        """Whether ``envelope_id`` already came in for ``session`` (on any node); marks it seen."""
        with translating(self._health, f"check envelope {envelope_id}"):
            fresh = await self._redis.set(self._keys.inbound(session, envelope_id), b"1", nx=True, px=self._ttl_ms)
        return not fresh
