"""Conversations that last: shared transactions, two users and two agents, REST history, and a
runtime restart with SQLite between two turns of one conversation."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.client import ClientError, HaipClient, Received
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

ROLES = {"user": {}, "support": {"may_join_others": True}}


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LiveServer]:
    agents = {"greeter": {"plugin": "tests.support.agents:GreeterAgent"}}
    with live_server(make_config({"agents": agents, "roles": ROLES})) as live:
        yield live


def log_of(client: HaipClient, tx: str) -> list[tuple[int, str]]:
    return [(e.tseq, e.type) for e in client.received if e.transaction == tx and e.tseq]


def texts(client: HaipClient, tx: str, author: str) -> list[str]:
    return [
        str(e.get("text"))
        for e in client.received
        if e.transaction == tx and e.type == "MESSAGE_PART" and _author(client, e) == author
    ]


def _author(client: HaipClient, part: Received) -> str | None:
    starts = [e for e in client.received if e.type == "MESSAGE_START" and e.get("message_id") == part.get("message_id")]
    return starts[0].get("author") if starts else None


async def test_joining_another_users_transaction_needs_may_join_others(shared_server: LiveServer) -> None:
    async with (
        HaipClient(shared_server.ws_url, token=shared_server.token("alice")) as alice,
        HaipClient(shared_server.ws_url, token=shared_server.token("bob", roles=["user"])) as bob,
    ):
        tx = await alice.start_transaction("echo")
        with pytest.raises(ClientError) as refused:
            await bob.join(tx)
    assert refused.value.code == "TRANSACTION_NOT_FOUND"


async def test_two_users_and_two_agents_share_one_ordered_conversation(shared_server: LiveServer) -> None:
    async with (
        HaipClient(shared_server.ws_url, token=shared_server.token("alice")) as alice,
        HaipClient(shared_server.ws_url, token=shared_server.token("sam", roles=["support"])) as sam,
    ):
        tx = await alice.start_transaction("greeter")
        await alice.wait_for("RUN_FINISHED")  # the greeting
        joined = await sam.join(tx, since=0)
        announced = await alice.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and e.get("joined") == "sam")
        await alice.send("TRANSACTION_JOIN", {"agent": "echo"}, transaction=tx)
        await sam.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and "echo" in e.get("agents", []))
        await sam.send_text(tx, "hello from sam")
        seen = await alice.wait_for(lambda e: e.type == "MESSAGE" and e.get("author") == "sam")
        for client in (alice, sam):  # the greeting, then one turn per agent
            await runs_finished(client, tx, 3)
        alice_log, sam_log = log_of(alice, tx), log_of(sam, tx)
    assert joined.get("members") == ["alice", "sam"] and joined.get("omitted") == 0
    assert announced.get("members") == ["alice", "sam"]
    assert seen.get("text") == "hello from sam"
    # One log, in one order: every event both saw has the same tseq and type; each saw them in order,
    # once; sam missed only what was not for it (its own message, the news of its own joining).
    alice_types, sam_types = dict(alice_log), dict(sam_log)
    assert len(alice_types) == len(alice_log) and len(sam_types) == len(sam_log)
    assert [t for t, _ in alice_log] == sorted(alice_types) and [t for t, _ in sam_log] == sorted(sam_types)
    assert all(alice_types[tseq] == kind for tseq, kind in sam_log)
    assert sorted(set(alice_types) - set(sam_types)) == [announced.tseq, seen.tseq]
    # The greeter sees what everyone said, the other agent included (as far as it had said it).
    greeter_said = texts(sam, tx, "greeter")[-1]
    assert "agent:hello alice" in greeter_said and "user:hello from sam" in greeter_said
    assert texts(alice, tx, "echo") == ["you said: hello from sam"]


def _count(client: HaipClient, tx: str) -> int:
    return len([e for e in client.received if e.type == "RUN_FINISHED" and e.transaction == tx])


async def runs_finished(client: HaipClient, tx: str, count: int) -> None:
    """Wait until ``client`` has seen ``count`` runs of ``tx`` finish."""
    await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx and _count(client, tx) >= count)


@asynccontextmanager
async def alice_said_m7(server: LiveServer) -> AsyncIterator[tuple[HaipClient, HaipClient, str]]:
    """(alice, sam, the transaction): sam (support) joined alice's echo conversation, and alice sent her
    message ``m-7`` ("original"), which sam got."""
    async with (
        HaipClient(server.ws_url, token=server.token("alice")) as alice,
        HaipClient(server.ws_url, token=server.token("sam", roles=["support"])) as sam,
    ):
        tx = await alice.start_transaction("echo")
        await sam.join(tx)
        await alice.send("MESSAGE", {"text": "original", "message_id": "m-7"}, transaction=tx, channel="USER")
        await sam.wait_for(lambda e: e.type == "MESSAGE" and e.get("message_id") == "m-7")
        yield alice, sam, tx


def refusal_of(sent: str) -> Callable[[Received], bool]:
    return lambda e: e.type == "ERROR" and e.get("related_id") == sent


async def test_only_the_author_may_edit_a_message(shared_server: LiveServer) -> None:
    async with alice_said_m7(shared_server) as (alice, sam, tx):
        edit_id = await sam.send("MESSAGE_UPDATE", {"message_id": "m-7", "text": "forged"}, transaction=tx)
        error = await sam.wait_for(refusal_of(edit_id))
        await alice.send("MESSAGE_UPDATE", {"message_id": "m-7", "text": "fixed"}, transaction=tx, channel="USER")
        edited = await sam.wait_for("MESSAGE_UPDATE")
    assert error.get("code") == "INVALID_PAYLOAD"
    assert edited.payload == {"message_id": "m-7", "text": "fixed", "author": "alice"}


async def test_a_message_may_not_take_the_id_of_another(shared_server: LiveServer) -> None:
    """A hostile probe's find: sam sent a message under alice's message_id (every member sees it), then
    "edited" it: members were told m-7 was edited, and the history applied alice's own edit to sam's."""
    async with alice_said_m7(shared_server) as (_, sam, tx):
        answered = await sam.wait_for(lambda e: e.type == "MESSAGE_START" and e.transaction == tx)
        taken = []
        for message_id in ("m-7", answered.get("message_id")):  # alice's, and the agent's answer's
            sent = await sam.send("MESSAGE", {"text": "mine", "message_id": message_id}, transaction=tx, channel="USER")
            taken.append(await sam.wait_for(refusal_of(sent)))
    assert [(e.get("code"), e.get("detail")) for e in taken] == [
        ("INVALID_PAYLOAD", {"where": "/payload/message_id"})
    ] * 2


async def test_rest_history_lists_pages_and_reads_events_with_the_same_bearer_token(shared_server: LiveServer) -> None:
    token = shared_server.token("rita")
    async with HaipClient(shared_server.ws_url, token=token) as rita:
        transactions = [await rita.start_transaction("echo") for _ in range(3)]
        await rita.send_text(transactions[0], "remember me")
        await rita.wait_for("RUN_FINISHED")
    base = shared_server.http_url
    log = f"{base}/haip/transactions/{transactions[0]}/events"
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        first = (await http.get(f"{base}/haip/transactions", params={"limit": 2})).json()
        second = (
            await http.get(f"{base}/haip/transactions", params={"limit": 2, "cursor": first["next_cursor"]})
        ).json()
        events = (await http.get(f"{base}/haip/transactions/{transactions[0]}/events", params={"limit": 3})).json()
        more = await http.get(
            f"{base}/haip/transactions/{transactions[0]}/events", params={"after": events["next_after"]}
        )
        bad = await http.get(f"{base}/haip/transactions", params={"limit": "lots"})
    async with httpx2.AsyncClient() as anonymous:
        unauthenticated = await anonymous.get(f"{base}/haip/transactions")
        by_query = await anonymous.get(f"{base}/haip/transactions", params={"token": token})
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {shared_server.token('mallory')}"}) as other:
        hidden = await other.get(log)
    listed = [t["id"] for t in first["transactions"] + second["transactions"]]
    assert sorted(listed) == sorted(transactions) and second["next_cursor"] is None
    assert listed[0] == transactions[0]  # the one with a message was active last
    assert [e["tseq"] for e in events["events"]] == [1, 2, 3]
    kinds = [e["type"] for e in events["events"] + more.json()["events"]]
    assert kinds[0] == "TRANSACTION_START" and "MESSAGE" in kinds and kinds[-1] == "RUN_FINISHED"
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert by_query.status_code == 200
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "TRANSACTION_NOT_FOUND"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_PAYLOAD"


def sqlite_config(path: Path, **extra: Any) -> Any:
    agents = {"greeter": {"plugin": "tests.support.agents:GreeterAgent"}}
    return make_config({"agents": agents, "storage": {"backend": "sqlite", "path": str(path)}, **extra})


async def test_a_conversation_goes_on_after_a_runtime_restart(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path / "haip.db")
    with live_server(config) as first:
        token = first.token("dana")  # signed with the dev key kept beside the database
        async with HaipClient(first.ws_url, token=token) as client:
            tx = await client.start_transaction("greeter")
            await client.send_text(tx, "first")
            await runs_finished(client, tx, 2)
    with live_server(config) as second:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
            listed = (await http.get(f"{second.http_url}/haip/transactions")).json()["transactions"]
            events = (await http.get(f"{second.http_url}/haip/transactions/{tx}/events")).json()["events"]
        async with HaipClient(second.ws_url, token=token) as client:
            joined = await client.join(tx, since=0)
            await client.send_text(tx, "second")
            answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "second" in e.get("text", ""))
    assert [t["id"] for t in listed] == [tx] and listed[0]["state"] == "open"
    assert [e["payload"].get("text") for e in events if e["type"] == "MESSAGE"] == ["first"]
    assert joined.get("agents") == ["greeter"]
    assert (
        answer.get("text")
        == "agent:hello dana, params=[] | user:first | agent:agent:hello dana, params=[] | user:first | user:second"
    )


def approving_config(path: Path) -> Any:
    """A SQLite store and the operator agent, whose in-process team tools ask approval for ``word_count``."""
    team = {"transport": "python", "server": "haip_runtime.demo.team_tools:server", "require_approval": ["word_count"]}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["team"]}}
    return sqlite_config(path, agents=agents, mcp={"servers": {"team": team}})


async def test_a_restart_says_why_it_cancelled_the_turn_and_the_call_waiting_for_approval(tmp_path: Path) -> None:
    """An integrator's find: a call waiting for approval when the runtime stopped showed, after the rejoin,
    only TOOL_DONE CANCELLED "the run was cancelled" and RUN_FINISHED CANCELLED: nothing said a restart
    did it."""
    config = approving_config(tmp_path / "haip.db")
    with live_server(config) as first:
        token = first.token("dana")
        async with HaipClient(first.ws_url, token=token) as client:
            tx = await client.start_transaction("operator")
            await client.send_text(tx, '/call team.word_count {"text": "one two"}')
            await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
    with live_server(config) as second:
        async with HaipClient(second.ws_url, token=token) as client:
            await client.join(tx, since=0)
            finished = await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx)
            done = [e for e in client.received if e.type == "TOOL_DONE" and e.transaction == tx]
    assert finished.get("status") == "CANCELLED" and "shutting down" in finished.get("reason")
    assert [(d.get("status"), "shutting down" in d.get("error")["message"]) for d in done] == [("CANCELLED", True)]


class LogWatch(logging.Handler):
    """Sets ``seen`` when a log line of ``logger`` starts with ``prefix`` (a wait across threads)."""

    def __init__(self, logger: str, prefix: str) -> None:
        super().__init__()
        self.logger, self.prefix, self.seen = logging.getLogger(logger), prefix, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.seen.set()

    def __enter__(self) -> LogWatch:
        self._level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


async def test_an_idle_transaction_leaves_memory_and_comes_back_whole_on_join() -> None:
    agents = {"greeter": {"plugin": "tests.support.agents:GreeterAgent"}}
    quick = {"session": {"resume_timeout_seconds": 0.2}, "transactions": {"idle_seconds": 0.2}}
    with live_server(make_config({"agents": agents, **quick})) as live:
        token = live.token("ivy")
        async with HaipClient(live.ws_url, token=token, reconnect=0) as client:
            tx = await client.start_transaction("greeter")
            await client.send_text(tx, "before the nap")
            await runs_finished(client, tx, 2)
        with LogWatch("haip_runtime.conversation.registry", f"transaction {tx} left memory") as watch:
            assert await anyio.to_thread.run_sync(watch.seen.wait, 20), "the idle transaction stayed in memory"
        assert tx not in live.runtime.hub.transactions.live and not live.runtime.hub.sessions.sessions
        async with HaipClient(live.ws_url, token=token) as client:
            joined = await client.join(tx, since=0)
            await client.send_text(tx, "after")
            answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "after" in e.get("text", ""))
            history = [e.type for e in client.received if e.transaction == tx and e.tseq]
    assert joined.get("agents") == ["greeter"] and history[0] == "TRANSACTION_START"
    assert "user:before the nap" in answer.get("text") and answer.get("text").endswith("user:after")


async def test_a_client_rides_out_a_restart_and_what_it_sent_meanwhile_is_answered(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path / "haip.db")
    states: list[str] = []
    down, back = anyio.Event(), anyio.Event()

    def note(state: str) -> None:
        states.append(state)
        (down if state == "reconnecting" else back).set()

    with live_server(config) as first:
        port, token = first.port, first.token("otto")
        client = HaipClient(first.ws_url, token=token, on_connection=note)
        await client.__aenter__()
        tx = await client.start_transaction("greeter")
        await client.send_text(tx, "before")
        await runs_finished(client, tx, 2)
    try:
        with anyio.fail_after(10):
            await down.wait()
        await client.send_text(tx, "while you were away")  # held until the connection is back
        with live_server(config, port=port):
            with anyio.fail_after(20):
                await back.wait()
            answer = await client.wait_for(
                lambda e: e.type == "MESSAGE_PART" and "while you were away" in e.get("text", ""), timeout=20
            )
    finally:
        await client.aclose()
    assert states == ["reconnecting", "restarted"]
    assert answer.get("text").endswith("user:before | user:while you were away")


async def test_members_hear_when_someone_joins_and_when_they_are_gone_for_good() -> None:
    quick = {"session": {"resume_timeout_seconds": 0.2}, "roles": ROLES}
    with live_server(make_config(quick)) as live:
        async with HaipClient(live.ws_url, token=live.token("alice")) as alice:
            tx = await alice.start_transaction("echo")
            async with HaipClient(live.ws_url, token=live.token("sam", roles=["support"]), reconnect=0) as sam:
                await sam.join(tx)
                joined = await alice.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and e.get("joined") == "sam")
            # sam's session stays resumable for 0.2 s; then sam has left the conversation.
            left = await alice.wait_for(lambda e: e.type == "INFO" and e.get("event") == "member.left", timeout=20)
    assert joined.get("members") == ["alice", "sam"]
    assert left.payload == {"event": "member.left", "user": "sam"} and left.transaction == tx


async def test_a_history_larger_than_the_replay_window_is_joined_from_its_latest_events() -> None:
    """A voice tester's find: a conversation whose history outgrew the session's replay window (160 s of
    spoken answers) could not be joined: the history pushed its own unsent start out of the window and
    the client was closed, 1013, at every join. Now the history sent is what fits (half the window), the
    rest counted in ``omitted``, and the connection stays."""
    config = make_config({"session": {"replay_window_bytes": 64 * 1024}})
    with live_server(config) as live:
        async with HaipClient(live.ws_url, token=live.token("alice")) as alice:
            tx = await alice.start_transaction("echo")
            for turn in range(8):  # 8 turns of 8 KB each way: 128 KB, twice the window
                await alice.send_text(tx, f"{turn}:" + "x" * 8000)
                await runs_finished(alice, tx, turn + 1)
        states: list[str] = []
        async with HaipClient(live.ws_url, token=live.token("alice"), on_connection=states.append) as again:
            joined = await again.join(tx, since=0)
            last = int(str(joined.get("tseq")))
            await again.wait_for(lambda e: e.transaction == tx and e.tseq == last, timeout=10)
            history = [e for e in again.received if e.transaction == tx and e.tseq]
            await again.send_text(tx, "still here")
            answer = await again.wait_for(lambda e: e.type == "MESSAGE_END" and e.transaction == tx, timeout=10)
    assert states == [] and answer.get("message_id")  # never closed, never reconnected
    assert int(str(joined.get("omitted"))) > 0
    assert [e.tseq for e in history] == list(range(history[0].tseq or 0, last + 1))  # the latest, whole
    assert sum(len(str(e.get("text") or "")) for e in history) <= 32 * 1024
