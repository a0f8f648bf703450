"""Fault 4: disk full lost history silently (400 messages echoed, 85 stored; clients told nothing,
``/health`` said ``ok``). Now members are told ``STORAGE_UNAVAILABLE``, ``/health`` is ``degraded``
with the storage state, ``/metrics`` counts the failures, the writes wait and are retried, and once
the disk has room again every one of them is stored.

The disk fills for real: SQLite's ``max_page_count`` on the server's own writer connection makes
the next write fail with ``SQLITE_FULL``, exactly as a full filesystem does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from tests.faults.conftest import sqlite_config
from tests.support.peers import open_peer
from tests.support.serving import LiveServer, live_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(sqlite_config(tmp_path / "haip.db")) as server:
        yield server


def set_max_pages(live: LiveServer, pages: int | None) -> None:
    """Cap the database at its current size (``None``: lift the cap), on the writer's connection."""
    writer = live.runtime.store._writer  # type: ignore[attr-defined]
    if pages is None:
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")


async def health(http: httpx2.AsyncClient, live: LiveServer) -> dict[str, Any]:
    answer: dict[str, Any] = (await http.get(f"{live.http_url}/health")).json()
    return answer


async def test_fault_4_disk_full_is_reported_retried_and_nothing_is_lost(live: LiveServer) -> None:
    token = live.token("dora")
    async with httpx2.AsyncClient() as http, open_peer("websocket", live, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        events = f"{live.http_url}/haip/transactions/{tx}/events"
        assert (await http.get(events, headers={"authorization": f"Bearer {token}"})).status_code == 200  # stored
        set_max_pages(live, None)  # the disk is full from now on
        texts = [f"message {n} " + "x" * 2000 for n in range(40)]
        errors = []
        for text in texts:
            await peer.send("MESSAGE", text, transaction=tx, channel="USER")
            while (envelope := await peer.receive())["type"] != "MESSAGE":  # its echo: one turn at a time
                errors += [envelope] if envelope["type"] == "ERROR" else []
        while not errors:
            envelope = await peer.receive(timeout=10)
            errors += [envelope] if envelope["type"] == "ERROR" else []
        degraded = await health(http, live)
        metrics = (await http.get(f"{live.http_url}/metrics")).text
        with anyio.fail_after(5):  # a reader is answered with what is stored, not kept waiting
            during = await http.get(
                f"{live.http_url}/haip/transactions/{tx}/events", headers={"authorization": f"Bearer {token}"}
            )
        set_max_pages(live, 1_000_000)  # room again
        back = await peer.receive_type("INFO", timeout=15)  # after the writer's next retry
        stored = await http.get(
            f"{live.http_url}/haip/transactions/{tx}/events",
            params={"limit": 1000},
            headers={"authorization": f"Bearer {token}"},
        )
        recovered = await health(http, live)
    assert len(errors) == 1  # told once per outage, not once per write
    assert errors[0]["payload"]["code"] == "STORAGE_UNAVAILABLE" and errors[0]["transaction"] == tx
    assert "full" in errors[0]["payload"]["message"]
    assert degraded["status"] == "degraded" and "full" in degraded["degraded"]["storage"]
    assert degraded["storage"]["state"] == "unavailable" and degraded["storage"]["write_failures"] >= 1
    assert "haip_storage_up 0.0" in metrics and 'haip_storage_writes_failed_total{type="batch_failed"}' in metrics
    assert during.status_code == 200
    users = [e["payload"]["text"] for e in stored.json()["events"] if e["type"] == "MESSAGE"]
    assert users == texts  # every message waited and was stored once the disk had room
    assert back["payload"] == {"event": "storage", "state": "ok"} and back["transaction"] == tx
    assert (
        recovered["status"] == "ok"
        and recovered["storage"]["writes_lost"] == 0
        and recovered["storage"]["writes_dropped"] == 0
    )
