"""The session registry: admission within a user's quota, the reasons a resume fails, dropping."""

from __future__ import annotations

import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import LimitsConfig, SessionConfig
from haip_runtime.exceptions import HandshakeError, ProtocolError
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.registry import SessionRegistry
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox
from haip_runtime.store.base import SessionRecord
from haip_runtime.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


def session(user: str) -> Session:
    return Session(Principal(user), negotiate(ALL_EVENTS), SessionConfig())


def detached(user: str) -> Session:
    made = session(user)
    outbox = Outbox(10)
    made.attach(outbox)
    made.detach(outbox)
    return made


async def test_a_full_user_makes_room_by_dropping_their_oldest_disconnected_session() -> None:
    registry = SessionRegistry(SessionConfig(), MemoryStore(), "e", LimitsConfig(sessions_per_user=2))
    dropped: list[Session] = []
    registry.on_drop = dropped.append
    old, live = detached("ann"), session("ann")
    registry.add(old)
    registry.add(live)
    newer = session("ann")
    registry.add(newer)
    with pytest.raises(HandshakeError) as refused:
        registry.add(session("ann"))  # both remaining are connected
    assert dropped == [old] and registry.get(old.id) is None and len(registry) == 2
    assert refused.value.code == "RATE_LIMITED"


async def test_a_resume_says_why_it_failed_without_revealing_another_users_session() -> None:
    store = MemoryStore()
    registry = SessionRegistry(SessionConfig(), store, "epoch-2")
    ann = detached("ann")
    registry.add(ann)
    store.save_session(SessionRecord("before-restart", "ann", "epoch-1", ("t1",), 0.0))
    failures = {}
    for name, session_id, user in (
        ("unknown", "nope", "ann"),
        ("not theirs", ann.id, "bob"),
        ("restarted", "before-restart", "ann"),
    ):
        with pytest.raises(ProtocolError) as caught:
            await registry.resume(session_id, user, Outbox(10), 0, "r1")
        failures[name] = caught.value
    assert failures["unknown"].detail == failures["not theirs"].detail == {"reason": "unknown", "epoch": "epoch-2"}
    assert failures["restarted"].detail == {"reason": "restarted", "epoch": "epoch-2", "transactions": ["t1"]}
    assert {error.code for error in failures.values()} == {"RESUME_FAILED"}
    assert {error.related_id for error in failures.values()} == {"r1"}


async def test_a_resume_past_what_was_sent_fails_and_leaves_the_session_as_it_was() -> None:
    registry = SessionRegistry(SessionConfig(), MemoryStore(), "e")
    ann = detached("ann")
    registry.add(ann)
    with pytest.raises(ProtocolError) as caught:
        await registry.resume(ann.id, "ann", Outbox(10), ann.last_seq + 5, "r2")
    resumed = await registry.resume(ann.id, "ann", Outbox(10), ann.last_seq, "r3")
    assert caught.value.detail == {"where": "/payload/last_rx_seq", "reason": "ahead"}
    assert caught.value.related_id == "r2" and resumed is ann and ann.outbox is not None


class Slots:
    """Shared slots that hold ``room`` sessions per user for the whole cluster (others' included)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.held: list[str] = []
        self.released: list[str] = []

    async def claim(self, user: str, holder: str, limit: int) -> bool:
        if len(self.held) >= min(limit, self.room):
            return False
        self.held.append(holder)
        return True

    def release(self, user: str, holder: str) -> None:
        self.released.append(holder)
        if holder in self.held:
            self.held.remove(holder)


async def test_in_a_cluster_room_is_made_by_this_nodes_disconnected_sessions_or_refused() -> None:
    registry = SessionRegistry(SessionConfig(), MemoryStore(), "e", LimitsConfig(sessions_per_user=3))
    slots = Slots(room=2)  # one of the user's three sessions is on another node
    registry.slots = slots
    old, live = detached("ann"), session("ann")
    await registry.admit(old)
    await registry.admit(live)
    newer = session("ann")
    await registry.admit(newer)  # the cluster is full: this node's disconnected session makes room
    with pytest.raises(HandshakeError) as refused:
        await registry.admit(session("ann"))  # nothing here to drop: refused
    registry.drop(live)
    assert registry.get(old.id) is None and slots.released == [old.id, live.id]
    assert slots.held == [newer.id] and len(registry) == 1
    assert refused.value.code == "RATE_LIMITED" and refused.value.close_code == 1008
    assert "in the cluster" in refused.value.message
