"""Conversations with agents over a real uvicorn: transactions, messages, runs, downgrades."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest

from haip_runtime.client import ClientError, HaipClient, Received
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from tests.support.raw import raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

LEGACY = sorted(TRANSACTION_ERA_EVENTS)


@pytest.fixture(scope="module")
def agents_server() -> Iterator[LiveServer]:
    agents = {
        "failing": {"plugin": "tests.support.agents:FailingAgent"},
        "waiting": {"plugin": "tests.support.agents:WaitingAgent"},
        "greeter": {"plugin": "tests.support.agents:GreeterAgent"},
        "order": {"plugin": "tests.support.agents:OrderAgent"},
        "calc": {"plugin": "tests.support.agents:CalculatorAgent"},
        "caller": {"plugin": "tests.support.agents:CallerAgent"},
    }
    with live_server(make_config({"agents": agents, "session": {"max_concurrent_runs": 2}})) as live:
        yield live


def of_run(events: list[Received], run_id: str | None) -> list[tuple[str, object]]:
    return [(e.type, e.payload) for e in events if e.run_id == run_id]


async def test_echo_conversation(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token("alice")) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "hello there")
        finished = await client.wait_for("RUN_FINISHED")
        run = of_run(client.received, finished.run_id)
    kinds = [kind for kind, _ in run]
    assert kinds == ["RUN_STARTED", "MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "RUN_FINISHED"]
    assert run[0][1] == {"run_id": finished.run_id, "agent": "echo", "message_id": run[0][1]["message_id"]}  # type: ignore[index]
    assert run[1][1] == {"message_id": run[2][1]["message_id"], "author": "echo"}  # type: ignore[index]
    assert run[2][1]["text"] == "you said: hello there"  # type: ignore[index]
    assert finished.payload == {"run_id": finished.run_id, "status": "OK"}


async def test_transaction_start_reply_carries_the_reference_id_and_the_tool_list_follows(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        tx = await client.start_transaction("echo")
        started = await client.wait_for("TRANSACTION_START")
        tool_list = await client.wait_for("TOOL_LIST")
    assert started.transaction == tx and started.get("agent") == "echo" and started.get("referenceId")
    assert tool_list.transaction == tx and tool_list.payload == {"tools": []}
    assert tool_list.seq == started.seq + 1


async def test_streaming_plugin_sends_parts_in_order(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        tx = await client.start_transaction("storyteller")
        await client.send_text(tx, "a dragon")
        finished = await client.wait_for("RUN_FINISHED")
        parts = [e.get("text") for e in client.received if e.type == "MESSAGE_PART" and e.run_id == finished.run_id]
        seqs = [e.seq for e in client.received]
    assert len(parts) > 10
    assert "".join(parts).startswith("Once upon a time, someone said 'a dragon'.")
    assert seqs == list(range(1, len(seqs) + 1))


async def test_streamed_text_reaches_a_legacy_client_as_one_message(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token(), accept_events=LEGACY) as client:
        tx = await client.start_transaction("storyteller")
        await client.send_text(tx, "a dragon")
        message = await client.wait_for("MESSAGE")
        await client.send("PING", {"nonce": "after"})
        await client.wait_for("PONG")  # everything of the run has arrived before it
        types = {e.type for e in client.received}
        infos = [e.payload for e in client.received if e.type == "INFO"]
    assert isinstance(message.payload, str) and message.payload.endswith("smiled. The end.")
    assert message.raw["channel"] == "AGENT" and message.transaction == tx
    assert types <= TRANSACTION_ERA_EVENTS
    assert not [info for info in infos if info.get("event") == "run"]  # PROTOCOL.md section 12


async def test_agent_that_raises_gets_run_error_and_the_transaction_goes_on(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("failing")
        await client.send_text(tx, "break")
        error = await client.wait_for("RUN_ERROR")
        await client.send_text(tx, "fine")
        finished = await client.wait_for("RUN_FINISHED")
        run = of_run(client.received, error.run_id)
        answer = [p for kind, p in of_run(client.received, finished.run_id) if kind == "MESSAGE_PART"]
    assert error.get("code") == "INTERNAL_ERROR" and "ValueError" in error.get("message")
    assert "the plugin broke" not in error.get("message")  # internals stay in the server log
    assert [kind for kind, _ in run] == ["RUN_STARTED", "MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "RUN_ERROR"]
    assert answer == [{"message_id": answer[0]["message_id"], "text": "all good"}]  # type: ignore[index]


async def test_a_tool_call_with_no_mcp_servers_configured_is_refused_as_a_value(agents_server: LiveServer) -> None:
    """As in the harness (a newcomer's find: ``call_tool`` raised there, and the turn failed ``INTERNAL_ERROR``)."""
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("caller")
        await client.send_text(tx, "tickets.search")
        finished = await client.wait_for("RUN_FINISHED")
        run = of_run(client.received, finished.run_id)
    done = next(payload for kind, payload in run if kind == "TOOL_DONE")
    assert [kind for kind, _ in run if kind.startswith("TOOL")] == ["TOOL_CALL", "TOOL_DONE"]
    assert done["status"] == "ERROR" and done["error"]["code"] == "TOOL_NOT_FOUND"  # type: ignore[index]
    said = "".join(str(p["text"]) for kind, p in run if kind == "MESSAGE_PART")  # type: ignore[index]
    assert said == "ERROR TOOL_NOT_FOUND"


async def test_run_error_reaches_a_legacy_client_as_an_error(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token(), accept_events=LEGACY) as client:
        tx = await client.start_transaction("failing")
        await client.send_text(tx, "break")
        error = await client.wait_for("ERROR")
        partial = await client.wait_for("MESSAGE")
    assert error.get("code") == "INTERNAL_ERROR" and error.get("related_id") == partial.run_id
    assert partial.payload == "about to fail"


async def test_run_cancel_stops_the_turn(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("waiting")
        await client.send_text(tx, "think hard")
        part = await client.wait_for("MESSAGE_PART")
        await client.send("RUN_CANCEL", {"run_id": part.run_id}, transaction=tx)
        finished = await client.wait_for("RUN_FINISHED")
        ended = await client.wait_for("MESSAGE_END")
    assert finished.payload == {"run_id": part.run_id, "status": "CANCELLED"}
    assert ended.get("message_id") == part.get("message_id")


async def test_run_cancel_naming_a_started_message_cancels_its_turns(agents_server: LiveServer) -> None:
    """A prober's find: "stop" right after sending names the message (its turn's id is not known yet); once
    the turn had started, that was INVALID_PAYLOAD "no running run or waiting message" and it ran on."""
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("waiting")
        await client.send_text(tx, "think hard", message_id="race0")
        started = await client.wait_for(lambda e: e.type == "RUN_STARTED" and e.get("message_id") == "race0")
        await client.send("RUN_CANCEL", {"run_id": "race0"}, transaction=tx)
        finished = await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == started.run_id)
        errors = [e for e in client.received if e.type == "ERROR"]
    assert finished.get("status") == "CANCELLED" and not errors


async def test_a_join_takes_an_integer_since_and_refuses_an_empty_agent(agents_server: LiveServer) -> None:
    """A prober's finds: ``since`` as a JSON integer was refused as "not a string" (REPLAY_REQUEST takes
    one), and ``{"agent": ""}`` was read as a plain join, history and all."""
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("waiting")
        await client.send("TRANSACTION_JOIN", {"since": 0}, transaction=tx)
        joined = await client.wait_for(lambda e: e.type == "TRANSACTION_JOIN" and e.transaction == tx)
        sent = await client.send("TRANSACTION_JOIN", {"agent": ""}, transaction=tx)
        refused = await client.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == sent)
    assert "members" in joined.payload
    assert refused.get("code") == "INVALID_PAYLOAD" and refused.get("detail", {}).get("where") == "/payload/agent"


async def test_a_message_past_the_run_limit_waits_and_starts_when_a_run_ends(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("waiting")
        for text in ("one", "two"):
            await client.send_text(tx, text)
        first = await client.wait_for("RUN_STARTED")
        await client.send_text(tx, "three")  # at the limit of 2: it waits
        queued = await client.wait_for(lambda e: e.type == "INFO" and e.get("event") == "run.queued")
        await client.send_text(tx, "four")
        fourth = await client.wait_for(lambda e: e.type == "INFO" and e.get("position") == 2)
        await client.send("RUN_CANCEL", {"run_id": fourth.get("message_id")}, transaction=tx)  # taken out of the queue
        unqueued = await client.wait_for(lambda e: e.type == "INFO" and e.get("event") == "run.unqueued")
        await client.send("RUN_CANCEL", {"run_id": first.run_id}, transaction=tx)
        third = await client.wait_for(
            lambda e: e.type == "RUN_STARTED" and e.get("message_id") == queued.get("message_id")
        )
        errors = [e for e in client.received if e.type == "ERROR"]
        finished = [e.run_id for e in client.received if e.type == "RUN_FINISHED"]
    assert queued.payload == {
        "event": "run.queued",
        "message_id": queued.get("message_id"),
        "position": 1,
        "agents": ["waiting"],
    }
    assert unqueued.get("message_id") == fourth.get("message_id") and unqueued.get("reason") == "cancelled by alice"
    assert errors == [] and finished == [first.run_id] and third.get("agent") == "waiting"


async def test_on_start_greets_and_history_reaches_the_agent(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token("dana")) as client:
        tx = await client.start_transaction("greeter", {"topic": "tea"})
        greeting = await client.wait_for("MESSAGE_PART")
        await client.wait_for("RUN_FINISHED")
        await client.send_text(tx, "first")
        await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id != greeting.run_id)
        history = [e.get("text") for e in client.received if e.type == "MESSAGE_PART"][-1]
    assert greeting.get("text") == "hello dana, params=['topic']"
    assert history == "agent:hello dana, params=['topic'] | user:first"


async def test_object_message_is_validated_against_the_agent_input_schema(agents_server: LiveServer) -> None:
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("order")
        bad = await client.send("MESSAGE", {"text": "tea", "quantity": "lots"}, transaction=tx, channel="USER")
        error = await client.wait_for("ERROR")
        await client.send("MESSAGE", {"text": "tea", "quantity": 2}, transaction=tx, channel="USER")
        part = await client.wait_for("MESSAGE_PART")
        # plain text, named (the object form of a string): not the agent's schema's to check, as the string is not
        await client.send("MESSAGE", {"text": "coffee", "message_id": "m-coffee"}, transaction=tx, channel="USER")
        plain = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "coffee" in str(e.get("text")))
    assert error.get("code") == "INVALID_PAYLOAD" and error.get("related_id") == bad
    assert error.get("detail") == {"where": "/payload/quantity"}
    assert part.get("text") == "ordered 2 x tea" and plain.get("text") == "ordered 1 x coffee"
    assert [e for e in client.received if e.type == "ERROR"] == [error]


async def test_a_structured_message_needs_no_text_when_the_agent_declares_its_fields(agents_server: LiveServer) -> None:
    """An author's tester: ``{"a": 2, "b": 40}`` to an agent whose schema is ``a, b`` was refused for its
    missing ``text``, which the schema does not have."""
    async with HaipClient(agents_server.ws_url, token=agents_server.token()) as client:
        tx = await client.start_transaction("calc")
        await client.send("MESSAGE", {"a": 2, "b": 40}, transaction=tx, channel="USER")
        answer = await client.wait_for("MESSAGE_PART")
        bad = await client.send("MESSAGE", {"a": 2, "b": "many"}, transaction=tx, channel="USER")
        error = await client.wait_for("ERROR")
    assert answer.get("text") == "2 + 40 = 42"
    assert (error.get("code"), error.get("related_id"), error.get("detail")) == (
        "INVALID_PAYLOAD",
        bad,
        {"where": "/payload/b"},
    )


async def test_unknown_agent_gets_agent_not_found_with_the_reference_id(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        with pytest.raises(ClientError) as caught:
            await client.start_transaction("nobody")
        error = await client.wait_for("ERROR")
        tx = await client.start_transaction("echo")  # the connection is still good
    assert caught.value.code == "AGENT_NOT_FOUND"
    assert error.transaction == error.get("related_id") and tx


async def test_a_start_naming_no_agent_is_invalid_payload_and_a_payload_of_the_wrong_kind_says_so(
    server: LiveServer,
) -> None:
    """A tester's finds: "no agent named None" (AGENT_NOT_FOUND), and a MESSAGE whose payload was 42 said
    where it was wrong as "/payload/dict[str,any]", pydantic's name for a member of a union."""
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"params": {}}, transaction="ref-1")
        nameless = await peer.receive_type("ERROR")
        await peer.send("MESSAGE", 42, transaction="ref-1")
        wrong_kind = await peer.receive_type("ERROR")
    assert (nameless["payload"]["code"], nameless["payload"]["detail"]) == (
        "INVALID_PAYLOAD",
        {"where": "/payload/toolName"},
    )
    assert nameless["payload"]["message"] == "TRANSACTION_START names no agent: give toolName (or agent)"
    assert wrong_kind["payload"]["code"] == "INVALID_MESSAGE" and wrong_kind["payload"]["detail"] == {
        "where": "/payload"
    }
    assert wrong_kind["payload"]["message"] == "invalid envelope at /payload: expected an object or text"


async def test_an_agent_whose_class_cannot_be_made_is_said_so_and_leaves_no_transaction() -> None:
    """A tester's find: an agent whose ``__init__`` raised got "internal error; see the server log" (HAIP)
    and the same HTTP 500 (AG-UI), naming no agent."""
    config = make_config(
        {"agents": {"broken": {"plugin": "tests.support.agents:BrokenAgent"}, "echo": {"plugin": "echo"}}}
    )
    with live_server(config) as live:
        async with HaipClient(live.ws_url, token=live.token()) as client:
            with pytest.raises(ClientError) as caught:
                await client.start_transaction("broken")
            tx = await client.start_transaction("echo")  # the session goes on
        async with httpx2.AsyncClient(base_url=live.http_url) as http:
            agui = await http.post(
                "/ag-ui/broken",
                json={"threadId": "t-broken", "runId": "r", "messages": [{"id": "m", "role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {live.token()}"},
            )
        live_transactions = list(live.runtime.hub.transactions.live)
    assert agui.status_code == 500 and agui.json()["error"]["code"] == "INTERNAL_ERROR"
    assert (
        agui.json()["error"]["message"] == "agent 'broken' could not be started: ValueError (the server log says more)"
    )
    assert caught.value.code == "INTERNAL_ERROR"
    assert str(caught.value).endswith("agent 'broken' could not be started: ValueError (the server log says more)")
    assert live_transactions == [tx]  # nothing left of the one that failed


async def test_tool_list_outside_a_transaction_lists_the_agents(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        await client.send("TOOL_LIST", {})
        listing = await client.wait_for("TOOL_LIST")
    names = [tool["name"] for tool in listing.get("tools")]
    assert names == ["echo", "storyteller"] and listing.transaction is None
    assert listing.get("tools")[1]["description"] == "Streams a short story about what you say."


async def test_message_to_a_transaction_of_someone_else_is_not_found(server: LiveServer) -> None:
    async with (
        HaipClient(server.ws_url, token=server.token("alice")) as alice,
        HaipClient(server.ws_url, token=server.token("eve")) as eve,
    ):
        tx = await alice.start_transaction("echo")
        await eve.send_text(tx, "let me in")
        error = await eve.wait_for("ERROR")
        await eve.send("TRANSACTION_JOIN", {}, transaction=tx)
        refused = await eve.wait_for(lambda e: e.type == "ERROR" and e is not error)
    assert error.get("code") == "TRANSACTION_NOT_FOUND" and refused.get("code") == "TRANSACTION_NOT_FOUND"
    assert not [e for e in alice.received if e.type.startswith("MESSAGE")]


async def test_second_connection_of_the_same_user_joins_and_sees_history_and_live_events(server: LiveServer) -> None:
    token = server.token("frank")
    async with HaipClient(server.ws_url, token=token) as phone, HaipClient(server.ws_url, token=token) as laptop:
        tx = await phone.start_transaction("echo")
        await phone.send_text(tx, "from the phone")
        await phone.wait_for("RUN_FINISHED")
        joined = await laptop.join(tx)
        replayed = await laptop.wait_for(lambda e: e.type == "MESSAGE_PART")
        await laptop.send_text(tx, "from the laptop")
        forwarded = await phone.wait_for(lambda e: e.type == "MESSAGE" and e.get("text") == "from the laptop")
        await laptop.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: from the laptop")
        await phone.wait_for(lambda e: e.type == "MESSAGE_PART" and e.get("text") == "you said: from the laptop")
    assert joined.get("members") == ["frank"] and joined.get("agents") == ["echo"]
    assert replayed.get("text") == "you said: from the phone"
    assert forwarded.get("author") == "frank" and forwarded.raw["channel"] == "USER"


async def test_transaction_end_reaches_members_and_refuses_later_messages(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        tx = await client.start_transaction("echo")
        await client.end_transaction(tx, "done here")
        ended = await client.wait_for("TRANSACTION_END")
        await client.send_text(tx, "anyone?")
        error = await client.wait_for("ERROR")
    assert ended.payload == {"reason": "done here"} and ended.transaction == tx
    assert error.get("code") == "TRANSACTION_NOT_FOUND"


async def test_ping_from_the_client_gets_pong_with_its_nonce(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        await client.send("PING", {"nonce": "n-42"})
        pong = await client.wait_for("PONG")
    assert pong.payload == {"nonce": "n-42"}


async def test_server_pings_and_the_client_library_answers() -> None:
    config = make_config({"session": {"heartbeat_interval_seconds": 0.05, "heartbeat_timeout_seconds": 5}})
    with live_server(config) as live:
        async with HaipClient(live.ws_url, token=live.token()) as client:
            await client.wait_for("PING")
            await client.wait_for(lambda e: e.type == "PING" and e.seq > 3)
            tx = await client.start_transaction("echo")
    assert tx and client.close_code == 1000


async def test_a_second_agent_joins_and_both_answer(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token()) as client:
        tx = await client.start_transaction("echo")
        await client.send("TRANSACTION_JOIN", {"agent": "storyteller"}, transaction=tx)
        joined = await client.wait_for("TRANSACTION_JOIN")
        await client.send_text(tx, "duet")
        await client.wait_for(lambda e: e.type == "RUN_FINISHED")
        await client.wait_for(lambda e: len([x for x in client.received if x.type == "RUN_FINISHED"]) == 2)
        authors = {e.get("author") for e in client.received if e.type == "MESSAGE_START"}
    assert joined.get("agents") == ["echo", "storyteller"]
    assert authors == {"echo", "storyteller"}


async def test_author_edits_a_message_and_other_members_see_it(server: LiveServer) -> None:
    token = server.token("gus")
    async with HaipClient(server.ws_url, token=token) as one, HaipClient(server.ws_url, token=token) as two:
        tx = await one.start_transaction("echo")
        await two.join(tx)
        sent = await one.send("MESSAGE", {"text": "helo", "message_id": "m-1"}, transaction=tx, channel="USER")
        await two.wait_for(lambda e: e.type == "MESSAGE" and e.get("message_id") == "m-1")
        await one.send("MESSAGE_UPDATE", {"message_id": "m-1", "text": "hello"}, transaction=tx, channel="USER")
        edit = await two.wait_for("MESSAGE_UPDATE")
        await two.send("MESSAGE_UPDATE", {"message_id": "m-1", "text": "hijacked"}, transaction=tx, channel="USER")
        await two.send("MESSAGE_UPDATE", {"message_id": "m-404", "text": "x"}, transaction=tx, channel="USER")
        refused = await two.wait_for("ERROR")
    assert sent and edit.payload == {"message_id": "m-1", "text": "hello", "author": "gus"}
    assert refused.get("code") == "INVALID_PAYLOAD"


async def test_silent_peer_is_dropped_after_the_heartbeat_timeout_and_can_resume() -> None:
    from tests.support.peers import open_peer
    from tests.support.raw import raw_peer

    config = make_config({"session": {"heartbeat_interval_seconds": 0.05, "heartbeat_timeout_seconds": 0.1}})
    with live_server(config) as live:
        token = live.token("quiet")
        # Over SSE, where only the client's envelopes show it is alive (on WebSocket its library would
        # answer the WebSocket pings, which keep a healthy client connected: tests/behaviour/test_heartbeat.py).
        async with open_peer("sse", live, token) as peer:
            hai = await peer.receive()
            await peer.hai(token)
            ping = await peer.receive_type("PING")
            code = await peer.closed()  # never answers: dropped
        async with HaipClient(live.ws_url, token=token) as client:
            await client.wait_for("INFO")
        async with raw_peer(live.ws_url) as again:
            await again.receive()
            await again.hai(token, session=hai["session"], last_rx_seq=ping["seq"])
            ready = await again.receive_type("INFO")
    assert code == 1013
    assert ready["payload"]["resumed"] is True and ready["session"] == hai["session"]
