"""MCP tools shown to humans, end to end: a real uvicorn, the demo MCP server as a real subprocess,
HAIP clients watching TOOL_LIST, TOOL_CALL, TOOL_UPDATE and TOOL_DONE."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from haip_runtime.client import HaipClient, Received
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from tests.support.demo_mcp import start_http_demo, stop
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


def tools_config(**extra: Any) -> dict[str, Any]:
    return {
        "agents": {
            "operator": {"plugin": "operator", "mcp_servers": ["demo", "short"]},
            "echo": {"plugin": "echo"},
        },
        "mcp": {
            "servers": {
                # "demo" negotiates the protocol (2026 with this SDK), "short" speaks the 2025 one.
                "demo": {**DEMO, "require_approval": ["delete_everything"], "allowed_tools": ["*"]},
                "short": {
                    **DEMO,
                    "protocol_mode": "legacy",
                    "timeout_seconds": 0.5,
                    "approval_timeout_seconds": 0.3,
                    "require_approval": ["delete_everything"],
                    "allowed_tools": ["sleep", "stats", "delete_everything", "ask_user"],
                },
            }
        },
        **extra,
    }


@pytest.fixture(scope="module")
def tool_server() -> Iterator[LiveServer]:
    with live_server(make_config(tools_config())) as live:
        yield live


@asynccontextmanager
async def operator(live: LiveServer, user: str = "alice", **kwargs: Any) -> AsyncIterator[tuple[HaipClient, str]]:
    """A client in a transaction with the operator agent, once both MCP servers' tools are listed."""
    async with HaipClient(live.ws_url, token=live.token(user, **kwargs), timeout=20) as client:
        tx = await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and {"demo.add", "short.sleep"} <= tool_names(e))
        yield client, tx


def tool_names(event: Received) -> set[str]:
    return {tool["name"] for tool in event.get("tools", [])}


def events_of_call(client: HaipClient, call_id: str) -> list[Received]:
    return [e for e in client.received if isinstance(e.payload, dict) and e.get("call_id") == call_id]


async def call(client: HaipClient, tx: str, command: str) -> Received:
    """Send an operator command; return the TOOL_DONE of the call it makes."""
    await client.send_text(tx, command)
    first = await client.wait_for(lambda e: e.type == "TOOL_CALL" and e.get("call_id") not in seen(client))
    return await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == first.get("call_id"))


def seen(client: HaipClient) -> set[str]:
    return {e.get("call_id") for e in client.received if e.type == "TOOL_DONE"}


async def test_tool_list_reaches_the_client_with_server_and_description(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, _):
        listing = [e for e in client.received if e.type == "TOOL_LIST"][-1]
    add = next(tool for tool in listing.get("tools") if tool["name"] == "demo.add")
    assert add == {"name": "demo.add", "description": "Add two numbers.", "server": "demo"}
    # allowed_tools filters: the short server exposes only four tools
    assert {name for name in tool_names(listing) if name.startswith("short.")} == {
        "short.sleep",
        "short.stats",
        "short.delete_everything",
        "short.ask_user",
    }


async def test_slow_tool_reports_rising_progress_then_its_result(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        done = await call(client, tx, '/call demo.slow_count {"steps": 5, "delay": 0.1}')
        answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "returned" in e.get("text", ""))
        flow = events_of_call(client, done.get("call_id"))
    assert [e.type for e in flow][0] == "TOOL_CALL" and flow[-1] is done
    assert flow[0].payload | {"call_id": ""} == {
        "call_id": "",
        "tool": "demo.slow_count",
        "server": "demo",
        "params": {"steps": 5, "delay": 0.1},
        "caller": "operator",
    }
    progress = [e.get("progress") for e in flow if e.type == "TOOL_UPDATE" and e.get("progress") is not None]
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] == 5
    assert all(e.get("total") == 5 for e in flow if e.get("progress") is not None)
    assert done.get("status") == "OK"
    assert done.get("result")["content"] == [{"type": "text", "text": "counted to 5"}]
    assert answer.get("text") == "demo.slow_count returned: counted to 5"
    assert all(e.run_id == done.run_id for e in flow)


async def test_failing_tool_ends_with_error_and_its_message(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        done = await call(client, tx, '/call demo.fail {"message": "disk on fire"}')
        finished = await client.wait_for("RUN_FINISHED")
    assert done.get("status") == "ERROR"
    assert done.get("error") == {"code": "TOOL_ERROR", "message": "Error executing tool fail: disk on fire"}
    assert finished.get("status") == "OK"  # a tool error is a value for the agent, not a crash


async def test_slow_call_times_out_and_is_cancelled_on_the_server(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        before = (await call(client, tx, "/call short.stats")).get("result")["structuredContent"]["cancelled"]
        done = await call(client, tx, '/call short.sleep {"seconds": 30}')
        after = await call(client, tx, f'/call short.stats {{"min_cancelled": {before + 1}}}')
    assert done.get("status") == "ERROR" and done.get("error")["code"] == "TIMEOUT"
    assert after.get("result")["structuredContent"]["cancelled"] == before + 1


async def test_tool_cancel_stops_the_server_side_work(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        before = (await call(client, tx, "/call demo.stats")).get("result")["structuredContent"]["cancelled"]
        await client.send_text(tx, '/call demo.slow_count {"steps": 100, "delay": 0.1}')
        running = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None)
        await client.send("TOOL_CANCEL", {"call_id": running.get("call_id"), "reason": "too slow"}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == running.get("call_id"))
        stats = await call(client, tx, f'/call demo.stats {{"min_cancelled": {before + 1}}}')
    assert done.get("status") == "CANCELLED"
    assert done.get("error") == {"code": "CANCELLED", "message": "cancelled by alice: too slow"}
    flow = [e.get("status") for e in events_of_call(client, done.get("call_id")) if e.type == "TOOL_UPDATE"]
    assert flow[-1] == "CANCELLING"
    assert stats.get("result")["structuredContent"]["cancelled"] == before + 1


async def test_run_cancel_cancels_the_tool_call_of_the_run(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        before = (await call(client, tx, "/call demo.stats")).get("result")["structuredContent"]["cancelled"]
        await client.send_text(tx, '/call demo.slow_count {"steps": 100, "delay": 0.1}')
        running = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None)
        await client.send("RUN_CANCEL", {"run_id": running.run_id}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == running.get("call_id"))
        finished = await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == running.run_id)
        stats = await call(client, tx, f'/call demo.stats {{"min_cancelled": {before + 1}}}')
    assert done.get("status") == "CANCELLED" and finished.get("status") == "CANCELLED"
    assert stats.get("result")["structuredContent"]["cancelled"] == before + 1


@pytest.mark.parametrize(("decision", "status"), [("approve", "OK"), ("reject", "CANCELLED")])
async def test_approval_granted_or_refused(tool_server: LiveServer, decision: str, status: str) -> None:
    async with operator(tool_server) as (client, tx):
        await client.send_text(tx, "/call demo.delete_everything")
        waiting = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
        call_id = waiting.get("call_id")
        await client.send(
            "TOOL_UPDATE", {"call_id": call_id, "decision": decision, "reason": "ok by me"}, transaction=tx
        )
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call_id)
        said = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "delete_everything" in e.get("text", ""))
    assert done.get("status") == status
    if decision == "approve":
        assert done.get("result")["content"][0]["text"] == "pretended to delete everything"
    else:
        assert done.get("error") == {"code": "REJECTED", "message": "rejected by alice: ok by me"}
        assert said.get("text") == "demo.delete_everything ended CANCELLED: rejected by alice: ok by me"


async def test_approval_not_given_in_time_is_a_refusal(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        done = await call(client, tx, "/call short.delete_everything")
    assert done.get("status") == "CANCELLED" and done.get("error")["code"] == "APPROVAL_TIMEOUT"


async def test_answer_to_a_call_that_is_not_waiting_is_invalid_payload(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        sent = await client.send("TOOL_UPDATE", {"call_id": "nope", "decision": "approve"}, transaction=tx)
        error = await client.wait_for("ERROR")
    assert error.get("code") == "INVALID_PAYLOAD" and error.get("related_id") == sent


@pytest.mark.parametrize(
    ("answer", "said", "result"),
    [
        ("input", "answered by alice", "Ada likes green"),
        ("decline", "declined by alice", "declined"),
        # No answer within the server's approval_timeout_seconds (0.3 s): MCP's "cancel", not a member's
        # decline, so the tool can tell them apart; members are told (an agent author's find: they saw the
        # call run on without a word, and the tool got "decline").
        ("none", "nobody answered within 0.3 s", "cancelled"),
    ],
)
async def test_elicitation_answered_declined_or_unanswered(
    tool_server: LiveServer, answer: str, said: str, result: str
) -> None:
    server = "short" if answer == "none" else "demo"
    async with operator(tool_server) as (client, tx):
        await client.send_text(tx, f"/call {server}.ask_user")
        asking = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
        call_id = asking.get("call_id")
        reply: dict[str, Any] = {"call_id": call_id}
        if answer == "input":
            reply["input"] = {"name": "Ada", "favourite_colour": "green"}
            await client.send("TOOL_UPDATE", reply, transaction=tx)
        elif answer == "decline":
            reply["decision"] = "decline"
            await client.send("TOOL_UPDATE", reply, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call_id)
        running = [
            e.get("message")
            for e in client.received
            if e.type == "TOOL_UPDATE" and e.get("call_id") == call_id and e.get("status") == "RUNNING"
        ]
    request = asking.get("request")
    assert request["message"] == "Who are you, and which colour do you like best?" and request["server"] == server
    assert set(request["schema"]["properties"]) == {"name", "favourite_colour"}
    assert said in running and done.get("result")["content"][0]["text"] == result


async def test_an_answer_that_does_not_fit_the_request_is_refused_and_asked_again(tool_server: LiveServer) -> None:
    """A tester's find: {"name": 5} went to the server as it was, which refused it, and the call failed."""
    async with operator(tool_server) as (client, tx):
        await client.send_text(tx, "/call demo.ask_user")
        asking = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
        call_id = asking.get("call_id")
        wrong = await client.send("TOOL_UPDATE", {"call_id": call_id, "input": {"name": 5}}, transaction=tx)
        refused = await client.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == wrong)
        right = {"call_id": call_id, "input": {"name": "Ada", "favourite_colour": "green"}}
        await client.send("TOOL_UPDATE", right, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call_id)
    assert refused.get("code") == "INVALID_PAYLOAD" and refused.get("detail") == {"where": "/payload/input/name"}
    assert refused.get("message").endswith("5 is not of type 'string'; the request still waits")
    assert done.get("status") == "OK" and done.get("result")["content"][0]["text"] == "Ada likes green"


async def test_tool_list_changed_sends_a_new_tool_list(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        await call(client, tx, "/call demo.toggle_extra_tool")
        added = await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.extra" in tool_names(e))
        await call(client, tx, "/call demo.toggle_extra_tool")
        removed = await client.wait_for(
            lambda e: e.type == "TOOL_LIST" and e.seq > added.seq and "demo.extra" not in tool_names(e)
        )
    assert "demo.add" in tool_names(removed)


async def test_client_calls_a_tool_directly(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        params = {"a": 2, "b": 3}
        await client.send("TOOL_CALL", {"call_id": "mine-1", "tool": "demo.add", "params": params}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "mine-1")
        started = await client.wait_for(lambda e: e.type == "TOOL_CALL" and e.get("call_id") == "mine-1")
    assert started.get("caller") == "alice" and started.run_id is None
    assert done.get("status") == "OK" and done.get("result")["structuredContent"] == {"result": 5.0}


async def test_a_result_that_breaks_the_tools_own_output_schema_ends_the_call_as_failed(
    tool_server: LiveServer,
) -> None:
    """A hostile probe's find: 1e308 + 1e308 is infinite, the server sends its result as null, and the MCP
    SDK's check of it against the tool's outputSchema raised RuntimeError, which escaped the proxy: no
    TOOL_DONE ever came, the run failed with INTERNAL_ERROR and the history showed the call RUNNING."""
    async with operator(tool_server) as (client, tx):
        params = {"a": 1e308, "b": 1e308}
        await client.send("TOOL_CALL", {"call_id": "inf-1", "tool": "demo.add", "params": params}, transaction=tx)
        direct = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "inf-1")
        via_agent = await call(client, tx, '/call demo.add {"a": 1e308, "b": 1e308}')
        finished = await client.wait_for("RUN_FINISHED")
    for done in (direct, via_agent):
        assert done.get("status") == "ERROR" and done.get("error")["code"] == "TOOL_FAILED"
        assert done.get("error")["message"] == (
            "MCP server 'demo' answered the call to 'add' wrongly: "
            "Invalid structured content returned by tool add: None is not of type 'number'"
        )
    assert finished.get("status") == "OK"


async def test_tool_schema_on_request(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        await client.send("TOOL_SCHEMA", {"tool": "demo.add"}, transaction=tx)
        reply = await client.wait_for("TOOL_SCHEMA")
    schema = reply.get("schema")
    assert reply.get("tool") == "demo.add" and schema["name"] == "demo.add"
    assert set(schema["inputSchema"]["properties"]) == {"a", "b"}


async def test_tool_events_reach_a_legacy_client_as_info(tool_server: LiveServer) -> None:
    legacy = sorted(TRANSACTION_ERA_EVENTS)
    async with HaipClient(tool_server.ws_url, token=tool_server.token(), accept_events=legacy, timeout=20) as client:
        tx = await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.add" in tool_names(e))
        await client.send_text(tx, '/call demo.add {"a": 1, "b": 1}')
        done = await client.wait_for(
            lambda e: e.type == "INFO" and e.get("event") == "tool" and e.get("action") == "done"
        )
        message = await client.wait_for("MESSAGE")
    assert done.get("status") == "OK" and message.payload == "demo.add returned: 2.0"


async def test_tool_call_to_an_unknown_tool_is_tool_not_found(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        sent = await client.send("TOOL_CALL", {"tool": "demo.nothing", "params": {}}, transaction=tx)
        error = await client.wait_for("ERROR")
        via_agent = await call(client, tx, "/call demo.nothing")
    assert error.get("code") == "TOOL_NOT_FOUND" and error.get("related_id") == sent
    assert via_agent.get("status") == "ERROR" and via_agent.get("error")["code"] == "TOOL_NOT_FOUND"


def roles_config() -> dict[str, Any]:
    return tools_config(roles={"user": {"tools": ["demo.add", "demo.stats"]}, "admin": {}})


async def test_user_without_permission_is_refused_and_sees_only_allowed_tools() -> None:
    with live_server(make_config(roles_config())) as live:
        async with HaipClient(live.ws_url, token=live.token("bob"), timeout=20) as client:
            tx = await client.start_transaction("operator")
            listing = await client.wait_for(lambda e: e.type == "TOOL_LIST" and bool(tool_names(e)))
            sent = await client.send("TOOL_CALL", {"tool": "demo.fail", "params": {}}, transaction=tx)
            error = await client.wait_for("ERROR")
            via_agent = await call(client, tx, "/call demo.fail")
            allowed = await call(client, tx, '/call demo.add {"a": 1, "b": 2}')
        async with operator(live, "root", roles=["admin"]) as (admin, admin_tx):
            admin_done = await call(admin, admin_tx, "/call demo.fail")
    assert tool_names(listing) == {"demo.add", "demo.stats"}
    assert error.get("code") == "UNAUTHORIZED" and error.get("related_id") == sent
    assert via_agent.get("error")["code"] == "UNAUTHORIZED" and allowed.get("status") == "OK"
    assert admin_done.get("error")["code"] == "TOOL_ERROR"


async def test_role_without_the_agent_cannot_start_it() -> None:
    config = tools_config(roles={"user": {"agents": ["echo"]}})
    with live_server(make_config(config)) as live:
        async with HaipClient(live.ws_url, token=live.token("bob"), timeout=20) as client:
            await client.send("TOOL_LIST", {})
            agents = await client.wait_for("TOOL_LIST")
            with pytest.raises(Exception) as caught:
                await client.start_transaction("operator")
    assert tool_names(agents) == {"echo"}
    assert getattr(caught.value, "code", None) == "UNAUTHORIZED"


async def test_killed_server_fails_the_call_clearly_then_comes_back(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        pid = (await call(client, tx, "/call demo.pid")).get("result")["structuredContent"]["result"]
        await client.send_text(tx, '/call demo.slow_count {"steps": 100, "delay": 0.1}')
        running = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None)
        os.kill(pid, signal.SIGKILL)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == running.get("call_id"))
        # (after the failed call: run alone, the first lists of a server still connecting match too)
        gone = await client.wait_for(
            lambda e: e.type == "TOOL_LIST" and e.seq > done.seq and "demo.add" not in tool_names(e)
        )
        back = await client.wait_for(
            lambda e: e.type == "TOOL_LIST" and e.seq > gone.seq and "demo.add" in tool_names(e)
        )
        again = await call(client, tx, "/call demo.pid")
    assert done.get("status") == "ERROR" and done.get("error")["code"] == "TOOL_FAILED"
    assert "demo" in done.get("error")["message"]
    assert back.seq > gone.seq and again.get("status") == "OK"
    assert again.get("result")["structuredContent"]["result"] != pid


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_tools_over_streamable_http_show_progress_and_results() -> None:
    port = unused_port()
    process = start_http_demo(port)
    try:
        http = {"transport": "http", "url": f"http://127.0.0.1:{port}/mcp"}
        config = {
            "agents": {"operator": {"plugin": "operator", "mcp_servers": ["web"]}},
            "mcp": {"servers": {"web": http}},
        }
        with live_server(make_config(config)) as live:
            async with HaipClient(live.ws_url, token=live.token(), timeout=20) as client:
                tx = await client.start_transaction("operator")
                await client.wait_for(lambda e: e.type == "TOOL_LIST" and "web.slow_count" in tool_names(e))
                done = await call(client, tx, '/call web.slow_count {"steps": 3, "delay": 0.05}')
                flow = events_of_call(client, done.get("call_id"))
    finally:
        stop(process)
    progress = [e.get("progress") for e in flow if e.get("progress") is not None]
    assert progress == sorted(progress) and progress[-1] == 3
    assert done.get("status") == "OK" and done.get("result")["content"][0]["text"] == "counted to 3"


async def test_ending_the_transaction_cancels_its_tool_calls(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        await client.send(
            "TOOL_CALL",
            {"call_id": "long-1", "tool": "demo.slow_count", "params": {"steps": 100, "delay": 0.1}},
            transaction=tx,
        )
        await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None)
        await client.end_transaction(tx, "closing time")
        ended = await client.wait_for("TRANSACTION_END")
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "long-1")
    assert done.get("status") == "CANCELLED"
    assert done.get("error") == {"code": "CANCELLED", "message": "the transaction ended: closing time"}
    assert done.seq < ended.seq


async def test_chatty_progress_is_coalesced_and_the_last_update_is_kept(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        done = await call(client, tx, '/call demo.slow_count {"steps": 300, "delay": 0}')
        updates = [e for e in events_of_call(client, done.get("call_id")) if e.get("progress") is not None]
    assert 1 <= len(updates) < 300
    assert updates[-1].get("progress") == 300 and updates[-1].get("message") == "step 300 of 300"


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("/help", "I run MCP tools for you."),
        ("what can you do?", "I only run tools."),
        ("/call", "Usage: /call <tool> [json args]"),
        ("/call demo.add {oops", "The arguments are not JSON: Expecting property name enclosed in double quotes"),
        ("/call demo.add [1, 2]", "The arguments must be a JSON object"),
        ('/call add {"a": 1, "b": 2}', "demo.add returned: 3.0"),
    ],
    ids=["help", "plain-text", "no-tool", "bad-json", "not-an-object", "bare-name"],
)
async def test_operator_commands(tool_server: LiveServer, command: str, answer: str) -> None:
    async with operator(tool_server) as (client, tx):
        await client.send_text(tx, command)
        said = await client.wait_for("MESSAGE_PART")
    assert said.get("text").startswith(answer)


async def test_a_server_that_is_down_costs_only_its_own_tools() -> None:
    config = tools_config()
    config["agents"]["operator"]["mcp_servers"] = ["demo", "ghost"]
    config["mcp"]["servers"]["ghost"] = {"transport": "stdio", "command": "/nonexistent/mcp-server"}
    with live_server(make_config(config)) as live:
        async with HaipClient(live.ws_url, token=live.token(), timeout=20) as client:
            tx = await client.start_transaction("operator")
            await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.add" in tool_names(e))
            ghost = await call(client, tx, "/call ghost.anything")
            demo = await call(client, tx, '/call demo.add {"a": 1, "b": 1}')
            await client.send("TOOL_CALL", {"tool": "ghost.anything", "call_id": "mine", "params": {}}, transaction=tx)
            direct = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "mine")
            said = [e for e in client.received if e.transaction == tx and e.type in ("INFO", "TOOL_LIST")]
    # Before the first TOOL_LIST, the new member is told which of the transaction's servers are not
    # connected (a tester's client could not tell "no tools" from "tools still coming").
    first_list = next(index for index, e in enumerate(said) if e.type == "TOOL_LIST")
    told = {e.get("server"): e.get("state") for e in said[:first_list] if e.get("event") == "mcp.server"}
    assert told.get("ghost") in ("connecting", "failed", "reconnecting")
    assert direct.get("error") == ghost.get("error")  # one answer, whoever calls
    assert ghost.get("status") == "ERROR" and ghost.get("error")["code"] == "SERVER_UNAVAILABLE"
    assert ghost.get("error")["message"].startswith("MCP server 'ghost' is not connected (")
    assert "command not found" in ghost.get("error")["message"]
    assert demo.get("status") == "OK"


async def test_stdio_server_sees_only_the_safe_environment_and_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAIP_TEST_SECRET", "s3cret")
    config = tools_config()
    config["mcp"]["servers"]["demo"]["env"] = {"DEMO_GREETING": "hello"}
    with live_server(make_config(config)) as live:
        async with operator(live) as (client, tx):
            done = await call(client, tx, "/call demo.env_names")
    names = set(done.get("result")["structuredContent"]["result"])
    assert "DEMO_GREETING" in names and "PATH" in names
    assert "HAIP_TEST_SECRET" not in names


async def test_a_call_id_in_use_is_refused_even_in_the_same_instant(tool_server: LiveServer) -> None:
    async with operator(tool_server) as (client, tx):
        body = {"call_id": "twice", "tool": "demo.slow_count", "params": {"steps": 3, "delay": 0.05}}
        await client.send("TOOL_CALL", body, transaction=tx)
        # Another call under the same id (the same call sent again is taken once, as a resend: whether it
        # came before the first was numbered or after made this test fail once in CI, with the same body)
        other = {**body, "params": {"steps": 2, "delay": 0.05}}
        second = await client.send("TOOL_CALL", other, transaction=tx)
        error = await client.wait_for("ERROR")
        await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "twice")
        starts = [e for e in client.received if e.type == "TOOL_CALL" and e.get("call_id") == "twice"]
    assert error.get("code") == "INVALID_PAYLOAD" and error.get("related_id") == second
    assert len(starts) == 1


def test_a_result_read_back_from_its_tool_done_says_what_the_model_was_told() -> None:
    from haip_runtime.tools.proxy import ToolCallResult

    ok = {"call_id": "c1", "status": "OK", "result": {"content": [], "structuredContent": {"sum": 5}}}
    failed = {"call_id": "c2", "status": "ERROR", "error": {"code": "TIMEOUT", "message": "too slow"}}
    odd = {"call_id": "c3", "status": "MAYBE"}
    read = [ToolCallResult.from_done("demo.add", done) for done in (ok, failed, odd)]
    assert [result.model_text for result in read[:2]] == ['{"sum": 5}', "TIMEOUT: too slow"]
    assert read[0].done_payload() == ok and read[1].done_payload() == failed
    assert read[2].status == "ERROR" and read[2].done_payload() == {"call_id": "c3", "status": "ERROR"}


def test_a_result_over_the_limit_is_cut_with_a_note_and_fits() -> None:
    from haip_runtime.tools.cutting import cut_result, json_size

    image = {"type": "image", "data": "i" * 30_000, "mimeType": "image/png"}
    content = [{"type": "text", "text": '"quoted"\n' * 10_000}, image, {"type": "text", "text": "tail"}]
    kept, structured = cut_result(content, {"again": "s" * 50_000}, 40_000, "demo")
    assert json_size({"content": kept, "structuredContent": structured}) <= 40_000
    assert structured is None and [block["type"] for block in kept] == ["text", "text"]
    assert kept[0]["text"].startswith('"quoted"\n') and "mcp.servers.demo.max_result_bytes" in kept[-1]["text"]
    small = [{"type": "text", "text": "fine"}]
    assert cut_result(small, {"a": 1}, 40_000, "demo") == (small, {"a": 1})


def test_an_input_answer_is_checked_without_trusting_the_servers_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reviewer's find: jsonschema's default registry fetched any URL a ``$ref`` named, from the event
    loop; a server's ``pattern`` ran on a member's input; and a broken schema made every answer fail."""
    import urllib.request

    from haip_runtime.exceptions import ProtocolError
    from haip_runtime.tools.proxy import _check_input

    fetched: list[object] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: fetched.append(args))
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^a$"},  # not run
            "ref": {"$ref": "http://127.0.0.1:9/schema.json"},  # not followed
            "age": {"type": "integer", "minimum": 0},
        },
        "required": ["name"],
    }
    _check_input({"name": "b", "ref": 1, "age": 3}, schema, "r")  # fits what is checked
    assert fetched == []
    with pytest.raises(ProtocolError) as refused:
        _check_input({"name": "b", "age": -1}, schema, "r")
    assert refused.value.detail == {"where": "/payload/input/age"}
    with pytest.raises(ProtocolError) as missing:  # (an integrator's find: where named the object, not the field)
        _check_input({"age": 3}, schema, "r")
    assert missing.value.detail == {"where": "/payload/input/name"}
    for broken in ({"type": "strin"}, {"type": 5}, {"properties": {"x": {"pattern": "("}}}):
        _check_input({"x": 1}, broken, "r")  # let through: the server checks what it gets


def test_an_input_request_takes_input_or_a_decline_and_refuses_an_approval() -> None:
    """A prober's find: ``decision: "approve"`` sent to an input request was taken, as a decline."""
    from haip_runtime.exceptions import ProtocolError
    from haip_runtime.tools.proxy import check_answer

    check_answer("input", None, {"input": {"name": "Ada"}}, "r")
    check_answer("input", None, {"decision": "decline"}, "r")
    for wrong in ({"decision": "approve"}, {"decision": "reject"}, {}):
        with pytest.raises(ProtocolError) as refused:
            check_answer("input", None, wrong, "r")
        assert refused.value.detail == {"where": "/payload/input"}


def test_tool_patterns_take_the_tools_own_name_or_its_full_name() -> None:
    """A newcomer's find: ``require_approval = ["demo.delete_everything"]`` (the name shown everywhere)
    matched nothing, and the tool ran without asking."""
    from haip_runtime.config.models import tool_matches

    assert tool_matches("demo", "delete_everything", ["demo.delete_everything"])
    assert tool_matches("demo", "delete_everything", ["delete_*"]) and tool_matches("demo", "add", ["demo.*"])
    assert not tool_matches("demo", "delete_everything", ["other.delete_everything", "delete_everythng"])
    assert not tool_matches("reader", "delete_all", ["read*"])  # (an allow-list: no wider than it was)
