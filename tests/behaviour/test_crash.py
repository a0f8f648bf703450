"""One ``haip-runtime serve`` killed (SIGKILL) mid-turn, then started again on its SQLite file: what an
operator found (the turn stayed "streaming" in the history for ever; the session's RESUME_FAILED said
nothing to rejoin), now ended ``NODE_LOST`` and told."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest

from haip_runtime.client import HaipClient, Received
from tests.behaviour.test_cluster_limits import until
from tests.support.raw import raw_peer
from tests.support.serving import ROOT, ServeProcess, serve_process

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


@asynccontextmanager
async def answered_once(served: ServeProcess) -> AsyncIterator[tuple[HaipClient, str]]:
    """A client of ``served`` in a conversation with the patient agent, its first message answered."""
    url, token = served.banner["WebSocket"].split()[0], served.banner["token"]
    async with HaipClient(url, token=token, reconnect=False) as client:
        tx = await client.start_transaction("patient")
        await client.send_text(tx, "first")
        await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx, timeout=20)
        yield client, tx


def slow_writer(folder: Path) -> list[str]:
    """``serve`` on a SQLite store that writes every 3 s: what members get stays unstored a while."""
    command = serve(folder)
    toml = folder / "haip.toml"
    toml.write_text(toml.read_text().replace("flush_interval_seconds = 0.005", "flush_interval_seconds = 3"))
    return command


async def test_numbers_members_saw_unstored_are_not_given_again_after_a_crash(tmp_path: Path) -> None:
    """What an operator found: the store writes in batches, so events members got in the last moments
    before a SIGKILL were never stored, and after the restart their tseqs went to new events; a client
    rejoining from the last tseq it saw then missed the answer numbered there. The record reserves
    numbers ahead: after a crash, numbering goes on past them (a gap), and history before it is kept."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with serve_process(slow_writer(tmp_path), cwd=tmp_path, env=env) as first:
        async with answered_once(first) as (client, tx):
            await until(lambda: written(first.banner["health"]), timeout=20)  # that much is stored
            stored = client.transactions[tx]
            await client.send_text(tx, "second")  # these events reach the client, not the file
            await client.wait_for(lambda e: e.type == "RUN_FINISHED" and (e.tseq or 0) > stored + 1, timeout=20)
            seen = client.transactions[tx]
            assert not await written(first.banner["health"])  # (the writer waits 3 s: still queued)
            first.process.kill()
            first.process.wait(timeout=10)
    assert seen > stored
    with serve_process(serve(tmp_path), cwd=tmp_path, env=env) as again:
        url, token = again.banner["WebSocket"].split()[0], again.banner["token"]
        async with HaipClient(url, token=token) as client:
            await client.join(tx, since=seen)  # where a client that saw "second" rejoins from
            await client.send_text(tx, "third")
            answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "third" in str(e.get("text")))
        async with HaipClient(url, token=token) as reader:
            await reader.join(tx, since=0)
            await reader.wait_for(lambda e: e.type == "MESSAGE_PART" and "third" in str(e.get("text")))
            history = [(e.tseq or 0, e.type, e.get("text")) for e in reader.received if e.transaction == tx and e.tseq]
    assert (answer.tseq or 0) > seen
    assert ("you said: first" in [text for _, _, text in history]) and history[0][0] == 1  # the stored start kept
    assert "you said: second" not in [text for _, _, text in history]  # (lost with the crash, as documented)
    assert [tseq for tseq, _, _ in history] == sorted({tseq for tseq, _, _ in history})


async def test_a_clean_restart_numbers_on_without_a_gap(tmp_path: Path) -> None:
    """Stopped as Ctrl-C does, a transaction gives its reservation back: numbering goes on from its last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with serve_process(serve(tmp_path), cwd=tmp_path, env=env) as first:
        async with answered_once(first) as (client, tx):
            before = client.transactions[tx]
            first.process.send_signal(signal.SIGINT)  # with its member still there
            first.process.wait(timeout=15)
    with serve_process(serve(tmp_path), cwd=tmp_path, env=env) as again:
        url, token = again.banner["WebSocket"].split()[0], again.banner["token"]
        async with HaipClient(url, token=token) as client:
            await client.join(tx, since=before)
            await client.send_text(tx, "second")
            await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx, timeout=20)
        async with httpx2.AsyncClient() as http:
            history = again.banner["history"].split()[0]
            answer = await http.get(f"{history}/{tx}/events", headers={"Authorization": f"Bearer {token}"})
    numbers = [event["tseq"] for event in answer.json()["events"]]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers[-1] > before


async def test_a_clean_stop_with_a_members_own_tool_call_waiting_gives_the_reservation_back(tmp_path: Path) -> None:
    """A reviewer's find: the stop put the conversation away, then the cancelled call published its
    TOOL_DONE, which reserved again: the next start took the clean stop for a crash (a gap, a warning)."""
    import sqlite3

    from tests.behaviour.test_sharing import approving_config
    from tests.support.serving import live_server

    config = approving_config(tmp_path / "haip.db")
    with live_server(config) as first:
        async with HaipClient(first.ws_url, token=first.token("dana")) as client:
            tx = await client.start_transaction("operator")
            await client.send("TOOL_CALL", {"tool": "team.word_count", "params": {"text": "one two"}}, transaction=tx)
            await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
    with sqlite3.connect(tmp_path / "haip.db") as db:
        last, reserved = db.execute("SELECT last_tseq, reserved_tseq FROM transactions WHERE id = ?", (tx,)).fetchone()
        done = db.execute("SELECT count(*) FROM events WHERE tx = ? AND body LIKE '%TOOL_DONE%'", (tx,)).fetchone()
    assert done == (1,) and reserved == last  # the call's end is stored, and nothing is reserved past it


async def test_a_conversation_brought_back_has_its_reservation_stored_before_its_first_event(tmp_path: Path) -> None:
    """A reviewer's find: brought back (after an idle spell or a clean stop), its new reservation went in
    the same batch as its first events: killed before that batch, those numbers were given again."""
    import sqlite3

    from haip_runtime.agents.registry import load_agents
    from haip_runtime.auth.tokens import Principal
    from haip_runtime.config.models import TransactionsConfig
    from haip_runtime.conversation.registry import TransactionRegistry
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.protocol.envelope import Event
    from haip_runtime.store import SqliteStore
    from tests.support.serving import make_config

    agents = load_agents(make_config({"agents": {"waiting": {"plugin": "tests.support.agents:WaitingAgent"}}}))
    async with SqliteStore(tmp_path / "haip.db", flush_interval=5) as store:
        transactions = TransactionRegistry(TransactionsConfig(), agents, store, lambda *a: None)
        transaction = transactions.new("ann", None)
        transactions.add(transaction)
        transaction.publish(Event("INFO", {"n": 1}))
        transactions.evict(transaction)  # put away: its reservation given back
        await store.flush()
        back = await transactions.find(transaction.id, Principal("ann"))
        assert isinstance(back, Transaction)
        with sqlite3.connect(tmp_path / "haip.db") as db:  # what a process killed now would find
            (reserved,) = db.execute("SELECT reserved_tseq FROM transactions WHERE id = ?", (back.id,)).fetchone()
        back.publish(Event("INFO", {"n": 2}))
    assert reserved > back.tseq


async def test_a_message_unacknowledged_when_the_server_restarts_is_answered_once(tmp_path: Path) -> None:
    """A tester's finds (a phone on a stalled line while the server restarted): the Python client dropped
    a message it had sent and never had acknowledged (the new session's window began empty), and the
    playground's client, which sends such messages again, had one the server had already answered
    answered twice. The clients name their messages (message_id), send the unacknowledged ones again
    after the rejoin, and the runtime takes a message it already has from that author once."""
    from tests.support.netcut import netcut
    from tests.support.ports import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command() -> list[str]:
        argv = serve(tmp_path)
        toml = tmp_path / "haip.toml"
        toml.write_text(toml.read_text().replace("port = 0", f"port = {port}"))
        return argv

    def answered(text: str) -> Callable[[Received], bool]:
        return lambda e: e.type == "MESSAGE_PART" and e.get("text") == f"you said: {text}"

    states: list[str] = []
    with netcut(port) as line:
        with serve_process(command(), cwd=tmp_path, env=env) as first:
            token = first.banner["token"]
            url = f"ws://127.0.0.1:{line.port}/haip/websocket"
            client = HaipClient(url, token=token, reconnect=30, on_connection=states.append)
            await client.__aenter__()
            tx = await client.start_transaction("patient")
            m1 = await client.send_text(tx, "m1")
            await client.wait_for(answered("m1"), timeout=20)
            line.cut("hang")  # the line stalls: what is sent now reaches nobody, nothing is acknowledged
            await client.send_text(tx, "m2")
        try:
            with serve_process(command(), cwd=tmp_path, env=env) as again:
                line.heal()
                await client.wait_for(answered("m2"), timeout=30)
                # m1 again, as a client sends what it cannot know was taken (the server had answered it)
                await client.send("MESSAGE", {"text": "m1", "message_id": m1}, transaction=tx, channel="USER")
                await client.send_text(tx, "m3")
                await client.wait_for(answered("m3"), timeout=20)
                async with httpx2.AsyncClient() as http:
                    history = again.banner["history"].split()[0]
                    answer = await http.get(f"{history}/{tx}/messages", headers={"Authorization": f"Bearer {token}"})
        finally:
            await client.__aexit__(None, None, None)
    said = [message["text"] for message in answer.json()["messages"] if message["role"] == "user"]
    answers = [message["text"] for message in answer.json()["messages"] if message["role"] == "agent"]
    assert said == ["m1", "m2", "m3"] and answers == [f"you said: {text}" for text in said] and "restarted" in states
    assert not [e for e in client.received if e.type == "ERROR" and e.get("code") != "RESUME_FAILED"]
