"""Quotas from ``[limits]`` that span a user's sessions, and the pieces every quota is made of.

``TokenBucket`` is a rate; ``limited`` the one ``RATE_LIMITED`` refusal (naming the limit, costing
only the envelope that hit it). ``UserQuotas`` (owned by the ``SessionRegistry``) holds what
belongs to no single session: how many sessions a user may have and their messages a second
together. What belongs to one session (its own rate, its direct tool calls) is the ``Session``'s;
what belongs to a transaction (members, runs) is the conversation layer's.

In a cluster (``[cluster]``) the same two quotas count over every node, without a round trip to Redis
on the hot path: the user's message rate is shared out (``UserQuotas.share``: each node allows
``1/n`` of it, ``n`` the live nodes), and sessions are counted in ``SharedSlots`` the server wires in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from haip_runtime.config.models import LimitsConfig
from haip_runtime.exceptions import HandshakeError, ProtocolError
from haip_runtime.protocol.events import CloseCode, ErrorCode


class Holder(Protocol):
    """A session as a user's quota counts it."""

    @property
    def user(self) -> str: ...

    detached_at: float | None


class SharedSlots(Protocol):
    """A user's sessions counted over every node of a cluster (the server wires the bus's quotas in)."""

    async def claim(self, user: str, holder: str, limit: int) -> bool:
        """Count ``holder`` among ``user``'s at most ``limit`` sessions; ``False`` if they are all taken."""
        ...

    def release(self, user: str, holder: str) -> None:
        """``holder`` ended: its place is free (soon: without waiting for the caller)."""
        ...


#: Users whose message rate is tracked before idle ones are forgotten (bounds the table).
MAX_TRACKED_USERS = 10_000


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each message takes one."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


H = TypeVar("H", bound=Holder)


class UserQuotas:
    """The quotas of each user across their sessions; one instance per session registry."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._user_buckets: dict[str, TokenBucket] = {}
        #: The nodes the user's message rate is shared out over (1 without a cluster).
        self.nodes = 1

    @property
    def user_rate(self) -> float:
        """This node's share of ``user_messages_per_second``."""
        return self.config.user_messages_per_second / self.nodes

    @property
    def user_burst(self) -> float:
        """This node's share of ``user_message_burst`` (at least one message)."""
        return max(1.0, self.config.user_message_burst / self.nodes)

    def share(self, nodes: int) -> None:
        """Allow ``1/nodes`` of each user's rate and burst here, so that all nodes together allow at
        most the configured rate however a user's sessions are spread (a user on one node only gets
        that node's share: the price of not asking Redis about every envelope)."""
        nodes = max(1, nodes)
        if nodes == self.nodes:
            return
        self.nodes = nodes
        for bucket in self._user_buckets.values():
            bucket.rate, bucket.burst = self.user_rate, self.user_burst
            bucket.tokens = min(bucket.tokens, bucket.burst)

    def check_message(self, user: str, related_id: str) -> None:
        """One inbound envelope of ``user`` against their sessions' message rate together."""
        now = self._clock()
        if not self._user_bucket(user, now).take(now):
            rate = self.config.user_messages_per_second
            where = "" if self.nodes == 1 else f" on this node ({rate:g} shared by {self.nodes} nodes)"
            raise limited(
                f"more than {self.user_rate:g} messages a second from your sessions together{where};"
                " this one was dropped",
                "user_messages_per_second",
                related_id,
            )

    def _user_bucket(self, user: str, now: float) -> TokenBucket:
        bucket = self._user_buckets.get(user)
        if bucket is None:
            if len(self._user_buckets) >= MAX_TRACKED_USERS:
                self._forget_idle_users(now)
            bucket = TokenBucket(self.user_rate, self.user_burst, now)
            self._user_buckets[user] = bucket
        return bucket

    def _forget_idle_users(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes nothing."""
        refill = self.user_burst / self.user_rate
        self._user_buckets = {u: b for u, b in self._user_buckets.items() if now - b.updated < refill}

    def sessions_to_drop(self, sessions: Iterable[H], user: str) -> list[H]:
        """Room for one more session of ``user``: the disconnected sessions to drop for it.

        Raises ``HandshakeError(RATE_LIMITED)`` (close 1008) if the user's sessions are all connected.
        """
        own = [session for session in sessions if session.user == user]
        excess = len(own) + 1 - self.config.sessions_per_user
        if excess <= 0:
            return []
        detached = sorted((s for s in own if s.detached_at is not None), key=lambda s: s.detached_at or 0.0)
        if len(detached) < excess:
            raise HandshakeError(
                ErrorCode.RATE_LIMITED,
                f"user {user!r} already has {len(own)} sessions (limits.sessions_per_user)",
                close_code=CloseCode.POLICY,
            )
        return detached[:excess]

    @staticmethod
    def oldest_detached(sessions: Iterable[H], user: str) -> H | None:
        """``user``'s session disconnected longest ago, to make room for a new one."""
        detached = [s for s in sessions if s.user == user and s.detached_at is not None]
        return min(detached, key=lambda s: s.detached_at or 0.0, default=None)

    def cluster_full(self, user: str) -> HandshakeError:
        """The refusal when ``user``'s sessions on every node together are at the limit."""
        return HandshakeError(
            ErrorCode.RATE_LIMITED,
            f"user {user!r} already has {self.config.sessions_per_user} sessions in the cluster"
            " (limits.sessions_per_user)",
            close_code=CloseCode.POLICY,
        )


def limited(message: str, limit: str, related_id: str) -> ProtocolError:
    """``RATE_LIMITED``: ``message`` for the client, ``detail.limit`` the config key that set the bound."""
    return ProtocolError(ErrorCode.RATE_LIMITED, message, related_id=related_id, detail={"limit": f"limits.{limit}"})
