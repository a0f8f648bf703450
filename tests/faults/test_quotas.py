"""Fault 9: ``limits.transactions_per_user`` counted only transactions in memory. After a user's
100 went idle and left memory, the same user opened 100 more (200 open in REST). Now the quota
counts every open transaction the user owns, from the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


async def test_fault_9_transactions_that_left_memory_still_count_against_the_quota(live: LiveServer) -> None:
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
        refused = await start(peer)
    assert [e["type"] for e in first] == ["TRANSACTION_START"] * QUOTA
    assert refused["type"] == "ERROR" and refused["payload"]["code"] == "RATE_LIMITED"
    assert refused["payload"]["detail"] == {"limit": "limits.transactions_per_user"}
