"""Tool calls run as MCP tasks, through the bridge, against the real server-everything from npm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from haip_runtime.bridge import ElicitationAnswer, ElicitationRequest, McpBridge, ServerStatus, TaskState
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import ToolTimeoutError
from tests.support.everything import everything_over_http, everything_server

pytestmark = pytest.mark.anyio

RESEARCH = "simulate-research-query"


class Watched:
    """What the bridge told: each task state, and each task's end."""

    def __init__(self) -> None:
        self.states: list[TaskState] = []
        self.ends: list[tuple[str, str]] = []
        self.reached: dict[str, anyio.Event] = {}

    async def on_task(self, state: TaskState) -> None:
        self.states.append(state)
        for message, event in self.reached.items():
            if state.message and state.message.startswith(message):
                event.set()

    def when(self, message: str) -> anyio.Event:
        return self.reached.setdefault(message, anyio.Event())


@asynccontextmanager
async def everything(watched: Watched, url: str | None = None, **extra: object) -> AsyncIterator[McpBridge]:
    table = everything_server(**extra) if url is None else {"transport": "http", "url": url, **extra}
    config = McpServerConfig.model_validate(table)
    listed = anyio.Event()

    def changed(status: ServerStatus) -> None:
        if any(tool.name == RESEARCH for tool in status.tools):  # it registers the tool after the handshake
            listed.set()

    async with McpBridge(
        {"ev": config},
        McpStdioConfig(),
        base_dir=Path.cwd(),
        on_change=changed,
        on_task_end=lambda server, status: watched.ends.append((server, status)),
    ) as bridge:
        with anyio.fail_after(30):
            await listed.wait()
        yield bridge


async def test_a_tool_that_requires_tasks_runs_as_one_to_its_result_with_each_state_told() -> None:
    watched = Watched()
    async with everything(watched) as bridge:
        info = bridge.find_tool(f"ev.{RESEARCH}")
        echo = bridge.find_tool("ev.echo")
        with anyio.fail_after(30):
            result = await bridge.call_tool("ev", RESEARCH, {"topic": "tides"}, on_task=watched.on_task)
    assert info is not None and info.task_support == "required"
    assert echo is not None and echo.task_support == "forbidden"
    assert not result.is_error and result.content[0]["text"].startswith("# Research Report: tides")
    messages = [state.message for state in watched.states if state.status == "working"]
    assert messages == [
        "Gathering sources...",
        "Analyzing content...",
        "Synthesizing findings...",
        "Generating report...",
    ]
    assert len({state.task_id for state in watched.states}) == 1
    assert watched.ends == [("ev", "completed")]


async def test_the_tasks_input_request_reaches_on_elicit_and_the_answer_goes_back_to_the_server() -> None:
    watched = Watched()
    asked: list[ElicitationRequest] = []

    async def answer(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request)
        return ElicitationAnswer("accept", {"interpretation": "snake"})

    async with everything(watched) as bridge:
        arguments = {"topic": "python", "ambiguous": True}
        with anyio.fail_after(30):
            result = await bridge.call_tool("ev", RESEARCH, arguments, on_task=watched.on_task, on_elicit=answer)
    assert [request.schema["required"] for request in asked] == [["interpretation"]]
    assert asked[0].message.startswith('The research query "python" could have multiple interpretations')
    assert result.content[0]["text"].startswith("# Research Report: python (snake)")
    assert ("input_required", "working") in {
        (before.status, after.status) for before, after in zip(watched.states, watched.states[1:], strict=False)
    }


async def test_cancelling_the_call_cancels_the_task_on_the_server_and_reports_its_answer() -> None:
    watched = Watched()
    async with everything(watched) as bridge:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(lambda: bridge.call_tool("ev", RESEARCH, {"topic": "tides"}, on_task=watched.on_task))
                await watched.when("Analyzing content").wait()
                group.cancel_scope.cancel()
    last = watched.states[-1]
    assert (last.status, last.message) == ("cancelled", "Client cancelled task execution.")  # the server's words
    assert watched.ends == [("ev", "cancelled")]


async def test_a_task_past_its_timeout_is_cancelled_on_the_server() -> None:
    watched = Watched()
    async with everything(watched, timeout_seconds=1.5) as bridge:
        with anyio.fail_after(30), pytest.raises(ToolTimeoutError, match="did not finish within 1.5 s"):
            await bridge.call_tool("ev", RESEARCH, {"topic": "tides"}, on_task=watched.on_task)
    assert watched.states[-1].status == "cancelled"
    assert watched.ends == [("ev", "cancelled")]


async def test_an_optional_task_tool_runs_plainly_unless_use_tasks_is_on() -> None:
    watched = Watched()
    async with everything(watched) as bridge:
        supervisor = bridge._supervisors["ev"]
        assert not supervisor.runs_as_task("echo") and supervisor.runs_as_task(RESEARCH)
        result = await bridge.call_tool("ev", "echo", {"message": "hi"}, on_task=watched.on_task)
    assert result.content[0]["text"] == "Echo: hi" and watched.states == [] and watched.ends == []


async def test_over_streamable_http_the_task_asks_through_its_result_stream_and_is_cancelled() -> None:
    watched = Watched()
    asked: list[str] = []

    async def answer(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request.message)
        return ElicitationAnswer("accept", {"interpretation": "comedy"})

    with everything_over_http() as url:
        async with everything(watched, url, protocol_mode="legacy") as bridge:
            with anyio.fail_after(30):
                arguments = {"topic": "python", "ambiguous": True}
                result = await bridge.call_tool("ev", RESEARCH, arguments, on_task=watched.on_task, on_elicit=answer)
                watched.reached.clear()  # the first task reached every stage already
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: bridge.call_tool("ev", RESEARCH, {"topic": "x"}, on_task=watched.on_task))
                    await watched.when("Analyzing content").wait()
                    group.cancel_scope.cancel()
    assert len(asked) == 1 and result.content[0]["text"].startswith("# Research Report: python (comedy)")
    assert watched.states[-1].status == "cancelled"
    assert watched.ends == [("ev", "completed"), ("ev", "cancelled")]
