"""The session registry: the live sessions of this runtime, their admission, resume and expiry.

Keeps a small record of each session in the store (user, transactions, the runtime's epoch), so a
client resuming a session this process never knew learns why: the runtime restarted (and which
transactions to rejoin), or the session is unknown or not theirs (nothing revealed). It owns the
quotas that span a user's sessions (``UserQuotas``) and counts the connections it has served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import anyio

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import LimitsConfig, SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.session.limits import SharedSlots, UserQuotas
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox
from haip_runtime.store.base import SessionRecord, Store

logger = logging.getLogger(__name__)


class Roaming(Protocol):
    """Sessions that move between the nodes of a cluster (``server/roaming.py``)."""

    async def adopt(self, session_id: str, principal: Principal, last_seq: int, related_id: str) -> Session | None:
        """``principal``'s session ``session_id`` taken over from wherever it was, ready to attach after
        ``last_seq``; ``None`` if no node has it (``ProtocolError`` RESUME_FAILED if it cannot resume)."""
        ...

    def admitted(self, session: Session) -> None:
        """A session of this node from now on: its frames go where every node can read them."""
        ...

    def dropped(self, session: Session) -> None:
        """The session is over (expired, or made room): its shared window goes too."""
        ...

    async def published(self, session: Session) -> None:
        """Wait (briefly) until the admitted session's window is where every node reads it, so that its
        client, told it is ready, finds it from any node (a POST through another node)."""
        ...

    async def make_room(self, user: str) -> bool:
        """Have another node drop one of ``user``'s sessions that waits for its client; ``True`` if one did."""
        ...


class SessionRegistry:
    """The sessions of this runtime by id; the one way a session is admitted, resumed or dropped."""

    def __init__(self, config: SessionConfig, store: Store, epoch: str, limits: LimitsConfig | None = None) -> None:
        self.config = config
        self.store = store
        #: This process's run of the runtime; a client that sees it change knows the runtime restarted.
        self.epoch = epoch
        self.quotas = UserQuotas(limits or LimitsConfig())
        #: In a cluster, where each user's sessions are counted over every node (``None``: this process only).
        self.slots: SharedSlots | None = None
        self.sessions: dict[str, Session] = {}
        #: Called with each session dropped (the hub takes it out of its transactions).
        self.on_drop: Callable[[Session], None] = lambda session: None
        #: Called with each session given up to another node (the hub lets it go without a word to the others).
        self.on_give_up: Callable[[Session], None] = lambda session: None
        #: In a cluster, where sessions of other nodes are found and this node's are mirrored.
        self.roaming: Roaming | None = None
        #: Connections that started a handshake (or resumed without one), and those serving a session now.
        self.total_connections = 0
        self.active_connections = 0
        #: Sessions being taken over from another node here, each by one resume at a time (``moving``).
        self._moving: dict[str, tuple[anyio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def opened(self) -> None:
        """A connection started its handshake (or resumed a session without one)."""
        self.total_connections += 1

    def serving(self) -> None:
        """A connection started serving an authenticated session: it counts as active until ``served``.

        A pair of calls, not a context manager: a ``@contextmanager`` is a generator and an object held
        for as long as the connection lives (about 320 bytes of each idle connection)."""
        self.active_connections += 1

    def served(self) -> None:
        """The connection of ``serving`` ended."""
        self.active_connections -= 1

    def check_rate(self, user: str, related_id: str) -> None:
        """One inbound envelope of ``user`` against their sessions' message rate together."""
        self.quotas.check_message(user, related_id)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def add(self, session: Session) -> None:
        """Admit an authenticated session: the user's oldest disconnected sessions make room for it
        (``HandshakeError`` RATE_LIMITED if all of them are connected)."""
        for stale in self.quotas.sessions_to_drop(self.sessions.values(), session.user):
            self.drop(stale)
        self.sessions[session.id] = session
        self.save(session)
        if self.roaming is not None:
            self.roaming.admitted(session)

    async def admit(self, session: Session) -> None:
        """``add``, after counting the session among its user's on every node when in a cluster.

        Room is made as ``add`` makes it, then, while the cluster is full, by dropping this node's
        oldest disconnected sessions of the user, then one another node holds (asked to drop it).
        ``HandshakeError`` RATE_LIMITED (close 1008) when no room is left."""
        if self.slots is None:
            self.add(session)
            return
        user = session.user
        for stale in self.quotas.sessions_to_drop(self.sessions.values(), user):
            self.drop(stale)
        while not await self.slots.claim(user, session.id, self.quotas.config.sessions_per_user):
            oldest = self.quotas.oldest_detached(self.sessions.values(), user)
            if oldest is not None:
                self.drop(oldest)
            elif self.roaming is None or not await self.roaming.make_room(user):  # (another node's, then)
                raise self.quotas.cluster_full(user)
        self.add(session)
        if self.roaming is not None:
            await self.roaming.published(session)

    def save(self, session: Session) -> None:
        record = SessionRecord(session.id, session.user, self.epoch, tuple(sorted(session.transactions)), time.time())
        self.store.save_session(record)

    async def resume(
        self,
        session_id: str,
        user: str,
        outbox: Outbox,
        last_seq: int,
        related_id: str,
        principal: Principal | None = None,
    ) -> Session:
        """Re-attach ``user``'s session ``session_id`` to ``outbox``, re-sending what came after
        ``last_seq``. Raises ``ProtocolError(RESUME_FAILED)`` saying why not (the session is untouched).
        In a cluster, a session this node does not hold is taken over from the node that does."""
        session = self.sessions.get(session_id)
        if session is None and self.roaming is not None and principal is not None and session_id:
            async with self.moving(session_id):  # (a prober's find: resumes at once each took it over anew)
                session = self.sessions.get(session_id)  # taken over meanwhile: resumed here, as on one node
                if session is None:
                    session = await self._adopt(session_id, principal, last_seq, related_id)
        if session is None or session.user != user or session.expired(time.monotonic()):
            raise await self._resume_failure(session_id, user, related_id)
        try:
            session.attach(outbox, last_seq)
        except ProtocolError as error:
            error.related_id = related_id or error.related_id
            raise
        return session

    @asynccontextmanager
    async def moving(self, session_id: str) -> AsyncIterator[None]:
        """While a session moves to or from this node (taken over, or let go at another node's asking):
        one at a time. Two resumes at once each took it over, and both connections stayed open with one
        getting its events; a release during a take-over found nothing to let go, and kept it too."""
        lock, users = self._moving.setdefault(session_id, (anyio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                self._moving.pop(session_id, None)

    async def _adopt(self, session_id: str, principal: Principal, last_seq: int, related_id: str) -> Session | None:
        assert self.roaming is not None
        try:
            session = await self.roaming.adopt(session_id, principal, last_seq, related_id)
        except ProtocolError as error:
            error.related_id = related_id or error.related_id
            raise
        if session is not None:
            await self.admit(session)
        return session

    def give_up(self, session: Session) -> None:
        """Another node took the session over: it leaves this one, its slot and shared window stay."""
        if self.sessions.pop(session.id, None) is not None:
            self.on_give_up(session)

    async def _resume_failure(self, session_id: str, user: str, related_id: str) -> ProtocolError:
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

    def drop(self, session: Session) -> None:
        """The session is over (expired, or made room for a newer one of its user)."""
        self.sessions.pop(session.id, None)
        if self.slots is not None:
            self.slots.release(session.user, session.id)
        if self.roaming is not None:
            self.roaming.dropped(session)
        self.store.forget_session(session.id)
        self.on_drop(session)

    def prune_records(self) -> None:
        """Forget records of sessions that cannot be resumed any more, whoever made them."""
        self.store.prune_sessions(time.time() - max(self.config.resume_timeout_seconds, 3600))
