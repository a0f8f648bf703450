"""The hub on its own: routing by type, the checks every handler shares, and a dropped session leaving."""

from __future__ import annotations

import json
from typing import Any

import pytest

from haip_runtime.agents.registry import load_agents
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.router import Hub
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
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
