"""Flow control (PROTOCOL.md section 13): the session pipeline without sockets, then whole
connections over the in-memory transport pair."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import FlowControlConfig, SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS, ErrorCode
from haip_runtime.server.app import Runtime
from haip_runtime.session.flow import MAX_CHANNELS, MAX_MERGED_PART, InboundCredit
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox
from haip_runtime.transports.memory import MemoryTransport
from tests.support.peers import MemoryClient
from tests.support.serving import make_config

pytestmark = pytest.mark.anyio

BIG = 1 << 30


def attached(max_buffered: int = 1000) -> tuple[Session, Outbox]:
    session = Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig(max_buffered_messages=max_buffered))
    outbox = Outbox(10_000)
    session.attach(outbox)
    return session, outbox


def agent(type: str, text: str = "", message_id: str = "m") -> Event:
    return Event(type, {"message_id": message_id, "text": text}, channel="AGENT")


def recorded(session: Session, start: int = 1) -> list[tuple[int, str, str, Any]]:
    frames = [json.loads(session.window.get(seq) or "null") for seq in range(start, session.last_seq + 1)]
    return [(int(f["seq"]), f["channel"], f["type"], f["payload"].get("text")) for f in frames]


def test_credit_is_not_enforced_before_the_clients_first_flow_update() -> None:
    session, _ = attached()
    session.flow.reset((2, BIG))
    for index in range(5):
        session.deliver(agent("MESSAGE_PART", str(index), message_id=str(index)))
    assert session.last_seq == 5 and session.flow.held == 0


def test_a_channel_out_of_credit_waits_without_a_seq_while_other_channels_go_on() -> None:
    session, _ = attached()
    session.flow.reset((2, BIG))
    session.grant("AGENT", 0, 0)  # the client's first FLOW_UPDATE: from now on its credit counts
    for index in range(4):
        session.deliver(agent("MESSAGE_PART", str(index), message_id=str(index)))
    session.deliver(Event("MESSAGE", {"text": "user"}, channel="USER"))
    assert recorded(session) == [
        (1, "AGENT", "MESSAGE_PART", "0"),
        (2, "AGENT", "MESSAGE_PART", "1"),
        (3, "USER", "MESSAGE", "user"),
    ]
    session.grant("AGENT", 5, 1000)
    assert recorded(session, 4) == [(4, "AGENT", "MESSAGE_PART", "2"), (5, "AGENT", "MESSAGE_PART", "3")]


def test_byte_credit_counts_too() -> None:
    session, _ = attached()
    session.flow.reset((100, 60))
    session.grant("AGENT", 0, 0)
    session.deliver(agent("MESSAGE_PART", "x" * 10, "a"))
    session.deliver(agent("MESSAGE_PART", "y" * 40, "b"))
    assert [entry[3] for entry in recorded(session)] == ["x" * 10]
    session.grant("AGENT", 0, 100)
    assert [entry[3] for entry in recorded(session)] == ["x" * 10, "y" * 40]


def test_pause_stops_a_channel_at_once_and_merges_the_parts_of_one_message() -> None:
    session, _ = attached()
    session.pause("AGENT")
    session.deliver(agent("MESSAGE_START"))
    for part in ("a", "b", "c"):
        session.deliver(agent("MESSAGE_PART", part))
    session.deliver(agent("MESSAGE_END"))
    session.send("PING", {"nonce": "n"})  # session mechanics are never held
    assert recorded(session) == [(1, "SYSTEM", "PING", None)]
    assert session.flow.held == 3
    session.resume_channel("AGENT")
    assert recorded(session) == [
        (1, "SYSTEM", "PING", None),
        (2, "AGENT", "MESSAGE_START", ""),
        (3, "AGENT", "MESSAGE_PART", "abc"),
        (4, "AGENT", "MESSAGE_END", ""),
    ]


def test_parts_held_by_a_pause_merge_only_up_to_max_merged_part() -> None:
    session, _ = attached()
    session.pause("AGENT")
    chunk = "c" * 1000
    count = MAX_MERGED_PART // 1000 + 5
    for _ in range(count):
        session.deliver(agent("MESSAGE_PART", chunk))
    assert session.flow.held == 2  # one part grew to the cap, the next started another
    session.resume_channel("AGENT")
    texts = [entry[3] for entry in recorded(session)]
    assert "".join(texts) == chunk * count and max(map(len, texts)) <= MAX_MERGED_PART + len(chunk)


async def test_past_the_bound_the_connection_is_closed_with_1013_and_nothing_is_lost() -> None:
    session, outbox = attached(max_buffered=16)
    session.pause("AGENT")
    for index in range(17):
        session.deliver(agent("MESSAGE_PART", str(index), message_id=str(index)))
    assert outbox.close_code == 1013 and session.flow.held == 0
    assert [entry[3] for entry in recorded(session)] == [str(index) for index in range(17)]
    session.detach(outbox)
    resumed = Outbox(10_000)
    session.attach(resumed, last_rx_seq=0)  # the session is kept: a resume gets every frame
    resumed.close()
    assert len([frame async for frame in resumed.frames()]) == 17


async def test_events_held_when_a_connection_ends_wait_in_the_window_for_the_resume() -> None:
    session, outbox = attached()
    session.pause("AGENT")
    session.deliver(agent("MESSAGE_PART", "held"))
    session.detach(outbox)
    assert recorded(session) == [(1, "AGENT", "MESSAGE_PART", "held")]
    again = Outbox(100)
    session.attach(again, last_rx_seq=0)
    session.deliver(agent("MESSAGE_PART", "live", message_id="n"))  # a new connection starts unpaused
    again.close()
    assert [json.loads(frame)["payload"]["text"] async for frame in again.frames()] == ["held", "live"]


def test_a_client_past_its_credit_gets_flow_control_violation_until_it_has_read_its_top_up() -> None:
    credit = InboundCredit(FlowControlConfig(initial_credit_messages=4))
    message = '{"id":"%s","session":"","seq":"1","ts":"1","channel":"USER","type":"MESSAGE","payload":"x"}'
    grants = [credit.consume(decode(message % index), written_seq=0) for index in range(4)]
    assert [grant and grant["add_messages"] for grant in grants] == [None, 2, None, 2]
    credit.granted(7, grants[1] or {})
    with pytest.raises(ProtocolError) as refused:
        credit.consume(decode(message % "over"), written_seq=6)  # the top-up is not written yet
    assert refused.value.code is ErrorCode.FLOW_CONTROL_VIOLATION and refused.value.related_id == "over"
    assert credit.consume(decode(message % "ok"), written_seq=7) is None  # read: its credit counts
    ping = '{"id":"p","session":"","seq":"1","ts":"1","channel":"USER","type":"PING","payload":{}}'
    assert credit.consume(decode(ping), written_seq=0) is None  # a PING always gets through


# --- whole connections over the in-memory pair --------------------------------------------------


@asynccontextmanager
async def memory_client(runtime: Runtime, user: str = "alice", **hai: Any) -> AsyncIterator[MemoryClient]:
    transport = MemoryTransport()
    client = MemoryClient(transport.peer)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.serve, transport)
        tg.start_soon(client.run)
        await client.receive()
        await client.hai(runtime.authenticator.issue(user), accept_events=list(ALL_EVENTS), **hai)
        await client.receive_type("INFO")
        yield client
        await transport.peer.aclose()
    client.aclose()


async def test_a_paused_member_gets_nothing_of_the_channel_while_another_member_carries_on() -> None:
    async with Runtime(make_config()) as runtime, memory_client(runtime) as paused, memory_client(runtime) as other:
        await paused.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await paused.receive_type("TRANSACTION_START"))["transaction"]
        await other.send("TRANSACTION_JOIN", {}, transaction=tx)
        await other.receive_type("TRANSACTION_JOIN")
        await paused.send("PAUSE_CHANNEL", {"channel": "AGENT"})
        await paused.send("MESSAGE", {"text": "hi"}, transaction=tx, channel="USER")
        await other.receive_type("RUN_FINISHED")  # the agent was not slowed: its whole answer is out
        await paused.send("PING", {"nonce": "after"})
        before: list[dict[str, Any]] = []
        while (envelope := await paused.receive())["type"] != "PONG":
            before.append(envelope)
        await paused.send("RESUME_CHANNEL", {"channel": "AGENT"})
        after = [await paused.receive() for _ in range(5)]
    assert not [envelope for envelope in before if envelope["channel"] == "AGENT"]
    assert [e["type"] for e in after] == ["RUN_STARTED", "MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "RUN_FINISHED"]
    assert [int(e["seq"]) for e in after] == list(range(int(envelope["seq"]) + 1, int(envelope["seq"]) + 6))
    assert after[2]["payload"]["text"] == "you said: hi"


async def test_the_clients_credit_counts_once_it_sent_a_flow_update() -> None:
    caps: dict[str, Any] = {"capabilities": {"flow_control": {"initial_credit_messages": 1}}}
    async with Runtime(make_config()) as runtime, memory_client(runtime, **caps) as client:
        await client.send("FLOW_UPDATE", {"channel": "AGENT", "add_messages": 0})
        await client.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await client.receive_type("TRANSACTION_START"))["transaction"]
        await client.send("MESSAGE", {"text": "hi"}, transaction=tx, channel="USER")
        started = await client.receive_type("RUN_STARTED")  # its one credit on AGENT
        await client.send("FLOW_UPDATE", {"channel": "AGENT", "add_messages": 10, "add_bytes": 100_000})
        rest = [(await client.receive())["type"] for _ in range(4)]
    assert started["channel"] == "AGENT"
    assert rest == ["MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "RUN_FINISHED"]


def test_a_client_cannot_make_the_runtime_keep_credit_for_endless_channels() -> None:
    session, _ = attached()
    for index in range(MAX_CHANNELS):
        session.pause(f"c{index}")
        session.grant(f"c{index}", 1, 1)
    for action in (session.pause, lambda channel: session.grant(channel, 1, 1)):
        with pytest.raises(ProtocolError) as refused:
            action("one-more")
        assert refused.value.code is ErrorCode.INVALID_PAYLOAD
    credit = InboundCredit(FlowControlConfig())
    message = '{"id":"%s","session":"","seq":"1","ts":"1","channel":"%s","type":"MESSAGE","payload":"x"}'
    for index in range(MAX_CHANNELS):
        credit.consume(decode(message % (index, f"c{index}")), written_seq=0)
    with pytest.raises(ProtocolError) as dropped:
        credit.consume(decode(message % ("x", "one-more")), written_seq=0)
    assert dropped.value.code is ErrorCode.FLOW_CONTROL_VIOLATION and dropped.value.related_id == "x"
