"""Fault 9: ``limits.transactions_per_user`` counted only transactions in memory. After a user's
100 went idle and left memory, the same user opened 100 more (200 open in REST). Now the quota
counts every open transaction the user owns, from the store.

And at the limit, the user's least recently active transaction with nobody in it and nothing running
ends to make room for the new one (as a new session replaces the user's oldest disconnected one):
clients that never end what they start (the reference CLI, MCP and AG-UI callers) were otherwise
refused for good at their 101st, across restarts. A user whose transactions all have someone in
them is still refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
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


def quota_config(folder: Path, idle_seconds: float) -> Any:
    """SQLite, QUOTA open transactions a user, sessions resumable 0.2 s, transactions idle after ``idle_seconds``."""
    return sqlite_config(
        folder / "haip.db",
        limits={"transactions_per_user": QUOTA},
        session={"resume_timeout_seconds": 0.2},
        transactions={"idle_seconds": idle_seconds},
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(quota_config(tmp_path, idle_seconds=0.2)) as server:
        yield server


@asynccontextmanager
async def ready(live: LiveServer, token: str) -> AsyncIterator[Any]:
    """A WebSocket peer past its handshake (HAI, its INFO) as the user of ``token``."""
    async with open_peer("websocket", live, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        yield peer


async def start(peer: Any) -> dict[str, Any]:
    await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
    return await start_answer(peer)


async def listed(live: LiveServer, token: str) -> dict[str, dict[str, Any]]:
    """The user's transactions as the REST history lists them, by id."""
    async with httpx2.AsyncClient() as http:
        answer = await http.get(f"{live.http_url}/haip/transactions", headers={"authorization": f"Bearer {token}"})
    return {record["id"]: record for record in answer.json()["transactions"]}


async def test_fault_9_transactions_that_left_memory_still_count_and_the_oldest_gives_way(live: LiveServer) -> None:
    token = live.token("quinn")
    with waiting_for_log("left memory (idle)") as evicted:
        async with ready(live, token) as peer:
            first = [await start(peer) for _ in range(QUOTA)]
        await evicted.wait(QUOTA)  # the session expired, and its transactions left memory, still open
    async with ready(live, token) as peer:
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
    with live_server(quota_config(tmp_path, idle_seconds=300)) as live:
        token = live.token("rita")
        with waiting_for_log("not resumed within") as expired:
            async with ready(live, token) as peer:
                first = [(await start(peer))["transaction"] for _ in range(QUOTA)]
            await expired.wait(1)  # (0.2 s): its transactions have nobody in them, and stay in memory
        assert all(not live.runtime.hub.transactions.live[tx].members for tx in first)
        async with ready(live, token) as peer:
            another = await start(peer)
            again = [await start(peer) for _ in range(QUOTA - 1)]  # each ends the next oldest
            refused = await start(peer)  # now every open one has this session in it
        records = await listed(live, token)
    assert another["type"] == "TRANSACTION_START" and [e["type"] for e in again] == ["TRANSACTION_START"] * 2
    assert [records[tx]["end_reason"] for tx in first] == [REPLACED] * QUOTA
    assert refused["type"] == "ERROR" and refused["payload"]["code"] == "RATE_LIMITED"
    assert refused["payload"]["detail"] == {"limit": "limits.transactions_per_user"}
    assert "none can end to make room" in refused["payload"]["message"]


async def test_starts_at_once_at_the_limit_never_leave_more_than_the_limit_open(live: LiveServer) -> None:
    """Each start ends one idle transaction for itself: starts at the same moment, one at a time (a
    reviewer's finding: they all picked the same one, ended it once, and all went on: 14 open of 2)."""
    token = live.token("sid")
    with waiting_for_log("left memory (idle)") as evicted:
        async with ready(live, token) as peer:
            for _ in range(QUOTA):
                await start(peer)
        await evicted.wait(QUOTA)
    async with AsyncExitStack() as stack:
        peers = []
        for _ in range(QUOTA + 2):
            peer = await stack.enter_async_context(ready(live, token))
            peers.append(peer)
        for peer in peers:  # all sent before any answer is read
            await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        answers = [await start_answer(peer) for peer in peers]
        records = await listed(live, token)
    kinds = sorted(answer["type"] for answer in answers)
    assert kinds == ["ERROR"] * 2 + ["TRANSACTION_START"] * QUOTA  # the new ones each have someone in them
    assert [record["state"] for record in records.values()].count("open") == QUOTA


async def start_answer(peer: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = await peer.receive()
    while envelope["type"] not in ("TRANSACTION_START", "ERROR"):
        envelope = await peer.receive()
    return envelope
