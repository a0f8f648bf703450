"""haip-runtime's agents called as MCP tasks (2025-11-25 "tasks"): a real `mcp.Client` over streamable
HTTP against a real uvicorn, HAIP members over WebSocket watching the same conversations, and
haip-runtime's own MCP bridge as a task client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client, MCPError
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from haip_runtime.bridge import McpBridge, Progress, ServerStatus, TaskState
from haip_runtime.bridge.tasks import _create
from haip_runtime.client import HaipClient
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
RELATED = "io.modelcontextprotocol/related-task"


@pytest.fixture(scope="module")
def door() -> Iterator[LiveServer]:
    config = {
        "mcp_server": {"enabled": True},
        "agents": {
            "storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 10}},
            "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
        },
        "mcp": {"servers": {"demo": DEMO}},
    }
    with live_server(make_config(config)) as live:
        yield live


@asynccontextmanager
async def mcp_client(
    live: LiveServer, user: str = "alice", roles: list[str] | None = None, **options: Any
) -> AsyncIterator[Client]:
    claims = {} if roles is None else {"roles": roles}
    headers = {"Authorization": f"Bearer {live.token(user, **claims)}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(
            streamable_http_client(f"{live.http_url}/mcp", http_client=http), **{"mode": "legacy", **options}
        ) as client,
    ):
        yield client


async def create(client: Client, agent: str, arguments: dict[str, Any], ttl: float = 60) -> types.Task:
    """A task-augmented `tools/call` (the SDK's `call_tool` would check the answer as a plain result)."""
    return (await _create(client.session, agent, arguments, ttl)).task


async def get(session: ClientSession, task_id: str) -> types.GetTaskResult:
    request = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id=task_id))
    return await session.send_request(request, types.GetTaskResult)


async def result(session: ClientSession, task_id: str) -> types.CallToolResult:
    request = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=task_id))
    return await session.send_request(request, types.CallToolResult)


async def cancel(session: ClientSession, task_id: str) -> types.CancelTaskResult:
    request = types.CancelTaskRequest(params=types.CancelTaskRequestParams(task_id=task_id))
    return await session.send_request(request, types.CancelTaskResult)


async def until_status(session: ClientSession, task_id: str, *wanted: str) -> types.GetTaskResult:
    """Poll `tasks/get` as a client does (every `pollInterval`) until the task reaches one of `wanted`."""
    with anyio.fail_after(20):
        while True:  # polling is the protocol here: tasks/get is how a client learns the state
            state = await get(session, task_id)
            if state.status in wanted:
                return state
            await anyio.sleep((state.poll_interval or 500) / 1000)


class StatusNotes(ClientExtension):
    """Keeps the `notifications/tasks/status` the server sends (the SDK hands them only to extensions)."""

    identifier = "dev.haip-runtime.tests/task-status"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.arrived = anyio.Event()

    def notifications(self) -> list[NotificationBinding[Any]]:
        return [
            NotificationBinding(
                method="notifications/tasks/status", params_type=types.TaskStatusNotificationParams, handler=self._seen
            )
        ]

    async def _seen(self, params: types.TaskStatusNotificationParams) -> None:
        self.seen.append((params.task_id, params.status))
        self.arrived.set()
        self.arrived = anyio.Event()


def text(answer: types.CallToolResult) -> str:
    return "".join(block.text for block in answer.content if isinstance(block, types.TextContent))


async def test_legacy_clients_are_offered_tasks_and_every_agent_may_run_as_one(door: LiveServer) -> None:
    async with mcp_client(door) as legacy, mcp_client(door, mode="auto") as modern:
        tools = await legacy.list_tools()
        offered = legacy.server_capabilities.tasks
        modern_tools = await modern.list_tools()
        assert modern.server_capabilities.tasks is None  # the 2026 protocol has tasks as an extension only
    assert all(tool.execution is None for tool in modern_tools.tools)
    assert offered is not None and offered.requests is not None and offered.requests.tools is not None
    assert offered.requests.tools.call is not None and offered.cancel is not None and offered.list is not None
    assert {tool.name: tool.execution.task_support if tool.execution else None for tool in tools.tools} == {
        "echo": "optional",
        "storyteller": "optional",
        "operator": "optional",
    }


async def test_an_agent_called_as_a_task_is_polled_and_answers_what_a_plain_call_answers(door: LiveServer) -> None:
    async with mcp_client(door) as client, mcp_client(door, "bob") as stranger:
        created = await create(client, "echo", {"message": "hello"})
        assert created.status == "working" and created.ttl == 60_000 and created.poll_interval == 500
        done = await until_status(client.session, created.task_id, "completed")
        answer = await result(client.session, created.task_id)
        plain = await client.call_tool("echo", {"message": "hello"})
        listed = await client.session.send_request(types.ListTasksRequest(), types.ListTasksResult)
        with pytest.raises(MCPError) as hidden:
            await get(stranger.session, created.task_id)  # another user's task is not there for them
    assert done.status_message == "the agent has answered"
    assert text(answer) == text(plain) == "you said: hello" and not answer.is_error
    assert answer.structured_content is not None and plain.structured_content is not None
    assert answer.structured_content["status"] == "OK" and answer.structured_content["agent"] == "echo"
    assert answer.meta is not None and answer.meta[RELATED] == {"taskId": created.task_id}
    assert created.task_id in {task.task_id for task in listed.tasks}
    assert hidden.value.error.code == types.INVALID_PARAMS


async def test_cancelling_a_task_mid_run_cancels_the_run_which_a_member_sees(door: LiveServer) -> None:
    async with HaipClient(door.ws_url, token=door.token("alice"), accept_events=list(ALL_EVENTS)) as watcher:
        conversation = await watcher.start_transaction("storyteller")
        async with mcp_client(door) as client:
            created = await create(client, "storyteller", {"message": "a dragon", "conversation_id": conversation})
            await watcher.wait_for(lambda e: e.type == "MESSAGE_PART" and e.transaction == conversation)
            cancelled = await cancel(client.session, created.task_id)
            ended = await watcher.wait_for(lambda e: e.type == "RUN_FINISHED" and e.get("status") == "CANCELLED")
            state = await get(client.session, created.task_id)
            answer = await result(client.session, created.task_id)
            with pytest.raises(MCPError) as again:
                await cancel(client.session, created.task_id)
        async with httpx2.AsyncClient() as http:
            metrics = (await http.get(f"{door.http_url}/metrics")).text
    assert cancelled.status == "cancelled" and state.status == "cancelled" and ended.transaction == conversation
    assert answer.structured_content is not None and answer.structured_content["status"] == "CANCELLED"
    assert answer.structured_content["conversation_id"] == conversation and text(answer).startswith(
        "Once"
    )  # what it said before
    assert again.value.error.code == types.INVALID_PARAMS and "already ended" in again.value.error.message
    assert 'haip_mcp_served_tasks_total{agent="storyteller",status="cancelled"} 1.0' in metrics


async def test_a_tasks_question_goes_to_its_client_through_tasks_result(door: LiveServer) -> None:
    asked: list[tuple[str, Any]] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append((params.message, (params.meta or {}).get(RELATED)))
        return types.ElicitResult(action="accept", content={"name": "Ada", "favourite_colour": "green"})

    notes = StatusNotes()
    async with mcp_client(door, elicitation_callback=elicit, extensions=[notes]) as client:
        created = await create(client, "operator", {"message": "/call demo.ask_user"})
        waiting = await until_status(client.session, created.task_id, "input_required")
        answer = await result(client.session, created.task_id)
        after = await get(client.session, created.task_id)
        with anyio.fail_after(10):
            while (created.task_id, "completed") not in notes.seen:
                await notes.arrived.wait()
    question = "Who are you, and which colour do you like best?"
    assert waiting.status_message == question
    assert asked == [(question, {"taskId": created.task_id})]
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    assert calls[0]["status"] == "OK" and calls[0]["result"]["content"][0]["text"] == "Ada likes green"
    assert after.status == "completed"
    assert [status for task, status in notes.seen if task == created.task_id] == [
        "input_required",
        "working",
        "completed",
    ]


async def test_a_task_clients_answer_that_does_not_fit_is_asked_again_through_tasks_result(door: LiveServer) -> None:
    """An integrator's find: the task went back to ``working`` while its tool still waited, and ``tasks/result``
    never returned."""
    asked: list[str] = []
    answers = [{"name": "Ada"}, {"name": "Ada", "favourite_colour": "green"}]

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content=answers[len(asked) - 1])

    async with mcp_client(door, elicitation_callback=elicit) as client:
        created = await create(client, "operator", {"message": "/call demo.ask_user"})
        await until_status(client.session, created.task_id, "input_required")
        with anyio.fail_after(20):
            answer = await result(client.session, created.task_id)
    assert len(asked) == 2 and "refused" in asked[1] and "favourite_colour" in asked[1]
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    assert calls[0]["status"] == "OK" and calls[0]["result"]["content"][0]["text"] == "Ada likes green"


async def test_a_question_a_task_client_cannot_answer_goes_to_the_human_members(door: LiveServer) -> None:
    async with HaipClient(door.ws_url, token=door.token("alice"), accept_events=list(ALL_EVENTS)) as human:
        conversation = await human.start_transaction("operator")
        async with mcp_client(door) as client:  # no elicitation callback: it declares no elicitation
            arguments = {"message": "/call demo.ask_user", "conversation_id": conversation}
            created = await create(client, "operator", arguments)
            asking = await human.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
            meanwhile = await get(client.session, created.task_id)
            reply = {"call_id": asking.get("call_id"), "input": {"name": "Grace", "favourite_colour": "blue"}}
            await human.send("TOOL_UPDATE", reply, transaction=conversation)
            answer = await result(client.session, created.task_id)
    assert meanwhile.status == "working"  # nothing for the client to answer
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    assert calls[0]["result"]["content"][0]["text"] == "Grace likes blue"


async def test_a_human_answering_first_withdraws_the_question_from_the_task_client(door: LiveServer) -> None:
    asked = anyio.Event()

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.set()
        await anyio.sleep_forever()  # a client whose user never answers
        raise AssertionError("unreachable")

    async with HaipClient(door.ws_url, token=door.token("alice"), accept_events=list(ALL_EVENTS)) as human:
        conversation = await human.start_transaction("operator")
        async with mcp_client(door, elicitation_callback=elicit) as client, anyio.create_task_group() as group:
            group.cancel_scope.deadline = anyio.current_time() + 20  # tasks/result must not wait on the client
            arguments = {"message": "/call demo.ask_user", "conversation_id": conversation}
            created = await create(client, "operator", arguments)
            answers: list[types.CallToolResult] = []

            async def wait_for_result() -> None:
                answers.append(await result(client.session, created.task_id))

            group.start_soon(wait_for_result)
            asking = await human.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
            with anyio.fail_after(10):
                await asked.wait()  # the client is being asked too
            reply = {"call_id": asking.get("call_id"), "input": {"name": "Grace", "favourite_colour": "blue"}}
            await human.send("TOOL_UPDATE", reply, transaction=conversation)
    calls = answers[0].structured_content["tool_calls"] if answers[0].structured_content else []
    assert calls[0]["result"]["content"][0]["text"] == "Grace likes blue"


async def test_haip_runtimes_own_bridge_calls_an_agent_as_a_task(door: LiveServer) -> None:
    """The bridge's task client (tasks.py) against the task server: `use_tasks` on an `optional` tool,
    the run's streamed text reaching `on_progress` though the task's `tools/call` was answered at once
    (server-everything's `simulate-research-query` sends no progress, only task states)."""
    table = {
        "transport": "http",
        "url": f"{door.http_url}/mcp",
        "headers": {"Authorization": f"Bearer {door.token('alice')}"},
        "protocol_mode": "legacy",
        "use_tasks": True,
    }
    listed = anyio.Event()
    states: list[TaskState] = []
    ends: list[tuple[str, str]] = []

    def changed(status: ServerStatus) -> None:
        if any(tool.name == "storyteller" for tool in status.tools):
            listed.set()

    async def seen(state: TaskState) -> None:
        states.append(state)

    said: list[str | None] = []

    async def progress(update: Progress) -> None:
        said.append(update.message)

    async with McpBridge(
        {"door": McpServerConfig.model_validate(table)},
        McpStdioConfig(),
        base_dir=Path.cwd(),
        on_change=changed,
        on_task_end=lambda server, status: ends.append((server, status)),
    ) as bridge:
        with anyio.fail_after(20):
            await listed.wait()
        answer = await bridge.call_tool(
            "door", "storyteller", {"message": "a kite"}, on_task=seen, on_progress=progress
        )
    assert not answer.is_error and "a kite" in "".join(str(block.get("text", "")) for block in answer.content)
    assert states[0].status == "working" and all(state.status in ("working", "completed") for state in states)
    assert ends == [("door", "completed")]
    told = "".join(message or "" for message in said)  # the task's progress, under the call's token
    assert told.startswith("Once upon") and "a kite" in told


async def test_a_task_is_cancelled_and_forgotten_when_its_ttl_runs_out(door: LiveServer) -> None:
    async with mcp_client(door) as client:
        created = await create(client, "storyteller", {"message": "a long tale"}, ttl=1)
        with anyio.fail_after(10):
            answer = await result(client.session, created.task_id)  # held until the task ends
        with pytest.raises(MCPError) as gone:
            await get(client.session, created.task_id)
    assert created.ttl == 1000
    assert answer.structured_content is not None and answer.structured_content["status"] == "CANCELLED"
    assert "no task" in gone.value.error.message


async def test_a_user_holds_a_bounded_number_of_tasks() -> None:
    config = {
        "mcp_server": {"enabled": True, "max_tasks_per_user": 1},
        "agents": {"storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller"}},
    }
    with live_server(make_config(config)) as live:
        async with mcp_client(live) as client:
            running = await create(client, "storyteller", {"message": "x"})
            with pytest.raises(MCPError) as refused:
                await create(client, "echo", {"message": "one too many"})
            await cancel(client.session, running.task_id)
            replacing = await create(client, "echo", {"message": "now there is room"})  # drops the ended one
            answer = await result(client.session, replacing.task_id)
            with pytest.raises(MCPError):
                await get(client.session, running.task_id)
    assert "RUN_LIMIT_EXCEEDED: you already have 1 MCP tasks running" in refused.value.error.message
    assert text(answer) == "you said: now there is room"


async def test_a_newer_tasks_result_takes_over_a_question_an_older_one_holds(door: LiveServer) -> None:
    """A client may drop a `tasks/result` stream and ask again (nothing tells the server): the newest
    asks the question, where it once stayed with the first for good."""
    first_asked = anyio.Event()

    async def never(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        first_asked.set()
        await anyio.sleep_forever()  # the first stream's client is gone
        raise AssertionError("unreachable")

    async def answer(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"name": "Ada", "favourite_colour": "green"})

    async with mcp_client(door, elicitation_callback=never) as first, anyio.create_task_group() as group:
        created = await create(first, "operator", {"message": "/call demo.ask_user"})
        group.start_soon(result, first.session, created.task_id)
        with anyio.fail_after(10):
            await first_asked.wait()
        async with mcp_client(door, elicitation_callback=answer) as second:  # the same user, asking again
            with anyio.fail_after(20):
                answered = await result(second.session, created.task_id)
        group.cancel_scope.cancel()
    calls = answered.structured_content["tool_calls"] if answered.structured_content else []
    assert calls[0]["result"]["content"][0]["text"] == "Ada likes green"


async def test_a_task_is_refused_at_once_for_an_agent_the_caller_may_not_run(door: LiveServer) -> None:
    """No task is promised (and no metric series made) for a name that is no agent, an agent the
    role may not start, or a run past the user's runs at once."""
    config = {
        "mcp_server": {"enabled": True},
        "session": {"max_concurrent_runs": 1},
        "agents": {"storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller"}},
        "roles": {"reader": {"agents": ["echo"]}, "writer": {}},
    }
    with live_server(make_config(config)) as live:
        async with mcp_client(live, user="bob", roles=["writer"]) as client:
            with pytest.raises(MCPError) as unknown:
                await create(client, "no-such-agent", {"message": "x"})
            running = await create(client, "storyteller", {"message": "a long story"})
            with pytest.raises(MCPError) as too_many:
                await create(client, "echo", {"message": "a second run at once"})
            await cancel(client.session, running.task_id)
        headers = {"Authorization": f"Bearer {live.token('rita', roles=['reader'])}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(streamable_http_client(f"{live.http_url}/mcp", http_client=http), mode="legacy") as reader,
        ):
            with pytest.raises(MCPError) as forbidden:
                await create(reader, "storyteller", {"message": "x"})
        metrics = httpx2.get(f"{live.http_url}/metrics").text
    assert "AGENT_NOT_FOUND" in unknown.value.error.message
    assert "RUN_LIMIT_EXCEEDED" in too_many.value.error.message
    assert "UNAUTHORIZED" in forbidden.value.error.message
    assert "no-such-agent" not in metrics


async def test_a_cancelled_tasks_answer_ends_its_tool_calls_cancelled_too(door: LiveServer) -> None:
    """An MCP integrator's find: the answer of a task cancelled mid-call listed the call with no status
    (its TOOL_DONE comes after the caller has left the conversation)."""
    async with HaipClient(door.ws_url, token=door.token("alice"), accept_events=list(ALL_EVENTS)) as watcher:
        conversation = await watcher.start_transaction("operator")
        async with mcp_client(door) as client:
            call = '/call demo.slow_count {"steps": 50, "delay": 0.2}'
            created = await create(client, "operator", {"message": call, "conversation_id": conversation})
            await watcher.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None, timeout=20)
            await cancel(client.session, created.task_id)
            answer = await result(client.session, created.task_id)
    assert answer.structured_content is not None and answer.structured_content["status"] == "CANCELLED"
    [slow] = answer.structured_content["tool_calls"]
    assert slow["tool"] == "demo.slow_count" and slow["status"] == "CANCELLED"
    assert slow["error"]["code"] == "CANCELLED"


async def test_arguments_the_schema_does_not_name_are_refused_in_both_forms(door: LiveServer) -> None:
    """An MCP integrator's finds: the tools' input schema says additionalProperties: false, yet a call
    with one more argument was answered; the task form's refusal did not start with its HAIP code; and
    the output schema lacked the ``error`` that failed answers carry."""
    async with mcp_client(door) as client:
        listed = await client.list_tools()
        plain = await client.call_tool("echo", {"message": "x", "bogus": 1})
        with pytest.raises(MCPError) as refused:
            await create(client, "echo", {"message": "x", "bogus": 1})
    [echo] = [tool for tool in listed.tools if tool.name == "echo"]
    assert echo.output_schema is not None and "error" in echo.output_schema["properties"]
    assert plain.is_error and text(plain) == (
        "INVALID_PAYLOAD: arguments: unknown 'bogus'; these take 'message' and 'conversation_id'"
    )
    assert refused.value.error.code == types.INVALID_PARAMS
    assert refused.value.error.message.startswith("INVALID_PAYLOAD: arguments: unknown 'bogus'")
