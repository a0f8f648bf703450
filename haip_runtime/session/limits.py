"""Quotas from ``[limits]``: what one session or user may hold or send, checked in one place.

The hub and the connection call these with one line each; a refusal is a ``ProtocolError``
``RATE_LIMITED`` naming the limit (or a ``HandshakeError`` at the handshake) and costs only the
envelope that hit it. State is kept per ``Session`` object in weak maps, so nothing here has to
be told when a session goes away.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from haip_runtime.config.models import LimitsConfig
from haip_runtime.exceptions import HandshakeError, ProtocolError
from haip_runtime.protocol.events import CloseCode, ErrorCode

if TYPE_CHECKING:
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.protocol.envelope import Envelope
    from haip_runtime.session.session import Session


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


class Limits:
    """Every quota of the runtime; one instance per hub."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._buckets: weakref.WeakKeyDictionary[Session, TokenBucket] = weakref.WeakKeyDictionary()
        self._user_buckets: dict[str, TokenBucket] = {}
        self._calls: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()

    def check_message(self, session: Session, envelope: Envelope) -> None:
        """One inbound envelope of ``session`` against its own and its user's message rate."""
        now = self._clock()
        bucket = self._buckets.get(session)
        if bucket is None:
            bucket = TokenBucket(self.config.messages_per_second, self.config.message_burst, now)
            self._buckets[session] = bucket
        if not bucket.take(now):
            raise _limited(
                f"more than {self.config.messages_per_second:g} messages a second; this one was dropped",
                "messages_per_second",
                envelope.id,
            )
        if not self._user_bucket(session.user, now).take(now):
            raise _limited(
                f"more than {self.config.user_messages_per_second:g} messages a second from your sessions together;"
                " this one was dropped",
                "user_messages_per_second",
                envelope.id,
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

    def admit_session(self, sessions: Iterable[Session], user: str) -> list[Session]:
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

    def check_transactions(self, transactions: Iterable[Transaction], user: str, related_id: str) -> None:
        """Before ``user`` starts another transaction."""
        owned = sum(1 for transaction in transactions if transaction.owner == user and not transaction.ended)
        if owned >= self.config.transactions_per_user:
            raise _limited(f"you already have {owned} open transactions", "transactions_per_user", related_id)

    def check_members(self, transaction: Transaction, session: Session, related_id: str) -> None:
        """Before ``session`` joins ``transaction``."""
        if not transaction.is_member(session) and len(transaction.members) >= self.config.members_per_transaction:
            raise _limited(
                f"transaction {transaction.id} already has {len(transaction.members)} members",
                "members_per_transaction",
                related_id,
            )

    def claim_tool_call(self, session: Session, related_id: str) -> None:
        """Before a direct TOOL_CALL of ``session`` starts; pair with ``release_tool_call``."""
        running = self._calls.get(session, 0)
        if running >= self.config.tool_calls_per_session:
            message = f"{running} tool calls of this session are still running"
            raise _limited(message, "tool_calls_per_session", related_id)
        self._calls[session] = running + 1

    def release_tool_call(self, session: Session) -> None:
        self._calls[session] = max(0, self._calls.get(session, 0) - 1)

    def tool_calls_in_flight(self, session: Session) -> int:
        return self._calls.get(session, 0)


def _limited(message: str, limit: str, related_id: str) -> ProtocolError:
    return ProtocolError(ErrorCode.RATE_LIMITED, message, related_id=related_id, detail={"limit": f"limits.{limit}"})
