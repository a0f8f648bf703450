"""Faults 5 and 11: the SQLite file itself.

5. Two runtimes on one SQLite file both started and overwrote each other's events (37 of 130
   lost). Now the second refuses to start, in one line naming the process that holds the file.
11. A damaged page was not noticed at start, and REST on an affected transaction answered a
   plain-text 500. Now start-up refuses a damaged file in one line, and damage met later answers
   ``STORAGE_ERROR`` as JSON and marks ``/health`` degraded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from tests.faults.conftest import sqlite_config
from tests.support.damage import damage
from tests.support.peers import open_peer
from tests.support.serving import ROOT, LiveServer, live_server

pytestmark = pytest.mark.anyio


def serve(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``haip-runtime serve`` on the SQLite file ``path``, as a process of its own."""
    config = tmp_path / "haip.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n[storage]\nbackend = "sqlite"\npath = "{path}"\n'
        '[agents.echo]\nplugin = "echo"\n'
    )
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


async def fill_one_conversation(live: LiveServer, user: str) -> str:
    token = live.token(user)
    async with open_peer("websocket", live, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = str((await peer.receive_type("TRANSACTION_START"))["transaction"])
        for n in range(60):
            await peer.send("MESSAGE", f"line {n} " + "z" * 400, transaction=tx, channel="USER")
            await peer.receive_type("MESSAGE")
    return tx


def test_fault_5_a_second_runtime_on_one_sqlite_file_refuses_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "haip.db"
    with live_server(sqlite_config(path)):
        second = serve(path, tmp_path)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"haip-runtime: storage.path: {str(path)!r} is in use by another haip-runtime "
        f"(pid {os.getpid()}, lock {str(path) + '.lock'!r}); one process per SQLite file"
    ]


async def test_fault_11_damage_is_refused_at_start_and_answered_as_storage_error_later(tmp_path: Path) -> None:
    path = tmp_path / "haip.db"
    with live_server(sqlite_config(path)) as first:
        tx = await fill_one_conversation(first, "ida")
    with live_server(sqlite_config(path)) as live:  # intact at start; damaged while it runs
        damage(path)
        async with httpx2.AsyncClient() as http:
            answer = await http.get(
                f"{live.http_url}/haip/transactions/{tx}/events",
                params={"limit": 1000},
                headers={"authorization": f"Bearer {live.token('ida')}"},
            )
            health = (await http.get(f"{live.http_url}/health")).json()
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "STORAGE_ERROR"
    assert health["status"] == "degraded" and health["storage"]["state"] == "damaged"
    refused = serve(path, tmp_path)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "damaged" in refused.stderr and str(path) in refused.stderr
