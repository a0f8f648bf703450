"""Merging under pressure: while a connection's writer is still writing a frame (the peer or the
network is slower than the agent), the parts of one message that follow are merged into one."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.flow import MAX_MERGED_PART, MAX_MERGED_PARTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox
from tests.support import agents
from tests.support.raw import raw_peer
from tests.support.serving import live_server, make_config

pytestmark = pytest.mark.anyio

EVERYTHING: dict[str, Any] = {"accept_events": sorted(ALL_EVENTS)}


def attached() -> tuple[Session, Outbox]:
    session = Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig())
    outbox = Outbox(10_000)
    session.attach(outbox)
    return session, outbox


def part(text: str, message_id: str = "m") -> Event:
    return Event("MESSAGE_PART", {"message_id": message_id, "text": text}, channel="AGENT")


def summary(frame: str) -> tuple[int, str, str | None]:
    envelope = json.loads(frame)
    return int(envelope["seq"]), envelope["type"], envelope["payload"].get("text")


async def test_parts_sent_while_the_writer_is_busy_go_out_as_one_part_when_it_is_free() -> None:
    session, outbox = attached()
    frames = outbox.frames()
    session.deliver(Event("MESSAGE_START", {"message_id": "m", "author": "a"}, channel="AGENT"))
    assert summary(await anext(frames))[1] == "MESSAGE_START"  # the writer is writing it now
    for text in ("a", "b", "c"):
        session.deliver(part(text))
    assert session.last_seq == 1  # held, without a seq yet
    assert summary(await anext(frames)) == (2, "MESSAGE_PART", "abc")  # the writer came back for more
    session.deliver(part("d"))  # the writer is busy with the merged part: held again...
    session.deliver(Event("MESSAGE_END", {"message_id": "m"}, channel="AGENT"))  # ...until something else goes
    assert [summary(await anext(frames)) for _ in range(2)] == [(3, "MESSAGE_PART", "d"), (4, "MESSAGE_END", None)]


async def test_a_writer_that_keeps_up_gets_every_part_as_it_was_sent() -> None:
    session, outbox = attached()
    frames = outbox.frames()
    got = []
    for text in ("a", "b", "c"):
        session.deliver(part(text))
        got.append(summary(await anext(frames)))
    assert got == [(1, "MESSAGE_PART", "a"), (2, "MESSAGE_PART", "b"), (3, "MESSAGE_PART", "c")]


async def test_only_parts_of_one_message_merge_and_a_merged_part_stays_small() -> None:
    session, outbox = attached()
    frames = outbox.frames()
    session.deliver(part("first", "m1"))
    await anext(frames)  # busy from here on
    session.deliver(part("x", "m1"))
    session.deliver(part("y", "m2"))  # another message: the held part goes first
    session.deliver(part("z", "m2"))
    chunk = "q" * 1000
    for _ in range(MAX_MERGED_PART // 1000 + 5):
        session.deliver(part(chunk, "m3"))
    outbox.close()
    rest = [summary(frame) async for frame in frames]
    assert [(kind, text) for _, kind, text in rest[:2]] == [("MESSAGE_PART", "x"), ("MESSAGE_PART", "yz")]
    big = [text for _, _, text in rest[2:]]
    assert "".join(t or "" for t in big) == chunk * (MAX_MERGED_PART // 1000 + 5)
    assert len(big) == 2 and all(len(t or "") <= MAX_MERGED_PART + len(chunk) for t in big)
    assert [seq for seq, _, _ in rest] == list(range(2, 2 + len(rest)))


async def test_a_merged_part_holds_at_most_max_merged_parts_parts() -> None:
    session, outbox = attached()
    frames = outbox.frames()
    session.deliver(part("first"))
    await anext(frames)  # busy from here on
    for _ in range(MAX_MERGED_PARTS + 1):
        session.deliver(part("x"))
    outbox.close()
    assert [text for _, _, text in [summary(frame) async for frame in frames]] == ["x" * MAX_MERGED_PARTS, "x"]


async def test_a_part_held_when_the_connection_ends_waits_in_the_window_for_the_resume() -> None:
    session, outbox = attached()
    frames = outbox.frames()
    session.deliver(part("a"))
    await anext(frames)
    session.deliver(part("b"))
    session.detach(outbox)
    again = Outbox(10_000)
    session.attach(again, last_rx_seq=1)
    again.close()
    assert [summary(frame) async for frame in again.frames()] == [(2, "MESSAGE_PART", "b")]


async def test_a_client_that_reads_slowly_gets_merged_parts_not_1013() -> None:
    """20 MB streamed to a client that stops reading: its writer blocks on the socket and the parts
    merge, so its backlog stays far below ``max_buffered_messages`` (1000). Unmerged, the 20,000
    parts the socket buffers cannot take went past it, and the client was closed with 1013."""
    session = {"replay_window_bytes": 64 * 1024 * 1024}  # room for what the socket does not take
    server = {"max_frame_bytes": 32 * 1024 * 1024}  # a message is at most a frame: this one is 20 MB
    agents_ = {"flood": {"plugin": "tests.support.agents:FloodAgent"}}
    config = make_config({"agents": agents_, "session": session, "server": server})
    count, size = 20_000, 1000
    with live_server(config) as live:
        # max_queue=4: the client library stops reading the socket while four frames wait to be read.
        async with raw_peer(live.ws_url, max_queue=4, max_size=None) as peer:
            await peer.hai(live.token(), **EVERYTHING)
            await peer.receive_type("INFO")
            await peer.send("TRANSACTION_START", {"agent": "flood"})
            tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
            agents.FLOODED.clear()
            await peer.send("MESSAGE", {"text": f"count={count} size={size}"}, transaction=tx, channel="USER")
            assert await anyio.to_thread.run_sync(agents.FLOODED.wait, 60), "the agent never finished"
            parts, seqs = [], []
            while True:
                envelope = await peer.receive(timeout=30)
                seqs.append(int(envelope["seq"]))
                if envelope["type"] == "MESSAGE_PART":
                    parts.append(envelope["payload"]["text"])
                elif envelope["type"] == "MESSAGE_END":
                    break
    assert "".join(parts) == "".join(str(index).rjust(size, ".") for index in range(count))
    # What the socket buffers took went out part by part; what waited for the writer was merged.
    assert len(parts) < count and max(len(text) for text in parts) >= 10 * size
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
