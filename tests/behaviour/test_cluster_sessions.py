"""Issue 21, sessions across nodes (two runtimes in this process, one real redis-server, one PostgreSQL):
a session resumed on the other node while its node still holds it (a load balancer moved the client),
an SSE stream resumed by ``Last-Event-ID`` on the other node, POSTs to the node that does not hold the
session, a resent envelope processed once across nodes, and a Redis that lost everything.

The node that is killed outright (SIGKILL) is in ``test_session_failover.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import anyio
import asyncpg
import httpx2
import pytest

from haip_runtime.config.models import HaipConfig
from tests.behaviour.test_cluster_limits import probe, until
from tests.support.peers import SsePeer, open_peer
from tests.support.raw import Numbered, RawPeer, raw_peer
from tests.support.redis import RedisServer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

SECRET = "a shared secret of the cluster's nodes, 32+ bytes long"
FAST = {"heartbeat_seconds": 0.1, "node_ttl_seconds": 1, "connect_timeout_seconds": 5}


def node_config(redis_url: str, prefix: str, postgres_url: str) -> HaipConfig:
    """A node of the cluster on ``redis_url`` and ``postgres_url``; tokens of any node are good on every node."""
    return make_config(
        {
            "auth": {"mode": "jwt", "secret": SECRET},
            "cluster": {"redis_url": redis_url, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": postgres_url, "flush_interval_seconds": 0.005},
            "limits": {"messages_per_second": 1000, "user_messages_per_second": 1000},
        }
    )


@contextmanager
def two_nodes(redis_url: str, prefix: str, postgres_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    config = node_config(redis_url, prefix, postgres_url)
    with live_server(config) as a, live_server(config) as b:
        yield a, b


async def until_type(peer: Numbered, type: str, into: list[dict[str, Any]], timeout: float = 5) -> dict[str, Any]:
    """The next envelope of ``type``; everything received on the way (it included) is kept in ``into``."""
    while True:
        envelope = await peer.receive(timeout)
        into.append(envelope)
        if envelope["type"] == type:
            return envelope


async def ready_on(peer: RawPeer, token: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """A new session's handshake up to ``session.ready`` (kept in ``seen``); the server's HAI."""
    hai = await peer.receive()
    await peer.hai(token)
    await until_type(peer, "INFO", seen)
    return hai


async def echo_started(
    peer: RawPeer, token: str, seen: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A new session's handshake up to ``session.ready``, then a transaction with the echo agent:
    (its HAI, the ready INFO, the TRANSACTION_START); what came on the way is kept in ``seen``."""
    hai = await peer.receive()
    await peer.hai(token)
    ready = await until_type(peer, "INFO", seen)
    await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
    return hai, ready, await until_type(peer, "TRANSACTION_START", seen)


async def echo_on(peer: RawPeer, transaction: str, text: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    await peer.send("MESSAGE", text, transaction=transaction, channel="USER")
    while True:
        envelope = await until_type(peer, "MESSAGE", seen)
        if envelope["payload"] == f"you said: {text}":
            return envelope


def slots_held(node: LiveServer) -> int:
    """The session slots ``node`` holds in Redis and refreshes at each heartbeat."""
    assert node.runtime.fleet is not None and node.runtime.fleet.bus is not None
    return node.runtime.fleet.bus.quotas.held


def seqs(envelopes: list[dict[str, Any]]) -> list[int]:
    return [int(envelope["seq"]) for envelope in envelopes]


async def test_a_session_resumed_on_another_node_while_its_node_holds_it_moves_there_whole(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, ready, started = await echo_started(first, token, seen)
            transaction = started["transaction"]
            await echo_on(first, transaction, "one", seen)
            await echo_on(first, transaction, "two", seen)
            session = hai["session"]
            last_rx = int(started["seq"])  # the client lost what came after the start
            async with raw_peer(b.ws_url) as second:  # through another node, while the first connection lives
                await second.receive()
                second.seq = first.seq
                await second.hai(b.token("ann"), session=session, last_rx_seq=str(last_rx))
                again: list[dict[str, Any]] = []
                resumed = await until_type(second, "INFO", again)
                first_closed = await first.closed()
                after = await echo_on(second, transaction, "three", again)
        assert session not in a.runtime.hub.sessions.sessions and session in b.runtime.hub.sessions.sessions
        # Its slot moved too: the old node no longer refreshes it (else it outlives the session, and the
        # user is refused sessions once enough have moved), the new node holds it under the same id.
        assert slots_held(a) == 0 and slots_held(b) == 1
    missed = [envelope for envelope in seen if int(envelope["seq"]) > last_rx]
    assert again[: len(missed)] == missed  # the very frames, seqs and all, once, in order
    assert seqs(again) == list(range(last_rx + 1, int(after["seq"]) + 1))  # then numbering goes on
    assert resumed["payload"]["resumed"] is True and resumed["session"] == session
    assert resumed["payload"]["epoch"] == ready["payload"]["epoch"]  # one epoch over the cluster: a resume
    assert first_closed == 1000  # the old node let the session go: it never delivers to it again
    assert after["session"] == session and after["transaction"] == transaction


async def test_sse_last_event_id_on_another_node_resumes_and_posts_reach_the_holding_node(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        async with open_peer("sse", a, token) as peer:
            assert isinstance(peer, SsePeer)
            await peer.receive()
            await peer.hai(token)
            await peer.receive_type("INFO")
            # A POST to B, which does not hold the session, is handed to A and answered on A's stream.
            on_b = SsePeer(peer.client, b.http_url, token)
            try:
                on_b.session, on_b.seq = peer.session, peer.seq
                await on_b.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
                peer.seq = on_b.seq
                started = await peer.receive_type("TRANSACTION_START")
                last = peer.last_event_id
                elsewhere = await on_b.post(json.dumps({"type": "PING"}), session="no-such-session")
            finally:
                on_b.aclose()
        assert last is not None
        async with open_peer("sse", b, token, headers={"last-event-id": last}) as again:
            assert isinstance(again, SsePeer)
            again.seq = peer.seq
            ready = await again.receive_type("INFO")
            await again.send("MESSAGE", "on b", transaction=started["transaction"], channel="USER")
            reply = await again.receive_type("MESSAGE")
    assert started["session"] == peer.session
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "RESUME_FAILED"
    assert ready["payload"]["resumed"] is True and ready["session"] == peer.session
    assert reply["payload"] == "you said: on b" and again.last_event_id == f"{peer.session}:{reply['seq']}"


async def test_two_resumes_at_once_on_another_node_leave_one_connection_with_the_session(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """A prober's find: each took the session over anew, and both connections stayed open, one of them
    getting nothing (a storm of them left none getting anything; one failed in the replay window)."""
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, _, started = await echo_started(first, token, seen)
            last, next_seq = seen[-1]["seq"], first.seq
        async with raw_peer(b.ws_url) as one, raw_peer(b.ws_url) as other:
            peers = (one, other)
            for peer in peers:
                await peer.receive()
                peer.seq = next_seq
            async with anyio.create_task_group() as group:
                for peer in peers:
                    group.start_soon(partial(peer.hai, token, session=hai["session"], last_rx_seq=last))
            closes: dict[int, int | None] = {}

            async def closed(index: int) -> None:
                with anyio.move_on_after(5):
                    closes[index] = await peers[index].closed(timeout=5)

            async with anyio.create_task_group() as group:
                group.start_soon(closed, 0)
                group.start_soon(closed, 1)
            assert len(closes) == 1  # one connection let go of the session, the other kept it
            [(gone, _)] = closes.items()
            survivor = peers[1 - gone]
            await survivor.send("MESSAGE", "still here", transaction=started["transaction"], channel="USER")
            echoed = await until_type(survivor, "MESSAGE", [])
    assert echoed["payload"] == "you said: still here"


async def test_a_resume_elsewhere_that_would_fail_leaves_the_live_session_as_it_is(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """An earlier note's gap: a resume on another node naming seqs the session never sent (or has let go)
    had the node holding it let it go first, so the user's live connection closed and the resume failed
    too. As on one node, the failed resume now leaves the session and its connection alone."""
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as live:
            hai, _, started = await echo_started(live, token, seen)
            await echo_on(live, started["transaction"], "before", seen)
            async with raw_peer(b.ws_url) as stray:
                await stray.receive()
                stray.seq = live.seq
                await stray.hai(token, session=hai["session"], last_rx_seq=str(int(seen[-1]["seq"]) + 50))
                failure = await stray.receive_type("ERROR")
                fresh = await stray.receive_type("INFO")
            reply = await echo_on(live, started["transaction"], "still here", seen)
    assert failure["payload"]["code"] == "RESUME_FAILED"
    assert failure["payload"]["detail"]["reason"] == "ahead"
    assert fresh["payload"]["resumed"] is False and fresh["session"] != hai["session"]
    assert reply["payload"] == "you said: still here"


async def test_a_post_to_a_websocket_session_held_by_another_node_is_refused_not_dropped(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """A prober's find: the node holding the session refused it (404: no SSE stream), but another node
    answered 202 and the envelope went nowhere."""
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        async with raw_peer(a.ws_url) as peer:
            hai, _, _ = await echo_started(peer, token, [])
            ping = json.dumps({"id": "p1", "session": hai["session"], "seq": "9", "ts": "1", "type": "PING"})
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            async with httpx2.AsyncClient(headers=headers) as http:
                on_a = await http.post(f"{a.http_url}/haip/sse/{hai['session']}", content=ping)
                on_b = await http.post(f"{b.http_url}/haip/sse/{hai['session']}", content=ping)
    assert on_a.status_code == on_b.status_code == 404
    assert on_b.json()["error"]["code"] == "RESUME_FAILED"


async def test_an_envelope_resent_to_another_node_after_a_resume_is_processed_once(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, _, started = await echo_started(first, token, seen)
            message = {
                "id": "resent-once",
                "session": hai["session"],
                "transaction": started["transaction"],
                "seq": str(first.seq + 1),
                "ts": "1",
                "channel": "USER",
                "type": "MESSAGE",
                "payload": "only once",
            }
            first.seq += 1
            await first.send_frame(json.dumps(message))
            echoed = await until_type(first, "MESSAGE", seen)
        async with raw_peer(b.ws_url) as second:
            await second.receive()
            second.seq = first.seq
            await second.hai(token, session=hai["session"], last_rx_seq=seen[-1]["seq"])
            await second.receive_type("INFO")
            await second.send_frame(json.dumps({**message, "seq": "2"}))  # the client was not sure: sent again
            await second.send("PING", {"nonce": "after"})
            answered: list[dict[str, Any]] = []
            await until_type(second, "PONG", answered)
        async with httpx2.AsyncClient(base_url=b.http_url, headers={"authorization": f"Bearer {token}"}) as http:
            page = (await http.get(f"/haip/transactions/{started['transaction']}/messages")).json()
    assert echoed["payload"] == "you said: only once"
    assert [envelope["type"] for envelope in answered] == ["PONG"]  # nothing came of the duplicate
    said = [message for message in page["messages"] if "only once" in json.dumps(message)]
    assert len(said) == 2  # the user's message and its echo, once each


async def test_an_envelope_held_past_a_gap_is_not_lost_when_the_session_moves_to_another_node(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """A reviewer's find: a held envelope's id went into the session's dedup (and its mirror) as it was
    held, so the node that took the session over dropped the client's re-sent copy as a duplicate."""
    with two_nodes(redis_url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, _, started = await echo_started(first, token, seen)
            tx = started["transaction"]
            gap = first.seq + 1
            first.seq = gap  # the frame with seq `gap` is lost on the way
            held = await first.send("MESSAGE", "after the gap", transaction=tx, channel="USER")
            await first.send("PING", {"nonce": "read"})  # never held: its PONG says the MESSAGE was read
            await until_type(first, "PONG", seen)
            last = first.seq
        async with raw_peer(b.ws_url) as second:
            await second.receive()
            second.seq = last
            await second.hai(token, session=hai["session"], last_rx_seq=seen[-1]["seq"])
            await second.receive_type("INFO")
            second.seq = gap - 1  # the client sends again what no ack covered: the lost one, the held one
            await second.send("MESSAGE", "the gap", transaction=tx, channel="USER")
            again = {"id": held, "session": hai["session"], "transaction": tx, "seq": str(gap + 1), "ts": "1"}
            await second.send_frame(
                json.dumps({**again, "channel": "USER", "type": "MESSAGE", "payload": "after the gap"})
            )
            answers = [(await until_type(second, "MESSAGE", []))["payload"] for _ in range(2)]
    assert answers == ["you said: the gap", "you said: after the gap"]


async def test_after_redis_lost_everything_a_resume_elsewhere_fails_and_the_client_rejoins(
    own_redis: RedisServer, prefix: str, postgres_url: str
) -> None:
    with two_nodes(own_redis.url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, ready, started = await echo_started(first, token, seen)
            await echo_on(first, started["transaction"], "before", seen)

        async def recorded() -> bool:  # the record of the session as its disconnect left it, in PostgreSQL
            database = await asyncpg.connect(postgres_url)
            try:
                query = "SELECT transactions FROM haip_sessions WHERE id = $1"
                return bool(await database.fetchval(query, hai["session"]) == [started["transaction"]])
            finally:
                await database.close()

        await until(recorded)
        own_redis.kill()
        own_redis.start()  # empty: windows, epoch and all
        async with raw_peer(b.ws_url) as second:
            await second.receive()
            second.seq = first.seq
            await second.hai(token, session=hai["session"], last_rx_seq=seen[-1]["seq"])
            failure = await second.receive_type("ERROR")
            fresh = await second.receive_type("INFO")
            await second.send("TRANSACTION_JOIN", {"since": "0"}, transaction=started["transaction"])
            joined = await second.receive_type("TRANSACTION_JOIN")
            history: list[dict[str, Any]] = []
            reply = await echo_on(second, started["transaction"], "after", history)
    assert failure["payload"]["code"] == "RESUME_FAILED"
    assert failure["payload"]["detail"]["reason"] == "restarted"
    assert failure["payload"]["detail"]["transactions"] == [started["transaction"]]
    assert fresh["payload"]["resumed"] is False and fresh["payload"]["epoch"] != ready["payload"]["epoch"]
    assert joined["transaction"] == started["transaction"]
    said = [event["payload"] for event in history if event["type"] == "MESSAGE"]
    assert said[:2] == ["before", "you said: before"]  # the history the client had lost came with the join
    assert reply["payload"] == "you said: after"


async def test_a_window_redis_lost_while_its_client_stayed_connected_is_made_again_from_the_node(
    own_redis: RedisServer, prefix: str, postgres_url: str
) -> None:
    with two_nodes(own_redis.url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai = await first.receive()
            seen.append(hai)
            await first.hai(token)
            await until_type(first, "INFO", seen)
            own_redis.kill()
            await first.send("PING", {"nonce": "while redis is down"})  # kept by A's mirror until it is back
            await until_type(first, "PONG", seen)
            own_redis.start()  # empty; the client stays connected to A all along
            for n in range(3):
                await first.send("PING", {"nonce": str(n)})
                await until_type(first, "PONG", seen)
            async with probe(own_redis.url, prefix) as bus:

                async def made_again() -> bool:  # A's mirror learnt the window was lost and made it again
                    last = await bus.redis.hget(bus.keys.replay_meta(hai["session"]), "last")
                    return bool(last == seen[-1]["seq"].encode())

                await until(made_again)
            claimed = int(seen[1]["seq"])  # the client says it read only the first two
        async with raw_peer(b.ws_url) as second:
            await second.receive()
            second.seq = first.seq
            await second.hai(token, session=hai["session"], last_rx_seq=str(claimed))
            again: list[dict[str, Any]] = []
            ready = await until_type(second, "INFO", again)
    missed = [envelope for envelope in seen if int(envelope["seq"]) > claimed]
    assert again[:-1] == missed and ready["payload"]["resumed"] is True


async def test_a_node_whose_session_was_claimed_behind_its_back_lets_it_go_at_its_next_flush(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with two_nodes(redis_url, prefix, postgres_url) as (a, _):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai = await ready_on(first, token, seen)
            async with probe(redis_url, prefix, node_id="elsewhere") as other:
                # Another node took the session over without reaching A (A did not hear it, say).
                assert await other.replay.claim(hai["session"], "ann") is not None
                assert await other.replay.claim(hai["session"], "bob") is None
                await first.send("PING", {"nonce": "after the claim"})
                closed = await first.closed()
        assert hai["session"] not in a.runtime.hub.sessions.sessions
    assert closed == 1000  # A let the session go: two nodes never both deliver to it


async def test_a_resume_after_redis_lost_the_log_repeats_nothing(
    own_redis: RedisServer, prefix: str, postgres_url: str
) -> None:
    """Redis restarted empty under a conversation; the client's node made its window again; the client
    resumes on the other node, which brings the transaction back from PostgreSQL (Redis no longer holds
    its log): the client gets what it missed, and none of what it had again."""
    with two_nodes(own_redis.url, prefix, postgres_url) as (a, b):
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai, _, started = await echo_started(first, token, seen)
            await echo_on(first, started["transaction"], "before", seen)
            own_redis.kill()
            own_redis.start()  # empty: the transaction's log in Redis is gone, and the session's window
            await first.send("PING", {"nonce": "after the restart"})  # its PONG makes A make the window again
            await until_type(first, "PONG", seen)
            async with probe(own_redis.url, prefix) as bus:

                async def made_again() -> bool:
                    last = await bus.redis.hget(bus.keys.replay_meta(hai["session"]), "last")
                    return bool(last == seen[-1]["seq"].encode())

                await until(made_again)
        had = max(int(envelope["tseq"]) for envelope in seen if envelope.get("tseq"))
        async with raw_peer(b.ws_url) as second:
            await second.receive()
            second.seq = first.seq
            await second.hai(token, session=hai["session"], last_rx_seq=seen[-1]["seq"])
            after: list[dict[str, Any]] = []
            # B may still be reconnecting to the restarted Redis, then follows the log again (up to 5 s):
            # on a loaded machine that took more than the usual 5 s once (a fresh-clone CI run).
            ready = await until_type(second, "INFO", after, timeout=20)
            reply = await echo_on(second, started["transaction"], "after", after)
    assert ready["payload"]["resumed"] is True
    again = [envelope for envelope in after if envelope.get("tseq") and int(envelope["tseq"]) <= had]
    assert again == []  # nothing of what it had came twice
    assert reply["payload"] == "you said: after" and int(reply["tseq"]) > had


async def test_an_approval_asked_in_words_is_answered_after_the_session_moved_to_another_node(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    """A client without TOOL_* events (the reference SDK's) is asked approvals in words, and its next
    MESSAGE answers. It moved to another node (a balancer) between the question and its answer: the
    answer must still answer, not reach the agent as a message (found by a tester)."""
    config = node_config(redis_url, prefix, postgres_url).model_copy(
        update={key: getattr(make_config(TOOLS), key) for key in ("agents", "mcp")}
    )
    with live_server(config) as a, live_server(config) as b:
        token = a.token("ann")
        seen: list[dict[str, Any]] = []
        async with raw_peer(a.ws_url) as first:
            hai = await ready_on(first, token, seen)
            await first.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
            transaction = (await until_type(first, "TRANSACTION_START", seen))["transaction"]
            await first.send("MESSAGE", '/call made.hello {"who": "ann"}', transaction=transaction, channel="USER")
            while "needs your approval" not in str((asked := await until_type(first, "MESSAGE", seen))["payload"]):
                pass
            async with raw_peer(b.ws_url) as second:  # through another node, while the first connection lives
                await second.receive()
                second.seq = first.seq
                await second.hai(token, session=hai["session"], last_rx_seq=asked["seq"])
                again: list[dict[str, Any]] = []
                await until_type(second, "INFO", again)
                await second.send("MESSAGE", "yes", transaction=transaction, channel="USER")
                while "returned" not in str((result := await until_type(second, "MESSAGE", again))["payload"]):
                    pass
    assert result["payload"] == "made.hello returned: hello, ann"
    assert not any("I only run tools" in str(envelope["payload"]) for envelope in again)  # "yes" was the answer


#: The operator agent and a tool that waits for a member's approval.
TOOLS = {
    "agents": {"operator": {"plugin": "operator", "mcp_servers": ["made"]}},
    "mcp": {
        "servers": {
            "made": {
                "transport": "python",
                "server": "tests.support.python_servers:make_server",
                "require_approval": ["hello"],
            }
        }
    },
}
