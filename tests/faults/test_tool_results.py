"""Fault 10: a 10 MB tool result became one 20 MB ``TOOL_DONE`` frame (text plus
``structuredContent``), twenty times the inbound frame limit, stored whole. Now a result over
``[mcp.servers.<name>] max_result_bytes`` (1 MiB by default) reaches members cut, with a note
saying how much was cut, within a frame a default WebSocket client (1 MiB) can receive; the store
keeps the same cut result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest

from haip_runtime.protocol.events import ALL_EVENTS
from tests.faults.conftest import sqlite_config
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    servers = {"huge": {"transport": "python", "server": "tests.support.python_servers:huge"}}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["huge"]}}
    with live_server(sqlite_config(tmp_path / "haip.db", agents=agents, mcp={"servers": servers})) as server:
        yield server


async def test_fault_10_a_10_mb_tool_result_is_cut_to_the_limit_with_a_note(live: LiveServer) -> None:
    token = live.token("tom")
    async with raw_peer(live.ws_url, max_size=MIB) as peer:  # what a default websockets client takes
        await peer.hai(token, accept_events=list(ALL_EVENTS))
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        while "huge.blob" not in {t["name"] for t in (await peer.receive_type("TOOL_LIST", 15))["payload"]["tools"]}:
            pass
        await peer.send("MESSAGE", {"text": '/call huge.blob {"megabytes": 10}'}, transaction=tx, channel="USER")
        done = await peer.receive_type("TOOL_DONE", timeout=30)
        said = await peer.receive_type("MESSAGE_PART", timeout=10)  # the connection took it all and goes on
    async with httpx2.AsyncClient() as http:
        stored = await http.get(
            f"{live.http_url}/haip/transactions/{tx}/events",
            params={"limit": 1000},
            headers={"authorization": f"Bearer {token}"},
        )
    result = done["payload"]["result"]
    *kept, note = result["content"]
    assert done["payload"]["status"] == "OK" and result["structuredContent"] is None
    assert note["text"].startswith("[result cut: ") and "mcp.servers.huge.max_result_bytes" in note["text"]
    assert MIB - 8192 < len(kept[0]["text"]) < MIB and kept[0]["text"].count("b") > MIB - 8192
    assert said["payload"]["text"].startswith("huge.blob returned")
    [stored_done] = [e for e in stored.json()["events"] if e["type"] == "TOOL_DONE"]
    assert stored_done["payload"]["result"] == result


@asynccontextmanager
async def operator_within(tmp_path: Path, protocol_mode: str = "auto") -> AsyncIterator[tuple[RawPeer, str]]:
    """The operator agent with the ``huge`` server, on a server whose frame limit is 64 KiB, and a client that
    holds to it (a larger frame closes it 1009): (the client, its transaction), once the tools are listed."""
    huge = {"transport": "python", "server": "tests.support.python_servers:huge", "protocol_mode": protocol_mode}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["huge"]}}
    config = sqlite_config(tmp_path / "haip.db", agents=agents, mcp={"servers": {"huge": huge}})
    small = config.model_copy(update={"server": config.server.model_copy(update={"max_frame_bytes": 64 * 1024})})
    with live_server(small) as server:
        async with raw_peer(server.ws_url, max_size=64 * 1024) as peer:
            await peer.hai(server.token("tom"), accept_events=list(ALL_EVENTS))
            await peer.receive_type("INFO")
            await peer.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
            tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
            listed: set[str] = set()
            while "huge.loud_question" not in listed:
                listed = {t["name"] for t in (await peer.receive_type("TOOL_LIST", 15))["payload"]["tools"]}
            yield peer, tx


async def test_a_result_is_cut_to_the_frame_limit_when_that_is_the_smaller(tmp_path: Path) -> None:
    """``max_result_bytes`` (1 MiB) over ``server.max_frame_bytes`` (64 KiB): the TOOL_DONE frame still fits the
    frame limit the server's HAI advertises, and the agent's answer quoting it too."""
    async with operator_within(tmp_path) as (peer, tx):
        await peer.send("MESSAGE", {"text": '/call huge.blob {"megabytes": 1}'}, transaction=tx, channel="USER")
        done = await peer.receive_type("TOOL_DONE", timeout=30)
        finished = await peer.receive_type("RUN_FINISHED", timeout=10)  # the connection took it all
    note = done["payload"]["result"]["content"][-1]["text"]
    assert note.startswith("[result cut: ") and "server.max_frame_bytes" in note
    assert finished["payload"]["status"] == "OK"


async def test_a_servers_long_progress_and_question_reach_members_within_the_frame(tmp_path: Path) -> None:
    """A tester's find: a 100,000-character progress message (and question) went out as one frame past
    ``server.max_frame_bytes`` (64 KiB here), closing a client holding to it, again at every resume."""
    async with operator_within(tmp_path, "legacy") as (peer, tx):
        await peer.send("MESSAGE", {"text": "/call huge.loud_progress {}"}, transaction=tx, channel="USER")
        progress = await peer.receive_type("TOOL_UPDATE", timeout=30)
        while "progress" not in progress["payload"]:
            progress = await peer.receive_type("TOOL_UPDATE", timeout=30)
        await peer.receive_type("RUN_FINISHED", timeout=10)
        await peer.send("MESSAGE", {"text": "/call huge.loud_question {}"}, transaction=tx, channel="USER")
        asked = await peer.receive_type("TOOL_UPDATE", timeout=30)
        while asked["payload"].get("status") != "INPUT_REQUIRED":
            asked = await peer.receive_type("TOOL_UPDATE", timeout=30)
    assert progress["payload"]["message"] == "P" * 1024 + " …"
    assert asked["payload"]["status"] == "INPUT_REQUIRED" and asked["payload"]["request"]["message"].endswith("Q …")
