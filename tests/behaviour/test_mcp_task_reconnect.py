"""An MCP task outlives a reconnect of its server's connection: haip-runtime's bridge (A) calls an agent
of another haip-runtime (B, a real uvicorn with `[mcp_server] enabled`) as a task, through a TCP proxy
the test cuts and heals (`tests/support/netcut.py`). B keeps its tasks across client connections, so the
call follows the same task on the next connection; a B that lost it (restarted) ends the call with an error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import httpx2
import pytest

from haip_runtime.bridge import McpBridge, Progress, ServerStatus, TaskState, ToolResult
from haip_runtime.bridge import tasks as bridge_tasks
from haip_runtime.client import HaipClient
from haip_runtime.config import HaipConfig
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import ToolError
from tests.support.agents import GATES, Gate
from tests.support.netcut import NetCut, netcut
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

SECRET = "a signing key shared by both lives of server B"
"""B signs with a fixed secret, so that the token A holds is still good after B restarts."""


def server_b() -> HaipConfig:
    return make_config(
        {
            "auth": {"mode": "jwt", "secret": SECRET},
            "mcp_server": {"enabled": True},
            "agents": {"gate": {"plugin": "tests.support.agents:GateAgent"}},
        }
    )


@contextmanager
def gate(name: str) -> Iterator[Gate]:
    """A gate for this test's run of B's `gate` agent; opened at the end, so no run is left waiting."""
    GATES[name] = opened = Gate()
    try:
        yield opened
    finally:
        opened.open()
        GATES.pop(name, None)


class Watch:
    """What A's bridge tells: server statuses, the task's states and progress, the task's end."""

    def __init__(self) -> None:
        self.states: list[TaskState] = []
        self.said: list[str] = []
        self.ends: list[tuple[str, str]] = []
        self.statuses: list[ServerStatus] = []
        self._changed = anyio.Event()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def status(self, status: ServerStatus) -> None:
        self.statuses.append(status)
        self._poke()

    async def task(self, state: TaskState) -> None:
        self.states.append(state)
        self._poke()

    async def progress(self, progress: Progress) -> None:
        self.said.append(progress.message or "")
        self._poke()

    def ended(self, server: str, status: str) -> None:
        self.ends.append((server, status))
        self._poke()

    async def until(self, condition: Callable[[], bool], timeout: float = 20) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    def waiting(self) -> bool:
        """Whether the call has said it waits for the server to come back."""
        return any(state.local for state in self.states)

    def back(self) -> bool:
        """Whether the call found its task again on a new connection (a server state after the wait)."""
        first = next((index for index, state in enumerate(self.states) if state.local), None)
        return first is not None and any(not state.local for state in self.states[first:])


@asynccontextmanager
async def bridge_a(line: NetCut, token: str, watch: Watch) -> AsyncIterator[McpBridge]:
    """A's bridge with B's `/mcp`, through `line`, as a task server (`use_tasks`)."""
    table = {
        "transport": "http",
        "url": f"http://127.0.0.1:{line.port}/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
        "protocol_mode": "legacy",
        "use_tasks": True,
    }
    async with McpBridge(
        {"b": McpServerConfig.model_validate(table)},
        McpStdioConfig(),
        base_dir=Path.cwd(),
        on_change=watch.status,
        on_task_end=watch.ended,
    ) as bridge:
        await watch.until(lambda: any(tool.name == "gate" for tool in bridge.tools()))
        yield bridge


def text(result: ToolResult) -> str:
    return "".join(str(block.get("text", "")) for block in result.content)


async def cut(line: NetCut) -> None:
    await anyio.to_thread.run_sync(line.cut)


async def heal(line: NetCut) -> None:
    await anyio.to_thread.run_sync(line.heal)


async def test_a_task_outlives_a_cut_line_and_ends_once_with_its_real_answer() -> None:
    watch = Watch()
    answers: list[ToolResult] = []
    with live_server(server_b()) as b, netcut(b.port) as line, gate("outlives") as opened:
        async with bridge_a(line, b.token("alice"), watch) as bridge, anyio.create_task_group() as group:
            group.cancel_scope.deadline = anyio.current_time() + 60

            async def call() -> None:
                arguments = {"message": "outlives"}
                answers.append(
                    await bridge.call_tool("b", "gate", arguments, on_task=watch.task, on_progress=watch.progress)
                )

            group.start_soon(call)
            await watch.until(lambda: "waiting at the gate" in "".join(watch.said))  # B's agent is running
            await cut(line)
            await watch.until(watch.waiting)
            await heal(line)
            await watch.until(watch.back)  # the same task, on the new connection, still running
            await anyio.to_thread.run_sync(opened.open)
        status = bridge.status()["b"]
        metrics = await served_tasks(b)
    assert [text(answer) for answer in answers] == ["waiting at the gate; through the gate outlives"]
    assert not answers[0].is_error and watch.ends == [("b", "completed")]
    assert opened.runs == 1 and 'agent="gate",status="completed"} 1.0' in metrics  # B ran the agent once
    assert status.connects == 2
    waiting = next(state for state in watch.states if state.local)
    assert (
        waiting.status == "working" and waiting.message is not None and "waiting for it to come back" in waiting.message
    )
    assert len({state.task_id for state in watch.states}) == 1


async def test_a_server_that_lost_the_task_ends_the_call_with_an_error_not_a_hang() -> None:
    watch = Watch()
    failures: list[ToolError] = []
    with ExitStack() as second_life, ExitStack() as first_life, gate("forgotten") as opened:
        b = first_life.enter_context(live_server(server_b()))
        port, token = b.port, b.token("alice")
        with netcut(port) as line:
            async with bridge_a(line, token, watch) as bridge, anyio.create_task_group() as group:
                group.cancel_scope.deadline = anyio.current_time() + 60

                async def call() -> None:
                    with pytest.raises(ToolError) as failed:
                        await bridge.call_tool("b", "gate", {"message": "forgotten"}, on_progress=watch.progress)
                    failures.append(failed.value)

                group.start_soon(call)
                await watch.until(lambda: "waiting at the gate" in "".join(watch.said))
                await cut(line)
                await anyio.to_thread.run_sync(first_life.close)  # B stops: its tasks are gone
                again = live_server(server_b(), port=port)  # and starts again, knowing nothing of them
                await anyio.to_thread.run_sync(second_life.enter_context, again)
                await heal(line)
                await watch.until(lambda: bool(watch.ends))
    assert watch.ends == [("b", "lost")] and opened.runs == 1 and opened.cancelled.is_set()
    assert "lost task task-" in str(failures[0]) and "while the connection was down" in str(failures[0])


async def test_a_cancel_while_the_line_is_down_reaches_the_server_once_it_is_back() -> None:
    watch = Watch()
    with live_server(server_b()) as b, netcut(b.port) as line, gate("cancelled") as opened:
        async with bridge_a(line, b.token("alice"), watch) as bridge, anyio.create_task_group() as group:
            group.cancel_scope.deadline = anyio.current_time() + 60
            caller = anyio.CancelScope()

            async def call() -> None:
                with caller:
                    arguments = {"message": "cancelled"}
                    await bridge.call_tool("b", "gate", arguments, on_task=watch.task, on_progress=watch.progress)

            group.start_soon(call)
            await watch.until(lambda: "waiting at the gate" in "".join(watch.said))
            await cut(line)
            await watch.until(watch.waiting)
            caller.cancel()  # as TOOL_CANCEL does
            await heal(line)
            await watch.until(lambda: bool(watch.ends))
        ran_down = await anyio.to_thread.run_sync(opened.cancelled.wait, 10)
    assert watch.ends == [("b", "cancelled")] and ran_down and opened.runs == 1
    assert watch.states[-1].status == "cancelled" and not watch.states[-1].local


async def test_a_cancel_that_cannot_reach_the_server_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_tasks, "CANCEL_GRACE", 0.5)
    watch = Watch()
    with live_server(server_b()) as b, netcut(b.port) as line, gate("unreached") as opened:
        async with bridge_a(line, b.token("alice"), watch) as bridge, anyio.create_task_group() as group:
            group.cancel_scope.deadline = anyio.current_time() + 60
            caller = anyio.CancelScope()

            async def call() -> None:
                with caller:
                    arguments = {"message": "unreached"}
                    await bridge.call_tool("b", "gate", arguments, on_task=watch.task, on_progress=watch.progress)

            group.start_soon(call)
            await watch.until(lambda: "waiting at the gate" in "".join(watch.said))
            await cut(line)
            await watch.until(watch.waiting)
            caller.cancel()
            await watch.until(lambda: bool(watch.ends))  # the line stays cut
    told = watch.states[-1]
    assert watch.ends == [("b", "lost")] and opened.runs == 1
    assert told.local and told.message is not None and "the cancel could not reach MCP server 'b'" in told.message


async def served_tasks(b: LiveServer) -> str:
    async with httpx2.AsyncClient() as http:
        metrics = (await http.get(f"{b.http_url}/metrics")).text
    return "\n".join(line for line in metrics.splitlines() if line.startswith("haip_mcp_served_tasks_total"))


async def test_members_of_runtime_a_see_the_call_wait_for_the_server_and_end_with_its_answer() -> None:
    """The same through a whole runtime A: its members' TOOL_UPDATEs say the call waits for B, then
    follow the task again; one TOOL_DONE carries B's answer."""
    with live_server(server_b()) as b, netcut(b.port) as line, gate("members") as opened:
        table = {
            "transport": "http",
            "url": f"http://127.0.0.1:{line.port}/mcp",
            "headers": {"Authorization": f"Bearer {b.token('alice')}"},
            "protocol_mode": "legacy",
            "use_tasks": True,
        }
        a_config = make_config(
            {"agents": {"operator": {"plugin": "operator", "mcp_servers": ["b"]}}, "mcp": {"servers": {"b": table}}}
        )
        with live_server(a_config) as a:
            async with HaipClient(a.ws_url, token=a.token("alice"), timeout=20) as member:
                tx = await member.start_transaction("operator")
                await member.wait_for(
                    lambda e: e.type == "TOOL_LIST" and "b.gate" in {t["name"] for t in e.get("tools", [])}
                )
                call = {"call_id": "g1", "tool": "b.gate", "params": {"message": "members"}}
                await member.send("TOOL_CALL", call, transaction=tx)
                await member.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("message") == "waiting at the gate")
                await cut(line)
                waiting = await member.wait_for(
                    lambda e: e.type == "TOOL_UPDATE" and "come back" in e.get("message", "")
                )
                await heal(line)
                back = await member.wait_for(
                    lambda e: e.type == "TOOL_UPDATE" and (e.tseq or 0) > (waiting.tseq or 0) and e.get("task")
                )
                await anyio.to_thread.run_sync(opened.open)
                done = await member.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "g1")
                dones = [e for e in member.received if e.type == "TOOL_DONE"]
    assert waiting.get("status") == "RUNNING" and waiting.get("task")["status"] == "working"
    assert back.get("task") == {"id": waiting.get("task")["id"], "status": "working"}
    assert back.get("message") == "the agent is running"  # B's own word on its task, found again
    assert done.get("status") == "OK" and len(dones) == 1 and opened.runs == 1
    assert "through the gate members" in done.get("result")["content"][0]["text"]
