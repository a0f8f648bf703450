"""Quotas from ``[limits]`` that span a user's sessions, and the pieces every quota is made of.

``TokenBucket`` is a rate; ``limited`` the one ``RATE_LIMITED`` refusal (naming the limit, costing
only the envelope that hit it). ``UserQuotas`` (owned by the ``SessionRegistry``) holds what
belongs to no single session: how many sessions a user may have and their messages a second
together. What belongs to one session (its own rate, its direct tool calls) is the ``Session``'s;
what belongs to a transaction (members, runs) is the conversation layer's.
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


#: Users whose message rate is tracked before idle ones are forgotten (bounds the table).
MAX_TRACKED_USERS = 10_000


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each message takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
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

    def check_message(self, user: str, related_id: str) -> None:
        """One inbound envelope of ``user`` against their sessions' message rate together."""
        now = self._clock()
        if not self._user_bucket(user, now).take(now):
            raise limited(
                f"more than {self.config.user_messages_per_second:g} messages a second from your sessions together;"
                " this one was dropped",
                "user_messages_per_second",
                related_id,
            )

    def _user_bucket(self, user: str, now: float) -> TokenBucket:
        bucket = self._user_buckets.get(user)
        if bucket is None:
            if len(self._user_buckets) >= MAX_TRACKED_USERS:
                self._forget_idle_users(now)
            bucket = TokenBucket(self.config.user_messages_per_second, self.config.user_message_burst, now)
            self._user_buckets[user] = bucket
        return bucket

    def _forget_idle_users(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes nothing."""
        refill = self.config.user_message_burst / self.config.user_messages_per_second
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


def limited(message: str, limit: str, related_id: str) -> ProtocolError:
    """``RATE_LIMITED``: ``message`` for the client, ``detail.limit`` the config key that set the bound."""
    return ProtocolError(ErrorCode.RATE_LIMITED, message, related_id=related_id, detail={"limit": f"limits.{limit}"})
