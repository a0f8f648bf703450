"""Resume without loss over a real uvicorn: dropped TCP connections mid-stream and mid-tool-call,
bad resume requests, replays, gaps, and clients that do not read."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from haip_runtime.client import HaipClient, Received
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session import liveness
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

EVERYTHING: dict[str, Any] = {"accept_events": list(ALL_EVENTS)}
DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LiveServer]:
    """Agents that take long enough to be interrupted: a slow storyteller and the operator's demo tools."""
    agents = {
        "slowstory": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 150}},
        "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
    }
    config = make_config({"agents": agents, "mcp": {"servers": {"demo": DEMO}}})
    with live_server(config) as live:
        yield live


@pytest.fixture(scope="module")
def unlimited_server() -> Iterator[LiveServer]:
    """No message rate limits, so a test can flood the session layer itself."""
    limits = {"messages_per_second": 1e6, "message_burst": 100_000}
    limits |= {"user_messages_per_second": 1e6, "user_message_burst": 100_000}
    with live_server(make_config({"limits": limits})) as live:
        yield live


@pytest.fixture
def short_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap in a client's seqs asked for after 10 ms and given up 50 ms later (0.5 s and 5 s in use)."""
    monkeypatch.setattr(liveness, "GAP_GRACE_SECONDS", 0.01)
    monkeypatch.setattr(liveness, "GAP_GIVE_UP_SECONDS", 0.05)


def transaction_log(client: HaipClient, transaction: str) -> list[tuple[int, str, Any]]:
    """What a member saw of a transaction's log: (tseq, type, payload), in the order received."""
    return [(e.tseq, e.type, e.payload) for e in client.received if e.transaction == transaction and e.tseq]


def same_log(stayer: list[tuple[int, str, Any]], leaver: list[tuple[int, str, Any]]) -> None:
    """The leaver saw the whole log, each event once, in order; the stayer the same but its own message."""
    assert [tseq for tseq, _, _ in leaver] == list(range(1, len(leaver) + 1))
    assert [entry for entry in leaver if entry[1] != "MESSAGE"] == stayer


def drop_tcp(client: HaipClient) -> None:
    """Kill the client's TCP connection at once: no closing handshake, as a pulled cable looks."""
    assert client._ws is not None
    client._ws.transport.abort()


async def watch_and_drop(stayer: HaipClient, leaver: HaipClient, tx: str, when: Any, text: str) -> None:
    states: list[str] = []
    leaver.on_connection = states.append
    await stayer.send_text(tx, text)
    await leaver.wait_for(when, timeout=15)
    drop_tcp(leaver)
    finished = await stayer.wait_for("RUN_FINISHED", timeout=20)
    await leaver.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == finished.run_id, timeout=20)
    assert states[:2] == ["reconnecting", "resumed"]


async def test_a_member_whose_connection_drops_mid_answer_sees_exactly_what_a_member_who_stayed_saw(
    slow_server: LiveServer,
) -> None:
    token = slow_server.token("mia")
    async with (
        HaipClient(slow_server.ws_url, token=token) as stayer,
        HaipClient(slow_server.ws_url, token=token) as leaver,
    ):
        tx = await stayer.start_transaction("slowstory")
        await leaver.join(tx, since=0)
        parts = lambda e: e.type == "MESSAGE_PART" and e.transaction == tx and len(e.get("text", "")) > 0  # noqa: E731
        await watch_and_drop(stayer, leaver, tx, parts, "a storm at sea")
        seen_by_stayer, seen_by_leaver = transaction_log(stayer, tx), transaction_log(leaver, tx)
    same_log(seen_by_stayer, seen_by_leaver)
    story = "".join(payload["text"] for _, kind, payload in seen_by_leaver if kind == "MESSAGE_PART")
    assert story.startswith("Once upon a time, someone said 'a storm at sea'.") and story.endswith("The end.")
    assert [e.seq for e in leaver.received] == list(range(1, len(leaver.received) + 1))


async def test_a_member_whose_connection_drops_mid_tool_call_sees_all_its_progress(slow_server: LiveServer) -> None:
    token = slow_server.token("mia")
    async with (
        HaipClient(slow_server.ws_url, token=token) as stayer,
        HaipClient(slow_server.ws_url, token=token) as leaver,
    ):
        tx = await stayer.start_transaction("operator")
        await stayer.wait_for(lambda e: e.type == "TOOL_LIST" and e.payload["tools"], timeout=20)
        await leaver.join(tx, since=0)
        progress = lambda e: e.type == "TOOL_UPDATE" and e.get("progress") == 2.0  # noqa: E731
        await watch_and_drop(stayer, leaver, tx, progress, '/call demo.slow_count {"steps": 12, "delay": 0.05}')
        seen_by_stayer, seen_by_leaver = transaction_log(stayer, tx), transaction_log(leaver, tx)
    same_log(seen_by_stayer, seen_by_leaver)
    steps = [
        payload["progress"] for _, kind, payload in seen_by_leaver if kind == "TOOL_UPDATE" and "progress" in payload
    ]
    assert steps == sorted(steps) and steps[-1] == 12.0
    done = [payload for _, kind, payload in seen_by_leaver if kind == "TOOL_DONE"]
    assert done[0]["status"] == "OK" and done[0]["result"]["content"][0]["text"] == "counted to 12"


async def handshake(peer: RawPeer, token: str, **payload: Any) -> dict[str, Any]:
    """HAI; returns the session.ready INFO (skipping the server HAI and any ERROR before it)."""
    await peer.hai(token, **EVERYTHING, **payload)
    while True:
        envelope = await peer.receive()
        if envelope["type"] == "INFO" and envelope["payload"].get("event") == "session.ready":
            return envelope


async def test_resume_from_last_rx_seq_zero_replays_the_server_hai_too(server: LiveServer) -> None:
    token = server.token("zoe")
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await handshake(first, token)
    async with raw_peer(server.ws_url) as second:
        await second.receive()  # this connection's own HAI
        await second.hai(token, session=hai["session"], last_rx_seq="0", **EVERYTHING)
        replayed = [await second.receive() for _ in range(3)]
    assert [(e["seq"], e["type"]) for e in replayed] == [("1", "HAI"), ("2", "INFO"), ("3", "INFO")]
    assert replayed[0] == hai and replayed[2]["payload"]["resumed"] is True


@pytest.mark.parametrize(("value", "reason"), [("abc", None), ("-1", None), ("999", "ahead")])
async def test_a_bad_last_rx_seq_gets_resume_failed_and_a_working_fresh_session(
    server: LiveServer, value: str, reason: str | None
) -> None:
    token = server.token("zoe")
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await handshake(first, token)
    async with raw_peer(server.ws_url) as second:
        new_hai = await second.receive()
        await second.hai(token, session=hai["session"], last_rx_seq=value, **EVERYTHING)
        error = await second.receive_type("ERROR")
        ready = await second.receive_type("INFO")
        await second.send("PING", {"nonce": "still-here"})
        pong = await second.receive_type("PONG")
    assert error["payload"]["code"] == "RESUME_FAILED"
    assert error["payload"]["detail"]["where"] == "/payload/last_rx_seq"
    assert error["payload"]["detail"].get("reason") == reason
    assert ready["payload"]["resumed"] is False and ready["session"] == new_hai["session"]
    assert pong["payload"] == {"nonce": "still-here"}


async def test_a_resume_keeps_the_event_types_its_session_was_opened_with(server: LiveServer) -> None:
    """A prober asked: a resume's accept_events are not read (binary_frames and credit are). The session's
    window, the streams it is downgrading and the questions it was asked in words were made for the types it
    opened with, so those stay, as the protocol guide says; a resume listing fewer (as the guide's own
    example does) resumes, and still gets the streamed parts it opened asking for."""
    token = server.token("yan")
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await handshake(first, token)
        await first.send("TRANSACTION_START", {"referenceId": "r", "agent": "echo"})
        started = await first.receive_type("TRANSACTION_START")
        last = started["seq"]
    async with raw_peer(server.ws_url) as narrower:
        await narrower.receive()
        await narrower.hai(token, session=hai["session"], last_rx_seq=last, accept_events=["HAI", "ERROR", "INFO"])
        ready = await narrower.receive_type("INFO")
        while ready["payload"].get("event") != "session.ready":
            ready = await narrower.receive_type("INFO")
        narrower.seq = first.seq  # (the session's numbering goes on)
        await narrower.send("MESSAGE", "hello", transaction=started["transaction"], channel="USER")
        part = await narrower.receive_type("MESSAGE_PART")
    assert ready["payload"]["resumed"] is True and ready["session"] == hai["session"]
    assert part["payload"]["text"] == "you said: hello"


async def test_a_resume_of_someone_elses_session_fails_and_reveals_nothing(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as victim:
        hai = await victim.receive()
        await handshake(victim, server.token("victim"))
        async with raw_peer(server.ws_url) as thief:
            await thief.receive()
            await thief.hai(server.token("thief"), session=hai["session"], last_rx_seq="0", **EVERYTHING)
            error = await thief.receive_type("ERROR")
            ready = await thief.receive_type("INFO")
    assert error["payload"]["code"] == "RESUME_FAILED" and error["payload"]["detail"]["reason"] == "unknown"
    assert ready["session"] != hai["session"]


async def test_replay_request_from_seq_1_on_a_fresh_session_resends_the_server_hai(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        hai = await peer.receive()
        await handshake(peer, server.token())
        await peer.send("REPLAY_REQUEST", {"from_seq": "1", "to_seq": "1"})
        again = await peer.receive()
    assert again == hai


async def test_a_replay_request_for_seqs_never_sent_or_backwards_gets_an_error_not_silence(server: LiveServer) -> None:
    """A front-end tester's find: both got no answer at all, and a client waiting for the replay hung."""
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await handshake(peer, server.token())
        ahead = await peer.send("REPLAY_REQUEST", {"from_seq": "9999"})
        first = await peer.receive_type("ERROR")
        backwards = await peer.send("REPLAY_REQUEST", {"from_seq": "2", "to_seq": "1"})
        second = await peer.receive_type("ERROR")
        await peer.send("REPLAY_REQUEST", {"from_seq": "1", "to_seq": "1"})  # the session goes on
        again = await peer.receive()
    assert (first["payload"]["code"], first["payload"]["related_id"]) == ("INVALID_PAYLOAD", ahead)
    assert first["payload"]["detail"] == {"where": "/payload/from_seq"}
    assert (second["payload"]["code"], second["payload"]["related_id"]) == ("INVALID_PAYLOAD", backwards)
    assert second["payload"]["detail"] == {"where": "/payload/to_seq"}
    assert again["type"] == "HAI" and again["seq"] == "1"


async def test_a_client_flooding_replay_requests_without_reading_is_dropped_and_stays_resumable(
    unlimited_server: LiveServer,
) -> None:
    server = unlimited_server
    token = server.token("flood")
    dropped = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(f"session {session_id} disconnected"):
                dropped.set()

    watch, logger = Watch(), logging.getLogger("haip_runtime.session.connection")
    level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        async with raw_peer(server.ws_url, max_queue=1) as peer:  # it stops reading the socket when it does
            session_id = (await peer.receive())["session"]
            await handshake(peer, token)
            for index in range(300):  # a window worth re-sending: 300 PONGs of 3 KB
                await peer.send("PING", {"nonce": f"{index:0>3000}"})
            for _ in range(300):
                await peer.receive_type("PONG")
            for _ in range(3000):
                await peer.send("REPLAY_REQUEST", {"from_seq": "1"})
            # It reads nothing more; the runtime must let it go by itself.
            assert await anyio.to_thread.run_sync(dropped.wait, 30), "the runtime never dropped the stalled client"
            code = await peer.closed(timeout=30)
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
    # 1013 if the close frame got through before the runtime gave up on writing to it, else no close frame.
    assert code in (1013, 1006)
    session = server.runtime.hub.sessions.sessions[session_id]
    assert session.outbox is None and session.detached_at is not None  # resumable


async def test_a_gap_that_is_never_filled_is_given_up_and_the_session_goes_on(unlimited_server: LiveServer) -> None:
    server = unlimited_server
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await handshake(peer, server.token())
        peer.seq += 1  # seq 2 is never sent
        for index in range(1100):
            await peer.send("PING", {"nonce": str(index)})
        received = [await peer.receive()]
        while received[-1]["payload"] != {"nonce": "1099"}:
            received.append(await peer.receive())
    errors = [e["payload"] for e in received if e["type"] == "ERROR"]
    pongs = [e["payload"]["nonce"] for e in received if e["type"] == "PONG"]
    assert pongs == [str(index) for index in range(1100)]
    assert [e["code"] for e in errors] == ["SEQ_VIOLATION"]
    assert errors[0]["detail"]["missing"] == ["2", "2"]
    assert int(received[-1]["ack"]) == 1102  # everything after the gap is acknowledged again


async def test_a_gap_left_open_is_asked_for_then_given_up_after_a_while(server: LiveServer, short_gaps: None) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await handshake(peer, server.token())
        peer.seq += 2  # seqs 2 and 3 are never sent
        await peer.send("PING", {"nonce": "after the gap"})
        request = await peer.receive_type("REPLAY_REQUEST")
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "later"})
        pong = await peer.receive_type("PONG")
    assert request["payload"] == {"from_seq": "2", "to_seq": "3"}
    assert error["payload"]["code"] == "SEQ_VIOLATION" and error["payload"]["detail"]["missing"] == ["2", "3"]
    assert pong["payload"] == {"nonce": "later"} and int(pong["ack"]) == 5


async def test_messages_that_overtook_each_other_are_acted_on_in_seq_order(server: LiveServer) -> None:
    """An integrator's find: an SSE client POSTing without waiting for each answer had its seq 3 acted on
    before its seq 2 when the POSTs overtook each other (PROTOCOL.md section 10: ordered delivery)."""
    async with raw_peer(server.ws_url) as peer:
        session_id = (await peer.receive())["session"]
        await handshake(peer, server.token("orderly"))
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        first = peer.seq + 1
        peer.seq = first  # the POST carrying seq `first` is overtaken by the next one
        await peer.send("MESSAGE", "second", transaction=tx, channel="USER")
        await peer.send("PING", {"nonce": "taken"})  # never held: its PONG says "second" was read
        await peer.receive_type("PONG")
        held = list(server.runtime.hub.sessions.sessions[session_id]._held or ())
        peer.seq = first - 1
        await peer.send("MESSAGE", "first", transaction=tx, channel="USER")
        answers: list[str] = []
        while len(answers) < 2:
            frame = await peer.receive()
            if frame["type"] == "MESSAGE_PART":
                answers.append(frame["payload"]["text"])
    assert held == [first + 1]
    assert answers == ["you said: first", "you said: second"]


async def past_a_lost_seq(server: LiveServer, user: str, count: int) -> tuple[list[str], list[dict[str, Any]]]:
    """``count`` messages to transactions that do not exist, sent after seq 2 was lost: their ids, and the
    payloads of every ERROR until one has come for each (and one for the gap)."""
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await handshake(peer, server.token(user))
        peer.seq += 1  # seq 2 is never sent
        ids = [await peer.send("MESSAGE", "hello", transaction=f"gone-{n}", channel="USER") for n in range(count)]
        frames = [await peer.receive()]
        while len([f for f in frames if f["type"] == "ERROR"]) < count + 1:
            frames.append(await peer.receive())
    return ids, [f["payload"] for f in frames if f["type"] == "ERROR"]


async def test_envelopes_held_past_a_gap_given_up_are_acted_on_without_another_envelope(
    server: LiveServer, short_gaps: None
) -> None:
    ids, errors = await past_a_lost_seq(server, "user", 3)
    assert errors[0]["code"] == "SEQ_VIOLATION" and errors[0]["detail"]["missing"] == ["2", "2"]
    assert [(e["code"], e["related_id"]) for e in errors[1:]] == [("TRANSACTION_NOT_FOUND", i) for i in ids]


async def test_a_seq_far_ahead_is_refused_and_the_numbering_goes_on(server: LiveServer) -> None:
    """A hostile probe's find: one envelope with seq 2^64-1 was taken, its gap given up 5 s later, and from
    then on every envelope of the session was dropped as a duplicate, without a word."""
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await handshake(peer, server.token("jumper"))
        before = peer.seq
        peer.seq = 2**64 - 2
        far = await peer.send("PING", {"nonce": "far"})
        refused = await peer.receive_type("ERROR")
        peer.seq = before
        await peer.send("PING", {"nonce": "next"})
        pong = await peer.receive_type("PONG")
    assert (refused["payload"]["code"], refused["payload"]["related_id"]) == ("SEQ_VIOLATION", far)
    assert pong["payload"] == {"nonce": "next"} and int(pong["ack"]) == before + 1


async def test_envelopes_held_when_the_connection_dropped_are_acted_on_after_the_resume(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's find: the drop cancelled the gap's deadline and the resumed connection never started
    it again: the held envelope waited until the session expired."""
    monkeypatch.setattr(liveness, "GAP_GRACE_SECONDS", 0.3)  # (long enough to drop the link before it)
    monkeypatch.setattr(liveness, "GAP_GIVE_UP_SECONDS", 0.05)
    token = server.token("dropper")
    async with raw_peer(server.ws_url) as peer:
        session_id = (await peer.receive())["session"]
        await handshake(peer, token)
        peer.seq += 1  # seq 2 never arrives
        held = await peer.send("MESSAGE", "hello", transaction="gone-1", channel="USER")
        await peer.send("PING", {"nonce": "read"})
        await peer.receive_type("PONG")
        seq = peer.seq
        server.runtime.hub.sessions.sessions[session_id].unwatch()  # as if the drop came before any deadline
    async with raw_peer(server.ws_url) as again:
        await again.receive()
        again.seq = seq
        await again.hai(token, session=session_id, last_rx_seq="0", **EVERYTHING)
        frames = [await again.receive()]
        while not (frames[-1]["type"] == "ERROR" and frames[-1]["payload"].get("related_id") == held):
            frames.append(await again.receive())
    assert frames[-1]["payload"]["code"] == "TRANSACTION_NOT_FOUND"
    assert any(f["type"] == "ERROR" and f["payload"]["code"] == "SEQ_VIOLATION" for f in frames)


async def test_at_most_64_envelopes_wait_behind_a_gap(server: LiveServer) -> None:
    ids, errors = await past_a_lost_seq(server, "waiting", 65)
    assert errors[0]["code"] == "SEQ_VIOLATION"  # at the 65th, long before the gap's deadline
    assert [e["related_id"] for e in errors[1:]] == ids  # then all of them, in order


async def test_an_envelope_resent_after_a_reconnect_does_not_run_the_agent_twice(server: LiveServer) -> None:
    token = server.token("retry")
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await handshake(first, token)
        await first.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await first.receive_type("TRANSACTION_START")
        tx = started["transaction"]
        message_id = await first.send("MESSAGE", "only once", transaction=tx, channel="USER")
        await first.receive_type("RUN_FINISHED")
        sent_seq = first.seq
    async with raw_peer(server.ws_url) as second:
        await second.receive()
        await second.hai(token, session=hai["session"], last_rx_seq="0", **EVERYTHING)
        second.seq = sent_seq - 1  # re-send the MESSAGE as it was: same seq, same id
        await second.send("MESSAGE", "only once", transaction=tx, channel="USER", id=message_id)
        await second.send("PING", {"nonce": "done"})
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] != "PONG":
            frames.append(await second.receive())
    runs = [f for f in frames if f["type"] == "RUN_STARTED"]
    assert len(runs) == 1  # the original run, replayed; none new


async def test_session_window_is_bounded_by_bytes_whatever_a_client_sends(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        hai = await peer.receive()
        await handshake(peer, server.token("big"))
        big = "x" * 500_000
        for index in range(40):  # 20 MB of PONGs, read as they come
            await peer.send("PING", {"nonce": f"{index}{big}"})
            await peer.receive_type("PONG")
        session = server.runtime.hub.sessions.sessions[hai["session"]]
        assert session.window.bytes <= session.config.replay_window_bytes
        await peer.send("REPLAY_REQUEST", {"from_seq": "1"})
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "REPLAY_TOO_OLD"


def test_gap_constants_are_what_the_protocol_says() -> None:
    assert liveness.GAP_GRACE_SECONDS == 0.5


async def _unused(_: Received) -> None:  # keeps the import honest for type checkers
    await anyio.lowlevel.checkpoint()


async def test_a_tool_call_sent_again_by_a_new_session_runs_once(slow_server: LiveServer) -> None:
    """A reviewer's find: clients send again what a session lost to a restart had not acknowledged; a
    TOOL_CALL the runtime had run (its ack lost with the line) ran again, a tool with side effects twice.
    The same call (its call_id, tool and arguments, from its caller) is taken once, as a message is."""
    token = slow_server.token("bob")
    call = {"tool": "demo.add", "call_id": "c1", "params": {"a": 1, "b": 2}}
    async with raw_peer(slow_server.ws_url) as first:
        await handshake(first, token)
        await first.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
        tx = (await first.receive_type("TRANSACTION_START"))["transaction"]
        await first.send("TOOL_CALL", call, transaction=tx)
        done = await first.receive_type("TOOL_DONE", timeout=20)
    async with raw_peer(slow_server.ws_url) as again:  # a new session: the call sent again, then another
        await handshake(again, token)
        await again.send("TRANSACTION_JOIN", {"since": done["tseq"]}, transaction=tx)
        await again.send("TOOL_CALL", call, transaction=tx)
        await again.send("TOOL_CALL", {**call, "call_id": "c2"}, transaction=tx)
        seen: list[tuple[str, str | None]] = []
        while not seen or seen[-1] != ("TOOL_DONE", "c2"):  # (bounded: each receive times out)
            envelope = await again.receive(timeout=20)
            if envelope["type"] in ("TOOL_CALL", "TOOL_DONE", "ERROR"):
                seen.append((envelope["type"], envelope["payload"].get("call_id")))
    # c1 not run again, and no error: its end comes to the sender again (a client waiting for it is answered)
    assert seen == [("TOOL_DONE", "c1"), ("TOOL_CALL", "c2"), ("TOOL_DONE", "c2")], seen


async def test_a_message_sent_again_after_its_edit_is_taken_once(server: LiveServer) -> None:
    """A reviewer's find: the resend of a message edited meanwhile was refused ("already used"), the
    history holding the edited text."""
    async with HaipClient(server.ws_url, token=server.token("cleo")) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "helo", message_id="m1")
        await client.wait_for(lambda e: e.type == "RUN_FINISHED")
        await client.send("MESSAGE_UPDATE", {"message_id": "m1", "text": "hello"}, transaction=tx, channel="USER")
        for text in ("helo", "hello"):  # as sent, and as edited
            await client.send("MESSAGE", {"text": text, "message_id": "m1"}, transaction=tx, channel="USER")
        await client.send_text(tx, "next", message_id="m2")
        await client.wait_for(lambda e: e.type == "RUN_STARTED" and e.get("message_id") == "m2")
        started = [e.get("message_id") for e in client.received if e.type == "RUN_STARTED"]
        errors = [e for e in client.received if e.type == "ERROR"]
    assert started == ["m1", "m2"] and not errors
