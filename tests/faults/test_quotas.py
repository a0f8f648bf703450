"""Fault 9: ``limits.transactions_per_user`` counted only transactions in memory. After a user's
100 went idle and left memory, the same user opened 100 more (200 open in REST). Now the quota
counts every open transaction the user owns, from the store.

And at the limit, the user's least recently active transaction with nobody in it and nothing running
ends to make room for the new one (as a new session replaces the user's oldest disconnected one):
clients that never end what they start (the reference CLI, MCP and AG-UI callers) were otherwise
refused for good at their 101st, across restarts. A user whose transactions all have someone in
them is still refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from haip_runtime.hub.lifecycle import REPLACED
from tests.faults.conftest import sqlite_config
from tests.support.logwait import waiting_for_log
from tests.support.peers import open_peer
from tests.support.serving import LiveServer, live_server

pytestmark = pytest.mark.anyio
QUOTA = 3


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    config = sqlite_config(
        tmp_path / "haip.db",
        limits={"transactions_per_user": QUOTA},
        session={"resume_timeout_seconds": 0.2},
        transactions={"idle_seconds": 0.2},
    )
    with live_server(config) as server:
        yield server


async def start(peer: Any) -> dict[str, Any]:
    await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
    envelope: dict[str, Any] = await peer.receive()
    while envelope["type"] not in ("TRANSACTION_START", "ERROR"):
        envelope = await peer.receive()
    return envelope


async def listed(live: LiveServer, token: str) -> dict[str, dict[str, Any]]:
    """The user's transactions as the REST history lists them, by id."""
    async with httpx2.AsyncClient() as http:
        answer = await http.get(f"{live.http_url}/haip/transactions", headers={"authorization": f"Bearer {token}"})
    return {record["id"]: record for record in answer.json()["transactions"]}


async def test_fault_9_transactions_that_left_memory_still_count_and_the_oldest_gives_way(live: LiveServer) -> None:
    token = live.token("quinn")
    with waiting_for_log("left memory (idle)") as evicted:
        async with open_peer("websocket", live, token) as peer:
            await peer.receive()
            await peer.hai(token)
            await peer.receive_type("INFO")
            first = [await start(peer) for _ in range(QUOTA)]
        await evicted.wait(QUOTA)  # the session expired, and its transactions left memory, still open
    async with open_peer("websocket", live, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        with waiting_for_log("ends to make room") as replaced:
            another = await start(peer)
            await replaced.wait(1)
        records = await listed(live, token)
    oldest = first[0]["transaction"]
    assert [e["type"] for e in first] == ["TRANSACTION_START"] * QUOTA and another["type"] == "TRANSACTION_START"
    assert [r["state"] for r in records.values()].count("open") == QUOTA  # never more than the quota open
    assert records[oldest]["state"] == "ended" and records[oldest]["end_reason"] == REPLACED
    assert records[another["transaction"]]["state"] == "open"


async def test_a_transaction_its_client_left_without_ending_gives_way_while_still_in_memory(tmp_path: Path) -> None:
    """The reference CLI's way: start, talk, close the socket (1006), never TRANSACTION_END."""
    config = sqlite_config(
        tmp_path / "haip.db",
        limits={"transactions_per_user": QUOTA},
        session={"resume_timeout_seconds": 0.2},
        transactions={"idle_seconds": 300},
    )
    with live_server(config) as live:
        token = live.token("rita")
        with waiting_for_log("not resumed within") as expired:
            async with open_peer("websocket", live, token) as peer:
                await peer.receive()
                await peer.hai(token)
                await peer.receive_type("INFO")
                first = [(await start(peer))["transaction"] for _ in range(QUOTA)]
            await expired.wait(1)  # (0.2 s): its transactions have nobody in them, and stay in memory
        assert all(not live.runtime.hub.transactions.live[tx].members for tx in first)
        async with open_peer("websocket", live, token) as peer:
            await peer.receive()
            await peer.hai(token)
            await peer.receive_type("INFO")
            another = await start(peer)
            again = [await start(peer) for _ in range(QUOTA - 1)]  # each ends the next oldest
            refused = await start(peer)  # now every open one has this session in it
        records = await listed(live, token)
    assert another["type"] == "TRANSACTION_START" and [e["type"] for e in again] == ["TRANSACTION_START"] * 2
    assert [records[tx]["end_reason"] for tx in first] == [REPLACED] * QUOTA
    assert refused["type"] == "ERROR" and refused["payload"]["code"] == "RATE_LIMITED"
    assert refused["payload"]["detail"] == {"limit": "limits.transactions_per_user"}
    assert "none is idle" in refused["payload"]["message"]
