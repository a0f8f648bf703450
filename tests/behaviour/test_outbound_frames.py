"""No frame the runtime sends is larger than ``server.max_frame_bytes``, which its HAI advertises: an agent's
message is cut to what one frame holds (an agent author's find: a 2 MB ``turn.say`` went out as one
2 MB frame, and a client holding to the advertised limit was disconnected, again at every resume)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from haip_runtime.agents.api import CUT_NOTE
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

LIMIT = 16 * 1024
#: A client that takes no streamed parts: it gets each message whole, as one MESSAGE.
WHOLE = sorted(TRANSACTION_ERA_EVENTS - {"MESSAGE_START", "MESSAGE_PART", "MESSAGE_END"})


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    agents = {
        "loud": {"plugin": "tests.support.agents:LoudAgent"},
        "flood": {"plugin": "tests.support.agents:FloodAgent"},
    }
    with live_server(make_config({"server": {"max_frame_bytes": LIMIT}, "agents": agents})) as live:
        yield live


async def answer(peer: RawPeer, token: str, agent: str, text: str, accept: list[str] | None) -> list[dict[str, Any]]:
    """Start a conversation with ``agent``, say ``text``, and every envelope up to the run's end."""
    await peer.receive()
    if accept is None:
        await peer.hai(token)
    else:
        await peer.hai(token, accept_events=accept)
    await peer.receive_type("INFO")
    await peer.send("TRANSACTION_START", {"toolName": agent}, transaction="ref")
    started = await peer.receive_type("TRANSACTION_START")
    await peer.send("MESSAGE", text, transaction=started["transaction"], channel="USER")
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["type"] not in ("RUN_FINISHED", "RUN_ERROR", "MESSAGE"):
        seen.append(await peer.receive(timeout=15))
    return seen


@pytest.mark.parametrize("accept", [None, WHOLE], ids=["parts", "whole"])
@pytest.mark.parametrize(("agent", "text"), [("loud", "20000"), ("flood", "count=6 size=5000")])
async def test_an_agent_message_past_a_frame_is_cut_to_fit_one(
    server: LiveServer, agent: str, text: str, accept: list[str] | None
) -> None:
    async with raw_peer(server.ws_url, max_size=LIMIT) as peer:  # (closes 1009 on a larger frame)
        seen = await answer(peer, server.token(), agent, text, accept)
        await peer.send("PING", {"nonce": "still here"})
        pong = await peer.receive_type("PONG")
    said = "".join(
        e["payload"]["text"] if isinstance(e["payload"], dict) else e["payload"]
        for e in seen
        if e["type"] in ("MESSAGE_PART", "MESSAGE") and e.get("channel") != "USER"
    )
    assert said.endswith(CUT_NOTE) and said.count(CUT_NOTE) == 1
    assert pong["payload"]["nonce"] == "still here"
