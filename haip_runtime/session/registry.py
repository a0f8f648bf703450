"""The session registry: the live sessions of this runtime, their resume and their expiry.

Keeps a small record of each session in the store (user, transactions, the runtime's epoch), so a
client resuming a session this process never knew learns why: the runtime restarted (and which
transactions to rejoin), or the session is unknown or not theirs (nothing revealed).
"""

from __future__ import annotations

import logging
import time

from haip_runtime.config.models import SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.session.session import Session
from haip_runtime.store.base import SessionRecord, Store

logger = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, config: SessionConfig, store: Store, epoch: str) -> None:
        self.config = config
        self.store = store
        self.epoch = epoch
        self.sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.save(session)

    def save(self, session: Session) -> None:
        record = SessionRecord(session.id, session.user, self.epoch, tuple(sorted(session.transactions)), time.time())
        self.store.save_session(record)

    def find_resumable(self, session_id: str, user: str) -> Session | None:
        session = self.sessions.get(session_id)
        if session is None or session.user != user or session.expired(time.monotonic()):
            return None
        return session

    async def resume_failure(self, session_id: str, user: str, related_id: str) -> ProtocolError:
        """Why ``session_id`` cannot be resumed by ``user``, as the ERROR to send."""
        record = await self.store.session(session_id) if session_id else None
        if record is not None and record.user == user and record.epoch != self.epoch:
            return ProtocolError(
                ErrorCode.RESUME_FAILED,
                "the runtime restarted and its replay window is gone; started a new session "
                "(rejoin your transactions with TRANSACTION_JOIN)",
                related_id=related_id,
                detail={"reason": "restarted", "epoch": self.epoch, "transactions": list(record.transactions)},
            )
        return ProtocolError(
            ErrorCode.RESUME_FAILED,
            "no resumable session with that id; started a new one",
            related_id=related_id,
            detail={"reason": "unknown", "epoch": self.epoch},
        )

    def expired(self) -> list[Session]:
        now = time.monotonic()
        return [session for session in self.sessions.values() if session.expired(now)]

    def remove(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.store.forget_session(session.id)

    def prune_records(self) -> None:
        """Forget records of sessions that cannot be resumed any more, whoever made them."""
        self.store.prune_sessions(time.time() - max(self.config.resume_timeout_seconds, 3600))
