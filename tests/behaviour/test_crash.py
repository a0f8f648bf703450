"""One ``haip-runtime serve`` killed (SIGKILL) mid-turn, then started again on its SQLite file: what an
operator found (the turn stayed "streaming" in the history for ever; the session's RESUME_FAILED said
nothing to rejoin), now ended ``NODE_LOST`` and told."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx2
import pytest

from haip_runtime.client import HaipClient
from tests.behaviour.test_cluster_limits import until
from tests.support.raw import raw_peer
from tests.support.serving import ROOT, serve_process

pytestmark = pytest.mark.anyio


def serve(folder: Path) -> list[str]:
    (folder / "haip.toml").write_text(
        "[server]\nport = 0\n"
        '[storage]\nbackend = "sqlite"\npath = "haip.db"\nflush_interval_seconds = 0.005\n'
        '[agents.patient]\nplugin = "tests.support.agents:PatientAgent"\n'
    )
    return [sys.executable, "-m", "haip_runtime", "serve", "--config", str(folder / "haip.toml")]


async def written(health: str) -> bool:
    """Whether the server's store has written everything it was given (``/health``)."""
    async with httpx2.AsyncClient() as http:
        return bool((await http.get(health)).json()["storage"]["pending_writes"] == 0)


async def test_a_server_killed_mid_turn_ends_the_turn_lost_and_tells_the_session_what_to_rejoin(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with serve_process(serve(tmp_path), cwd=tmp_path, env=env) as first:
        url, token = first.banner["WebSocket"].split()[0], first.banner["token"]
        async with HaipClient(url, token=token, reconnect=False) as client:
            tx = await client.start_transaction("patient")
            await client.send_text(tx, "wait")
            await client.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "waiting", timeout=20)
            session = str(client.session_id)
            await until(lambda: written(first.banner["health"]))
            first.process.kill()  # SIGKILL: nothing ends the turn, nothing saves the session on the way out
            first.process.wait(timeout=10)
    with serve_process(serve(tmp_path), cwd=tmp_path, env=env) as again:
        url, token = again.banner["WebSocket"].split()[0], again.banner["token"]
        async with raw_peer(url) as peer:
            await peer.receive()  # the server's HAI
            await peer.hai(token, session=session, last_rx_seq="3")
            refused = await peer.receive_type("ERROR", timeout=10)
        async with HaipClient(url, token=token) as client:
            await client.join(tx, since=0)
            ended = await client.wait_for(lambda e: e.type == "RUN_ERROR" and e.transaction == tx, timeout=10)
            log = [e.type for e in client.received if e.transaction == tx and e.tseq]
            await client.send_text(tx, "hello again")
            answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "hello again" in str(e.get("text")))
    detail = refused["payload"]["detail"]
    assert refused["payload"]["code"] == "RESUME_FAILED"
    assert detail["reason"] == "restarted" and detail["transactions"] == [tx]
    assert ended.get("code") == "NODE_LOST" and "the server stopped" in str(ended.get("message"))
    assert log[-2:] == ["MESSAGE_END", "RUN_ERROR"]  # the answer cut short, then the turn lost
    assert answer.get("text") == "you said: hello again"
