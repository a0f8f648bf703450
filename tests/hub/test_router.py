"""The hub on its own: routing by type, the checks every handler shares, and a dropped session leaving."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from haip_runtime.agents.registry import load_agents
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.router import Hub
from haip_runtime.protocol.envelope import Envelope, Event
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.store.memory import MemoryStore
from tests.support.serving import make_config

pytestmark = pytest.mark.anyio

CONFIG = make_config()


def envelope(type: str, payload: dict[str, Any], transaction: str | None = None, id: str = "e1") -> Envelope:
    body = {"id": id, "session": "", "seq": "1", "ts": "1", "channel": "USER", "type": type, "payload": payload}
    return Envelope.model_validate({**body, "transaction": transaction})


def member(hub: Hub, user: str) -> Session:
    session = Session(Principal(user), negotiate(ALL_EVENTS), SessionConfig())
    hub.sessions.add(session)
    return session


def received(session: Session) -> list[dict[str, Any]]:
    frames = (session.window.get(seq) for seq in range(1, session.last_seq + 1))
    return [json.loads(frame) for frame in frames if frame is not None]


async def test_a_type_no_handler_takes_is_refused_with_its_name() -> None:
    async with Hub(CONFIG, load_agents(CONFIG)) as hub:
        with pytest.raises(ProtocolError) as refused:
            await hub.handle(member(hub, "ann"), envelope("SHOUT", {}))
    assert refused.value.code == "UNSUPPORTED_TYPE" and "SHOUT" in refused.value.message


async def test_a_transaction_is_found_only_for_its_members() -> None:
    async with Hub(CONFIG, load_agents(CONFIG)) as hub:
        ann, bob = member(hub, "ann"), member(hub, "bob")
        await hub.handle(ann, envelope("TRANSACTION_START", {"agent": "echo"}))
        [started] = [e for e in received(ann) if e["type"] == "TRANSACTION_START"]
        with pytest.raises(ProtocolError) as refused:
            await hub.handle(bob, envelope("MESSAGE", {"text": "hi"}, started["transaction"], id="e2"))
    assert refused.value.code == "TRANSACTION_NOT_FOUND" and refused.value.related_id == "e2"


async def test_a_dropped_session_leaves_its_transactions_and_the_others_are_told() -> None:
    async with Hub(CONFIG, load_agents(CONFIG)) as hub:
        ann, bob = member(hub, "ann"), member(hub, "bob")
        await hub.handle(ann, envelope("TRANSACTION_START", {"agent": "echo"}))
        transaction = next(iter(hub.transactions.live.values()))
        transaction.add_member(bob)
        hub.sessions.drop(ann)
    left = [e["payload"] for e in received(bob) if e["type"] == "INFO"]
    assert not transaction.is_member(ann) and {"event": "member.left", "user": "ann"} in left
    assert transaction.id not in ann.transactions


class HeldReads(MemoryStore):
    """A store whose reads of events wait, while ``held``, until ``release``d (a slow database)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = False
        self.reading = anyio.Event()
        self._released = anyio.Event()

    def release(self) -> None:
        self.held = False
        self._released.set()

    async def events(self, transaction_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        if self.held:
            self.reading.set()
            await self._released.wait()
        return await super().events(transaction_id, after=after, limit=limit)


async def test_a_join_reading_the_history_while_its_transaction_ends_is_refused_and_joins_nothing() -> None:
    """A reviewer's race: the join reads the history from the store (the transaction was brought back
    from it), and meanwhile the owner's next start, at ``transactions_per_user``, ends it (nobody is
    in it yet). The join must be refused, not make a member of an ended transaction."""
    config = make_config({"limits": {"transactions_per_user": 1}})
    store = HeldReads()
    async with Hub(config, load_agents(config), store=store) as hub:
        first, joining, again = member(hub, "ann"), member(hub, "ann"), member(hub, "ann")
        await hub.handle(first, envelope("TRANSACTION_START", {"agent": "echo"}))
        transaction = next(iter(hub.transactions.live.values()))
        hub.sessions.drop(first)
        hub.transactions.evict(transaction)  # left memory: brought back, a join reads its history from the store
        refused: list[ProtocolError] = []

        async def join() -> None:
            try:
                await hub.handle(joining, envelope("TRANSACTION_JOIN", {}, transaction.id, id="j1"))
            except ProtocolError as error:
                refused.append(error)

        back = await hub.transactions.find(transaction.id, joining.principal)  # its recent events not in memory
        store.held = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(join)
            with anyio.fail_after(5):
                await store.reading.wait()
            await hub.handle(again, envelope("TRANSACTION_START", {"agent": "echo"}, id="s2"))
            store.release()
    assert isinstance(back, Transaction) and back.ended  # made room for the new one
    assert [(error.code, error.related_id) for error in refused] == [("TRANSACTION_NOT_FOUND", "j1")]
    assert "has ended" in refused[0].message
    assert not back.is_member(joining) and back.id not in joining.transactions
