"""A node dies (SIGKILL) mid-turn: the members on the other node get ``RUN_ERROR NODE_LOST``, and
their next message is answered there. Two ``haip-runtime serve`` processes, one real Redis, one
real PostgreSQL."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import redis.asyncio

from haip_runtime.client import ClientError, HaipClient
from tests.support.serving import ROOT, ServeProcess, serve_process

pytestmark = pytest.mark.anyio


@contextmanager
def node(
    redis: str,
    database: str,
    prefix: str,
    folder: Path,
    flush: float = 0.005,
    *,
    patient: bool = True,
    operator: bool = True,
) -> Iterator[ServeProcess]:
    """A node of the cluster (dev mode, the ``patient`` and ``operator`` agents, a tool that waits for a
    member's approval) as a process of its own; ``flush``: its store's batching interval; ``patient``,
    ``operator``: without one, a node configured unlike the others."""
    folder.mkdir()
    config = folder / "haip.toml"
    config.write_text(
        '[server]\nport = 0\n[storage]\nbackend = "postgres"\n'
        f'url = "{database}"\nflush_interval_seconds = {flush}\n'
        f'[cluster]\nredis_url = "{redis}"\nkey_prefix = "{prefix}"\nlease_seconds = 1.5\n'
        "heartbeat_seconds = 0.2\nnode_ttl_seconds = 2\n"
        + ('[agents.patient]\nplugin = "tests.support.agents:PatientAgent"\n' if patient else "")
        + ('[agents.operator]\nplugin = "operator"\nmcp_servers = ["made"]\n' if operator else "")
        + '[mcp.servers.made]\ntransport = "python"\nserver = "tests.support.python_servers:make_server"\n'
        'require_approval = ["hello"]\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config)]
    with serve_process(command, cwd=folder, env=env) as served:
        yield served


@contextmanager
def two_nodes(
    redis: str, database: str, prefix: str, folder: Path
) -> Iterator[tuple[ServeProcess, ServeProcess, str, str]]:
    """Nodes A and B, and their WebSocket URLs."""
    with ExitStack() as stack:
        a = stack.enter_context(node(redis, database, prefix, folder / "a"))
        b = stack.enter_context(node(redis, database, prefix, folder / "b"))
        url_a, url_b = (served.banner["WebSocket"].split()[0] for served in (a, b))
        yield a, b, url_a, url_b


async def test_a_turn_whose_node_dies_ends_with_node_lost_and_the_next_message_is_answered_elsewhere(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    with two_nodes(redis_url, postgres_url, prefix, tmp_path) as (a, b, url_a, url_b):
        async with HaipClient(url_b, token=b.banner["token"], timeout=20) as on_b:
            async with HaipClient(url_a, token=a.banner["token"], timeout=20) as on_a:
                tx = await on_a.start_transaction("patient")  # its turns run on A, where it started
                await on_b.join(tx)
                await on_b.send_text(tx, "wait")
                started = await on_b.wait_for("RUN_STARTED")
                await on_b.wait_for("MESSAGE_PART")  # the turn is under way on A
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(timeout=10)
            lost = await on_b.wait_for("RUN_ERROR")
            cut = [e for e in on_b.received if e.type in ("MESSAGE_START", "MESSAGE_END") and e.run_id == lost.run_id]
            await on_b.send_text(tx, "anyone there?")
            answered = await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and "anyone there?" in e.get("text", ""))
            finished = await on_b.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == answered.run_id)
            base = b.banner["health"].removesuffix("/health")
            headers = {"Authorization": f"Bearer {b.banner['token']}"}
            async with httpx2.AsyncClient(base_url=base, headers=headers) as http:
                stored = (await http.get(f"/haip/transactions/{tx}/events", params={"limit": 500})).json()["events"]
    assert lost.run_id == started.get("run_id") and lost.get("code") == "NODE_LOST"
    # Its message, cut short, ends before the run does (a tester: clients that show a message at its end
    # never showed this one).
    assert [e.type for e in cut] == ["MESSAGE_START", "MESSAGE_END"]
    assert cut[0].get("message_id") == cut[1].get("message_id")
    assert finished.get("status") == "OK"
    ends = [
        (e["type"], e["payload"].get("code") or e["payload"].get("status"))
        for e in stored
        if e["type"].startswith("RUN_") and e["type"] != "RUN_STARTED"
    ]
    assert ends[0] == ("RUN_ERROR", "NODE_LOST")  # in the durable log too, kept by the node that lived


async def test_a_node_without_the_conversations_agent_passes_messages_on_and_says_why_when_it_runs_the_turns(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """A tester's cluster of nodes configured differently: a member joined on the node that lacks the
    agent was told it had no agents, and their messages were never answered; that node then took the
    turns over when the other died, and nobody was answered, nor told why."""
    with ExitStack() as stack:
        a = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "a"))
        b = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "b", patient=False))
        url_a, url_b = (served.banner["WebSocket"].split()[0] for served in (a, b))
        # (the banner names each node: a tester could not tell which of them answered)
        assert a.banner["cluster"].startswith("node ") and f"(key_prefix '{prefix}')" in a.banner["cluster"]
        assert a.banner["cluster"] != b.banner["cluster"]
        async with HaipClient(url_b, token=b.banner["token"], timeout=20) as on_b:
            async with HaipClient(url_a, token=a.banner["token"], timeout=20) as on_a:
                tx = await on_a.start_transaction("patient")
                joined = await on_b.join(tx)
                assert joined.get("agents") == ["patient"]  # the transaction's, though B cannot run it
                await on_b.send_text(tx, "hello from b")
                await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and "hello from b" in e.get("text", ""))
                await on_b.send_text(tx, "wait")  # a turn under way on A...
                await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "waiting")
                a.process.send_signal(signal.SIGKILL)  # ...when A dies
                a.process.wait(timeout=10)
            lost = await on_b.wait_for("RUN_ERROR")  # B takes the turns over once nobody else can
            await on_b.send(
                "MESSAGE", {"text": "still there?", "message_id": "m-still"}, transaction=tx, channel="USER"
            )
            unqueued = await on_b.wait_for(lambda e: e.type == "INFO" and e.get("event") == "run.unqueued")
    assert lost.get("code") == "NODE_LOST"
    assert unqueued.get("message_id") == "m-still"
    assert "'patient' is not configured on the node running this conversation's turns" in unqueued.get("reason")


async def test_a_node_with_every_agent_gets_the_turns_back_from_one_that_lacks_some(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """A reviewer: once a node lacking the agent had taken the turns over (nobody else hosted the
    conversation), it kept them for good, and a full node joining later never answered."""
    with ExitStack() as stack:
        a = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "a"))
        b = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "b", patient=False))
        url_a, url_b = (served.banner["WebSocket"].split()[0] for served in (a, b))
        async with HaipClient(url_b, token=b.banner["token"], timeout=20) as on_b:
            async with HaipClient(url_a, token=a.banner["token"], timeout=20) as on_a:
                tx = await on_a.start_transaction("patient")
                await on_b.join(tx)
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(timeout=10)
            await on_b.send("MESSAGE", {"text": "anyone?", "message_id": "m-1"}, transaction=tx, channel="USER")
            await on_b.wait_for(lambda e: e.type == "INFO" and e.get("message_id") == "m-1")  # B runs the turns
            c = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "c"))  # a full node again
            url_c = c.banner["WebSocket"].split()[0]
            async with HaipClient(url_c, token=c.banner["token"], timeout=20) as on_c:
                await on_c.join(tx)  # C hosts it now, wants the turns, and B gives them (within a poll)
                node_c = c.banner["cluster"].split()[1].rstrip(",")
                lease = f"{prefix}:{{l:run:{tx}}}"
                async with redis.asyncio.Redis.from_url(redis_url) as bus:  # (no event tells a member)
                    with anyio.fail_after(15):  # (the lease's value: "<fence>:<node>:<token>")
                        while True:
                            if f":{node_c}:".encode() in (await bus.get(lease) or b""):
                                break
                            await anyio.sleep(0.05)
                await on_b.send_text(tx, "and now?")
                answer = await on_b.wait_for(
                    lambda e: e.type == "MESSAGE_PART" and "you said: and now?" in e.get("text", "")
                )
    assert answer.run_id is not None


async def lease_holder_is(redis_url: str, lease: str, node_id: str) -> None:
    """Until the lease's value ("<fence>:<node>:<token>") names ``node_id`` (no event tells a member)."""
    async with redis.asyncio.Redis.from_url(redis_url) as bus:
        with anyio.fail_after(15):
            while True:
                if f":{node_id}:".encode() in (await bus.get(lease) or b""):
                    return
                await anyio.sleep(0.05)


async def test_the_turns_go_back_to_a_node_with_every_agent_only_once_nothing_runs(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """A reviewer: a member merely opening the conversation on a full node made the node lacking one of
    its agents give the turns at once, and its answer under way ended NODE_LOST though no node was lost."""
    with ExitStack() as stack:
        a = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "a"))
        b = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "b", operator=False))
        url_a, url_b = (served.banner["WebSocket"].split()[0] for served in (a, b))
        lease = ""
        async with HaipClient(url_b, token=b.banner["token"], timeout=20) as on_b:
            async with HaipClient(url_a, token=a.banner["token"], timeout=20) as on_a:
                tx = await on_a.start_transaction("patient")
                lease = f"{prefix}:{{l:run:{tx}}}"
                await on_a.send("TRANSACTION_JOIN", {"agent": "operator"}, transaction=tx)  # B lacks this one
                await on_a.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and "operator" in e.get("agents", []))
                await on_b.join(tx)
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(timeout=10)
            await lease_holder_is(redis_url, lease, b.banner["cluster"].split()[1].rstrip(","))
            await on_b.send_text(tx, "wait")  # patient's answer, under way on B
            started = await on_b.wait_for(lambda e: e.type == "RUN_STARTED" and e.get("agent") == "patient")
            await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and e.run_id == started.run_id)
            c = stack.enter_context(node(redis_url, postgres_url, prefix, tmp_path / "c"))
            node_c = c.banner["cluster"].split()[1].rstrip(",")
            async with HaipClient(c.banner["WebSocket"].split()[0], token=c.banner["token"], timeout=20) as on_c:
                await on_c.join(tx)
                async with redis.asyncio.Redis.from_url(redis_url) as bus:  # C says it wants the turns...
                    with anyio.fail_after(15):
                        while True:
                            if await bus.get(f"{lease}:wanted") == node_c.encode():
                                break
                            await anyio.sleep(0.05)
                cut = None
                with anyio.move_on_after(1.5):  # ...and B, which looks twice a second, does not cut the answer
                    cut = await on_b.wait_for(lambda e: e.type == "RUN_ERROR" and e.run_id == started.run_id)
                assert cut is None, cut.raw
                await on_b.send("RUN_CANCEL", {"run_id": started.run_id}, transaction=tx)
                ended = await on_b.wait_for(
                    lambda e: e.type in ("RUN_FINISHED", "RUN_ERROR") and e.run_id == started.run_id
                )
                await lease_holder_is(redis_url, lease, node_c)  # then the turns go to C
                await on_b.send_text(tx, "and now?")
                await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and "you said: and now?" in e.get("text", ""))
    assert ended.type == "RUN_FINISHED" and ended.get("status") == "CANCELLED"


async def test_a_tool_call_whose_node_dies_ends_with_its_run(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """The run's node dies while a tool call waits for a member's approval: the node that ends the run
    NODE_LOST ends the call too (TOOL_DONE ERROR), else the members' UIs wait on it for ever (found by
    a tester)."""
    with two_nodes(redis_url, postgres_url, prefix, tmp_path) as (a, b, url_a, url_b):
        async with HaipClient(url_b, token=b.banner["token"], timeout=20) as on_b:
            async with HaipClient(url_a, token=a.banner["token"], timeout=20) as on_a:
                tx = await on_a.start_transaction("operator")  # its turns run on A
                await on_b.join(tx)
                await on_b.send_text(tx, '/call made.hello {"who": "ada"}')
                call = await on_b.wait_for("TOOL_CALL")
                await on_b.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
                a.process.send_signal(signal.SIGKILL)
                a.process.wait(timeout=10)
            done = await on_b.wait_for("TOOL_DONE")
            lost = await on_b.wait_for("RUN_ERROR")
    assert done.get("call_id") == call.get("call_id") and done.run_id == call.run_id == lost.run_id
    assert done.get("status") == "ERROR" and done.get("error")["code"] == "TOOL_FAILED"
    assert lost.get("code") == "NODE_LOST"


@contextmanager
def unstored_and_other(
    redis: str, database: str, prefix: str, folder: Path
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Node A, whose store writes nothing within a test (it batches for 5 s), and node B."""
    with ExitStack() as stack:
        a = stack.enter_context(node(redis, database, prefix, folder / "a", flush=5))
        yield a, stack.enter_context(node(redis, database, prefix, folder / "b"))


def client_of(node: ServeProcess) -> HaipClient:
    return HaipClient(node.banner["WebSocket"].split()[0], token=node.banner["token"], timeout=20)


async def listed_at(node: ServeProcess) -> list[dict[str, Any]]:
    """The dev user's transactions as ``node``'s REST history lists them."""
    base, headers = node.banner["health"].removesuffix("/health"), {"Authorization": f"Bearer {node.banner['token']}"}
    async with httpx2.AsyncClient(base_url=base, headers=headers) as http:
        listed: list[dict[str, Any]] = (await http.get("/haip/transactions")).json()["transactions"]
    return listed


async def test_a_transaction_whose_node_dies_before_storing_it_is_made_again_from_the_log(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """Found by a tester: a node killed within ~0.1 s of a start (its store writes in batches) left the
    transaction's events in Redis and no record in PostgreSQL: the client resumed elsewhere was in no
    transaction any more, and a join was TRANSACTION_NOT_FOUND, for good. The log's TRANSACTION_START
    now carries what the record begins with, and the next node makes the record from it."""
    with unstored_and_other(redis_url, postgres_url, prefix, tmp_path) as (a, b):
        async with client_of(a) as on_a:
            tx = await on_a.start_transaction("patient")
            await on_a.send_text(tx, "hello")
            await on_a.wait_for("RUN_FINISHED")
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(timeout=10)
        async with client_of(b) as on_b:
            await on_b.join(tx, since=0)
            earlier = await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: hello")
            await on_b.send_text(tx, "again")
            answered = await on_b.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: again")
            base = b.banner["health"].removesuffix("/health")
            async with httpx2.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {b.banner['token']}"}
            ) as http:
                listed = (await http.get("/haip/transactions")).json()["transactions"]
    assert earlier.transaction == answered.transaction == tx
    assert [(t["id"], t["owner"], t["agents"], t["state"]) for t in listed] == [(tx, "dev", ["patient"], "open")]


async def test_a_transaction_ended_before_its_node_stored_anything_is_stored_ended_by_the_next(
    redis_url: str, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """A reviewer's finding: made again from the log's start as "open", its TRANSACTION_END (in the log
    too) then reached the next node's members and memory but not its store: "open" for good, and the
    quota took it for an idle one to end, again and again."""
    with unstored_and_other(redis_url, postgres_url, prefix, tmp_path) as (a, b):
        async with client_of(a) as on_a:
            tx = await on_a.start_transaction("patient")
            await on_a.end_transaction(tx, "done here")
            await on_a.wait_for("TRANSACTION_END")
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(timeout=10)
        async with client_of(b) as on_b:
            with pytest.raises(ClientError) as refused:
                await on_b.join(tx, since=0)
        listed = await listed_at(b)
    assert "has ended" in str(refused.value)
    assert [(t["id"], t["state"], t["end_reason"]) for t in listed] == [(tx, "ended", "done here")]
