"""haip-runtime's agents as an MCP server: a real `mcp.Client` over streamable HTTP (both protocol eras)
against a real uvicorn, with HAIP members over WebSocket watching the same conversations."""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, ElicitRequestParams, ElicitResult, TextContent

from haip_runtime.client import HaipClient
from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.inspector import inspect
from tests.support.mcp_http import answer_of, echo_call, initialized, rpc
from tests.support.serving import LiveServer, live_server, make_config
from tests.support.vendor import Reply, VendorServer, openai_text, vendor_server

pytestmark = pytest.mark.anyio

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
MODES = ["auto", "legacy"]  # the 2026-07-28 protocol (auto picks it) and the 2025-11-25 handshake


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


@pytest.fixture(scope="module")
def door(vendor: VendorServer) -> Iterator[LiveServer]:
    gpt = {
        "kind": "openai",
        "base_url": vendor.url + "/v1",
        "api_key": "sk-test",
        "model": "gpt-test",
        "max_retries": 0,
    }
    config = {
        "mcp_server": {"enabled": True},
        "llm": {"gpt": gpt},
        "agents": {
            "assistant": {"plugin": "assistant", "llm": "gpt"},
            "storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 20}},
            "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
        },
        "mcp": {"servers": {"demo": {**DEMO, "require_approval": ["delete_everything"]}}},
        "roles": {"user": {"agents": ["echo", "assistant"]}, "admin": {}},
    }
    with live_server(make_config(config)) as live:
        yield live


def text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


@asynccontextmanager
async def mcp_client(live: LiveServer, mode: str = "auto", token: str | None = None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token or live.token('alice', roles=['admin'])}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(f"{live.http_url}/mcp", http_client=http), mode=mode) as client,
    ):
        yield client


@asynccontextmanager
async def asking_client(live: LiveServer, elicit: Any) -> AsyncIterator[Client]:
    """A 2025-11-25 client that declares elicitation: it is asked a tool's questions (``elicit``)."""
    headers = {"Authorization": f"Bearer {live.token('alice', roles=['admin'])}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(
            streamable_http_client(f"{live.http_url}/mcp", http_client=http), mode="legacy", elicitation_callback=elicit
        ) as client,
    ):
        yield client


@pytest.mark.parametrize("mode", MODES)
async def test_the_agents_a_caller_may_start_are_its_tools(door: LiveServer, mode: str) -> None:
    async with mcp_client(door, mode) as admin, mcp_client(door, mode, door.token("bob")) as user:
        everything = await admin.list_tools()
        limited = await user.list_tools()
    assert {tool.name for tool in everything.tools} == {"echo", "assistant", "storyteller", "operator"}
    assert {tool.name for tool in limited.tools} == {"echo", "assistant"}  # role "user"
    echo = next(tool for tool in everything.tools if tool.name == "echo")
    assert echo.description == "Repeats what you say. Needs no LLM, no keys, no network."
    assert echo.input_schema["required"] == ["message"] and "conversation_id" in echo.input_schema["properties"]


async def test_without_a_valid_token_the_door_answers_401(door: LiveServer) -> None:
    async with httpx2.AsyncClient() as http:
        answer = await http.post(f"{door.http_url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        forged = await http.post(f"{door.http_url}/mcp", json={}, headers={"Authorization": "Bearer not-a-token"})
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"]["code"] == "AUTHENTICATION_FAILED" and forged.status_code == 401


@pytest.mark.parametrize("mode", MODES)
async def test_echo_answers_with_text_and_its_conversation_which_a_later_call_continues(
    door: LiveServer, mode: str
) -> None:
    said: list[str | None] = []

    async def seen(progress: float, total: float | None, message: str | None) -> None:
        said.append(message)

    async with mcp_client(door, mode) as client:
        first = await client.call_tool("echo", {"message": "hello"}, progress_callback=seen)
        conversation = first.structured_content["conversation_id"]
        again = await client.call_tool("echo", {"message": "again", "conversation_id": conversation})
    assert not first.is_error and text(first) == "you said: hello"
    assert first.structured_content == {
        "conversation_id": conversation,
        "agent": "echo",
        "status": "OK",
        "tool_calls": [],
    }
    assert said == ["you said: hello"]
    assert text(again) == "you said: again" and again.structured_content["conversation_id"] == conversation


async def test_a_call_to_another_agent_in_a_conversation_adds_it_as_ag_ui_does(door: LiveServer) -> None:
    """A front-end developer's find: the AG-UI door adds the agent a request names to the conversation, this
    door refused (``AGENT_NOT_FOUND``, though the agent exists)."""
    async with mcp_client(door) as client:
        first = await client.call_tool("echo", {"message": "hello"})
        conversation = first.structured_content["conversation_id"]
        story = await client.call_tool("storyteller", {"message": "a fox", "conversation_id": conversation})
    assert not story.is_error and story.structured_content["agent"] == "storyteller"
    assert story.structured_content["conversation_id"] == conversation and "a fox" in text(story)


async def test_a_call_that_waits_its_turn_says_so_then_is_answered(door: LiveServer) -> None:
    """A reviewer's find: a call queued behind the agent's turn in its conversation said nothing while it
    waited (an MCP client gives up on a call it hears nothing of)."""
    said: list[str | None] = []
    telling = anyio.Event()

    async def seen(progress: float, total: float | None, message: str | None) -> None:
        said.append(message)

    async def hen_seen(progress: float, total: float | None, message: str | None) -> None:
        telling.set()

    async with mcp_client(door) as client:
        first = await client.call_tool("echo", {"message": "hello"})
        conversation = first.structured_content["conversation_id"]
        hen = {"message": "a hen", "conversation_id": conversation}
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(client.call_tool, "storyteller", hen, progress_callback=hen_seen))
            with anyio.fail_after(20):
                await telling.wait()  # the storyteller is telling the first story
            cat = {"message": "a cat", "conversation_id": conversation}
            second = await client.call_tool("storyteller", cat, progress_callback=seen)
    assert said[0] == "[waiting for its turn: 1 in the queue]", said[:3]
    assert not second.is_error and "a cat" in text(second)


async def test_a_member_who_joined_over_websocket_sees_the_mcp_callers_turn_live(door: LiveServer) -> None:
    async with mcp_client(door) as client:
        first = await client.call_tool("echo", {"message": "start"})
        conversation = first.structured_content["conversation_id"]
        async with HaipClient(door.ws_url, token=door.token("alice"), accept_events=list(ALL_EVENTS)) as watcher:
            await watcher.join(conversation)
            await client.call_tool("echo", {"message": "watched", "conversation_id": conversation})
            finished = await watcher.wait_for("RUN_FINISHED")
            seen = [(e.type, e.get("text")) for e in watcher.received if e.transaction == conversation]
    assert finished.get("status") == "OK"
    messages = [body for kind, body in seen if kind == "MESSAGE"]
    parts = [body for kind, body in seen if kind == "MESSAGE_PART"]
    assert messages[-1] == "watched" and parts[-1] == "you said: watched"
    kinds = [kind for kind, _ in seen]
    assert (
        kinds.index("RUN_STARTED")
        < kinds.index("MESSAGE_START")
        < kinds.index("MESSAGE_END")
        < kinds.index("RUN_FINISHED")
    )


async def test_assistant_streams_its_answer_as_progress(door: LiveServer, vendor: VendorServer) -> None:
    vendor.script(Reply(openai_text("The answer ", "is ", "42.")))
    said: list[str | None] = []

    async def seen(progress: float, total: float | None, message: str | None) -> None:
        said.append(message)

    async with mcp_client(door) as client:
        answer = await client.call_tool("assistant", {"message": "what is six times seven?"}, progress_callback=seen)
    assert text(answer) == "The answer is 42." and answer.structured_content["status"] == "OK"
    assert "".join(message or "" for message in said) == "The answer is 42."
    assert vendor.requests[0].body["messages"][-1]["content"] == "what is six times seven?"


async def cancel_a_story(client: Client, conversation: str) -> None:
    """A storyteller call in ``conversation``, cancelled (MCP cancellation) once it streams."""
    streaming = anyio.Event()

    async def seen(progress: float, total: float | None, message: str | None) -> None:
        streaming.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:
            arguments: dict[str, Any] = {"message": "a dragon", "conversation_id": conversation}
            group.start_soon(lambda: client.call_tool("storyteller", arguments, progress_callback=seen))
            await streaming.wait()
            group.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_cancelling_the_call_cancels_the_run_which_a_member_sees_end_cancelled(
    door: LiveServer, mode: str
) -> None:
    async with HaipClient(
        door.ws_url, token=door.token("alice", roles=["admin"]), accept_events=list(ALL_EVENTS)
    ) as watcher:
        conversation = await watcher.start_transaction("storyteller")
        async with mcp_client(door, mode) as client:
            await cancel_a_story(client, conversation)
            ended = await watcher.wait_for(lambda e: e.type == "RUN_FINISHED" and e.get("status") == "CANCELLED")
            answered = await client.call_tool("echo", {"message": "still here"})  # the session goes on
    assert ended.transaction == conversation
    assert text(answered) == "you said: still here"


async def test_an_unknown_conversation_is_an_error_result(door: LiveServer) -> None:
    async with mcp_client(door) as client:
        answer = await client.call_tool("echo", {"message": "x", "conversation_id": "nope"})
    assert answer.is_error and text(answer) == "TRANSACTION_NOT_FOUND: no open conversation 'nope'"


async def test_bad_arguments_say_which_one_is_wrong(door: LiveServer) -> None:
    """A tester's find: {"message": 1} was told "'conversation_id' must be a string", which nobody sent."""
    async with mcp_client(door) as client:
        answers = [
            await client.call_tool("echo", arguments)
            for arguments in ({"message": 1}, {}, {"message": "x", "conversation_id": 7})
        ]
    assert [answer.is_error for answer in answers] == [True, True, True]
    assert [text(answer) for answer in answers] == [
        "INVALID_PAYLOAD: arguments: 'message' (a string) is required; got int",
        "INVALID_PAYLOAD: arguments: 'message' (a string) is required; got none",
        "INVALID_PAYLOAD: arguments: 'conversation_id' must be a string, not int",
    ]


async def test_a_message_over_the_frame_limit_is_refused_as_over_haip(door: LiveServer) -> None:
    """A hostile probe's find: /mcp took a 3 MB message that HAIP refuses (server.max_frame_bytes), and the
    members' clients, which take frames up to that size, were closed 1009 at every resume."""
    limit = door.runtime.config.server.max_frame_bytes
    async with mcp_client(door) as client:
        answer = await client.call_tool("echo", {"message": "x" * limit})
        fits = await client.call_tool("echo", {"message": "x" * (limit - 2048)})
    assert answer.is_error and text(answer).startswith("MESSAGE_TOO_LARGE: a message of")
    assert not fits.is_error


async def test_a_tool_call_of_the_run_waits_for_a_humans_approval_over_haip(door: LiveServer) -> None:
    said: list[str | None] = []

    async def seen(progress: float, total: float | None, message: str | None) -> None:
        said.append(message)

    token = door.token("alice", roles=["admin"])
    async with HaipClient(door.ws_url, token=token, accept_events=list(ALL_EVENTS)) as human:
        conversation = await human.start_transaction("operator")
        async with mcp_client(door) as client, anyio.create_task_group() as group:
            answers: list[CallToolResult] = []

            async def ask() -> None:
                arguments = {"message": "/call demo.delete_everything", "conversation_id": conversation}
                answers.append(await client.call_tool("operator", arguments, progress_callback=seen))

            group.start_soon(ask)
            waiting = await human.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
            await human.send(
                "TOOL_UPDATE", {"call_id": waiting.get("call_id"), "decision": "approve"}, transaction=conversation
            )
    calls = answers[0].structured_content["tool_calls"] if answers[0].structured_content else []
    assert [(call["tool"], call["status"]) for call in calls] == [("demo.delete_everything", "OK")]
    assert calls[0]["result"]["content"][0]["text"] == "pretended to delete everything"
    assert "[demo.delete_everything waits for a member's approval]" in said


def test_the_mcp_inspector_cli_lists_and_calls_an_agent(door: LiveServer, tmp_path: Path) -> None:
    url, token = f"{door.http_url}/mcp", door.token("bob")
    listed = inspect(url, token, tmp_path, "--method", "tools/list")
    called = inspect(url, token, tmp_path, "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "message=hi")
    assert [tool["name"] for tool in listed["tools"]] == ["assistant", "echo"]  # bob's role: not the others
    assert called["content"] == [{"type": "text", "text": "you said: hi"}] and called["isError"] is False
    assert called["structuredContent"]["agent"] == "echo" and called["structuredContent"]["status"] == "OK"


async def test_mcp_calls_at_once_are_limited_per_user() -> None:
    config = make_config(
        {
            "mcp_server": {"enabled": True},
            "agents": {
                "storyteller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": 5},
                }
            },
            "session": {"max_concurrent_runs": 1},
        }
    )
    with live_server(config) as live:
        async with mcp_client(live) as client:
            streaming = anyio.Event()

            async def seen(progress: float, total: float | None, message: str | None) -> None:
                streaming.set()

            with anyio.fail_after(20):
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: client.call_tool("storyteller", {"message": "x"}, progress_callback=seen))
                    await streaming.wait()
                    busy = await client.call_tool("echo", {"message": "meanwhile"})
                    group.cancel_scope.cancel()
    assert busy.is_error and text(busy) == "RUN_LIMIT_EXCEEDED: you already have 1 MCP calls running"
    assert busy.structured_content is not None and busy.structured_content["status"] == "RUN_LIMIT_EXCEEDED"


async def test_calls_past_the_users_open_conversations_end_the_least_recently_active_one() -> None:
    """MCP has no way to end a conversation: each call without ``conversation_id`` opens one, and past
    ``limits.transactions_per_user`` the oldest idle one ends to make room (it was refused for good)."""
    config = make_config({"mcp_server": {"enabled": True}, "limits": {"transactions_per_user": 2}})
    with live_server(config) as live:
        async with mcp_client(live) as client:
            answers = [await client.call_tool("echo", {"message": str(n)}) for n in range(4)]
            opened = [answer.structured_content["conversation_id"] for answer in answers]
            newest = await client.call_tool("echo", {"message": "on", "conversation_id": opened[-1]})
            oldest = await client.call_tool("echo", {"message": "back", "conversation_id": opened[0]})
    assert [answer.is_error for answer in answers] == [False] * 4 and len(set(opened)) == 4
    assert not newest.is_error and text(newest) == "you said: on"
    assert oldest.is_error and text(oldest) == f"TRANSACTION_NOT_FOUND: no open conversation {opened[0]!r}"


async def test_mcp_calls_share_the_users_message_rate() -> None:
    limits = {"user_messages_per_second": 0.001, "user_message_burst": 2}
    with live_server(make_config({"mcp_server": {"enabled": True}, "limits": limits})) as live:
        async with mcp_client(live) as client:
            answers = [await client.call_tool("echo", {"message": str(n)}) for n in range(3)]
    assert [answer.is_error for answer in answers] == [False, False, True]
    assert text(answers[2]).startswith("RATE_LIMITED: more than 0.001 messages a second")


async def test_an_input_request_goes_to_an_mcp_client_that_can_be_asked(door: LiveServer) -> None:
    asked: list[str] = []

    async def elicit(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"name": "Ada", "favourite_colour": "green"})

    async with asking_client(door, elicit) as client:
        answer = await client.call_tool("operator", {"message": "/call demo.ask_user"})
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    assert asked == ["Who are you, and which colour do you like best?"]
    assert calls[0]["status"] == "OK" and calls[0]["result"]["content"][0]["text"] == "Ada likes green"


@pytest.mark.parametrize("good", [True, False], ids=["asked-again", "declined-after-three"])
async def test_an_mcp_clients_answer_that_does_not_fit_is_asked_again_saying_why(door: LiveServer, good: bool) -> None:
    """An integrator's find: an answer missing a required field was dropped, and the call waited out the
    approval timeout (120 s) as if nobody had answered."""
    asked: list[str] = []
    answers = [{"name": "Ada"}] * (3 if not good else 1) + [{"name": "Ada", "favourite_colour": "green"}]

    async def elicit(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content=answers[len(asked) - 1])

    async with asking_client(door, elicit) as client:
        with anyio.fail_after(20):
            answer = await client.call_tool("operator", {"message": "/call demo.ask_user"})
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    question = "Who are you, and which colour do you like best?"
    assert asked[0] == question and len(asked) == (2 if good else 3)
    assert all(again.startswith(question) and "refused" in again and "favourite_colour" in again for again in asked[1:])
    assert all("/payload" not in again and "still waits" not in again for again in asked[1:])  # (HAIP's words)
    result = calls[0]["result"]["content"][0]["text"]
    assert result == "Ada likes green" if good else "declined" in result.lower(), result


async def test_an_input_request_a_client_cannot_be_asked_goes_to_the_human_members(door: LiveServer) -> None:
    token = door.token("alice", roles=["admin"])
    async with HaipClient(door.ws_url, token=token, accept_events=list(ALL_EVENTS)) as human:
        conversation = await human.start_transaction("operator")
        async with mcp_client(door) as client, anyio.create_task_group() as group:  # 2026 protocol: no asking
            answers: list[CallToolResult] = []
            told: list[str | None] = []

            async def seen(progress: float, total: float | None, message: str | None) -> None:
                told.append(message)

            async def ask() -> None:
                arguments = {"message": "/call demo.ask_user", "conversation_id": conversation}
                answers.append(await client.call_tool("operator", arguments, progress_callback=seen))

            group.start_soon(ask)
            asking = await human.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
            reply = {"call_id": asking.get("call_id"), "input": {"name": "Grace", "favourite_colour": "blue"}}
            await human.send("TOOL_UPDATE", reply, transaction=conversation)
    calls = answers[0].structured_content["tool_calls"] if answers[0].structured_content else []
    assert calls[0]["result"]["content"][0]["text"] == "Grace likes blue"
    assert "[demo.ask_user waits for a member's answer]" in told  # (the client is told why nothing comes)


async def test_a_session_is_its_users_alone_another_user_naming_it_finds_none(door: LiveServer) -> None:
    alice = {"Authorization": f"Bearer {door.token('alice', roles=['admin'])}"}
    bob = {"Authorization": f"Bearer {door.token('bob')}"}
    async with httpx2.AsyncClient(headers=alice, timeout=30) as http:
        session = await initialized(http, door.http_url)
        taken = await rpc(http, door.http_url, echo_call(2, "mine"), session, headers=bob)
        ended = await http.delete(f"{door.http_url}/mcp", headers={**bob, "Mcp-Session-Id": session})
        still = await rpc(http, door.http_url, echo_call(3, "still mine"), session)
        closed = await http.delete(f"{door.http_url}/mcp", headers={"Mcp-Session-Id": session})
        gone = await rpc(http, door.http_url, echo_call(4, "after"), session)
    assert taken.status_code == 404 and answer_of(taken)["error"]["message"] == "Session not found"
    assert ended.status_code == 404  # nor can they end it
    assert answer_of(still)["result"]["content"][0]["text"] == "you said: still mine"
    assert closed.status_code == 200 and gone.status_code == 404


async def test_a_body_past_the_doors_limit_is_refused_in_mcps_words(door: LiveServer) -> None:
    """An integrator's find: the 413 spoke of HAIP's envelopes and seqs, which mean nothing to an MCP client."""
    from haip_runtime.bridge.facade import MAX_BODY_BYTES

    headers = {"Authorization": f"Bearer {door.token('alice')}", "Content-Type": "application/json"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(f"{door.http_url}/mcp", content=b" " * (MAX_BODY_BYTES + 1))
    error = refused.json()["error"]
    assert refused.status_code == 413 and error["code"] == "MESSAGE_TOO_LARGE"
    assert error["message"] == (
        f"request body exceeds {MAX_BODY_BYTES} bytes: none of it was taken; send a smaller request"
    )


async def test_a_call_refused_for_the_runs_its_agent_would_need_adds_no_agent() -> None:
    """A reviewer's find: with one run a session, a call naming a second agent in a conversation was refused
    (it needs two) after that agent had joined, and it answered every later message there."""
    config = make_config({"mcp_server": {"enabled": True}, "session": {"max_concurrent_runs": 1}})
    with live_server(config) as live:
        async with mcp_client(live) as client:
            first = await client.call_tool("echo", {"message": "one"})
            conversation = (first.structured_content or {})["conversation_id"]
            refused = await client.call_tool("storyteller", {"message": "two", "conversation_id": conversation})
            agents = list(live.runtime.hub.transactions.live[conversation].agents)
    assert refused.is_error and text(refused).startswith("RUN_LIMIT_EXCEEDED")
    assert agents == ["echo"]
