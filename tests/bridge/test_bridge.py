"""McpBridge against the real demo MCP server: over stdio and streamable HTTP, in both protocol eras.

One bridge is shared by most tests (starting a Python MCP server takes over a second); it holds
the demo server five ways (see SERVERS), once with an allowed_tools filter, and three servers
that cannot connect. Tests that break or restart a server get a bridge of their own.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import pytest

import haip_runtime.bridge.supervisor as supervisor_module
from haip_runtime.bridge import (
    ElicitationAnswer,
    ElicitationRequest,
    McpBridge,
    Progress,
    ServerState,
    ServerStatus,
    ToolResult,
)
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import ToolError, ToolTimeoutError, ToolUnavailableError
from tests.support.demo_mcp import start_http_demo, stop

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "haip_runtime" / "demo" / "mcp_server.py"
DEMO_TOOLS = set("add slow_count sleep fail delete_everything ask_user toggle_extra_tool stats env_names pid".split())
#: The demo server reached five ways: stdio and HTTP, each in the 2026 protocol (auto) and the 2025 one,
#: and stdio with the 2026 protocol forced (no probe).
SERVERS = ["demo", "legacy", "modern", "web", "web_legacy"]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


class Changes:
    """Records what `on_change` reports; tests wait for a server to reach some status."""

    def __init__(self) -> None:
        self.seen: list[ServerStatus] = []
        self._changed = anyio.Event()

    def __call__(self, status: ServerStatus) -> None:
        self.seen.append(status)
        self._changed.set()
        self._changed = anyio.Event()

    def latest(self, name: str) -> ServerStatus | None:
        return next((status for status in reversed(self.seen) if status.name == name), None)

    async def until(self, name: str, predicate: Callable[[ServerStatus], bool]) -> ServerStatus:
        with anyio.fail_after(10):
            while True:
                status = self.latest(name)
                if status is not None and predicate(status):
                    return status
                await self._changed.wait()


def stdio_server(**options: Any) -> McpServerConfig:
    return McpServerConfig(transport="stdio", command=sys.executable, args=[str(DEMO)], **options)


def tool_names(status: ServerStatus) -> set[str]:
    return {tool.name for tool in status.tools}


def connected(status: ServerStatus) -> bool:
    return status.state is ServerState.CONNECTED


def text(result: ToolResult) -> str:
    return "".join(block["text"] for block in result.content if block["type"] == "text")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def cancelled_count(bridge: McpBridge, server: str, at_least: int = 0) -> int:
    result = await bridge.call_tool(server, "stats", {"min_cancelled": at_least})
    assert result.structured_content is not None
    count: int = result.structured_content["cancelled"]
    return count


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    """The demo server over streamable HTTP on a free port, for the whole module."""
    process = subprocess.Popen(
        [sys.executable, str(DEMO), "--http", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 15)
        assert ready, "the demo HTTP server did not print its address within 15 s"
        line = process.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.removeprefix("listening on ").strip()
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


@pytest.fixture(scope="module")
def changes() -> Changes:
    return Changes()


@pytest.fixture(scope="module")
async def bridge(http_url: str, changes: Changes) -> AsyncIterator[McpBridge]:
    servers = {
        "demo": stdio_server(),
        "legacy": stdio_server(protocol_mode="legacy"),
        "modern": stdio_server(protocol_mode="modern"),
        "web": McpServerConfig(transport="http", url=http_url),
        "web_legacy": McpServerConfig(transport="http", url=http_url, protocol_mode="legacy"),
        "limited": stdio_server(allowed_tools=["add", "slow_*"]),
        "ghost": McpServerConfig(transport="stdio", command="haip-test-no-such-command"),
        "broken": McpServerConfig(transport="stdio", command=sys.executable, args=["-c", "raise SystemExit(3)"]),
        "nowhere": McpServerConfig(transport="http", url=f"http://127.0.0.1:{unused_port()}/mcp"),
    }
    async with McpBridge(servers, McpStdioConfig(), base_dir=ROOT, on_change=changes) as bridge:
        await bridge.wait_settled(20)
        yield bridge


# --- tools ---------------------------------------------------------------------------------------


async def test_tools_of_connected_servers_are_listed_filtered_by_allowed_tools(bridge: McpBridge) -> None:
    status = bridge.status()
    for name in [*SERVERS, "limited"]:
        assert status[name].state is ServerState.CONNECTED
        assert status[name].connects == 1
    assert tool_names(status["demo"]) == DEMO_TOOLS
    assert tool_names(status["limited"]) == {"add", "slow_count"}
    assert {tool.full_name for tool in bridge.tools(["limited"])} == {"limited.add", "limited.slow_count"}
    assert {tool.server for tool in bridge.tools()} == {*SERVERS, "limited"}

    add = bridge.find_tool("demo.add")
    assert add is not None
    assert (add.server, add.name, add.description) == ("demo", "add", "Add two numbers.")
    assert add.input_schema["properties"].keys() == {"a", "b"}
    assert bridge.find_tool("limited.fail") is None
    assert bridge.find_tool("ghost.add") is None


async def test_unknown_disallowed_and_disconnected_tools_are_unavailable(bridge: McpBridge) -> None:
    with pytest.raises(ToolUnavailableError, match="no MCP server named 'nobody'"):
        await bridge.call_tool("nobody", "add", {})
    with pytest.raises(ToolUnavailableError, match="'limited.fail' is not allowed"):
        await bridge.call_tool("limited", "fail", {})
    with pytest.raises(ToolUnavailableError, match="has no tool 'subtract'"):
        await bridge.call_tool("demo", "subtract", {})
    with pytest.raises(ToolUnavailableError, match="'ghost' is not connected"):
        await bridge.call_tool("ghost", "add", {})


async def test_a_missing_command_fails_clearly_and_other_servers_are_unaffected(bridge: McpBridge) -> None:
    ghost = bridge.status()["ghost"]
    assert ghost.state in (ServerState.FAILED, ServerState.RECONNECTING)
    assert ghost.error == "cannot start 'haip-test-no-such-command': command not found"
    assert (ghost.tools, ghost.connects) == ((), 0)
    assert text(await bridge.call_tool("demo", "add", {"a": 1, "b": 1})) == "2.0"


async def test_a_missing_cwd_is_said_so_not_taken_for_a_missing_command(tmp_path: Path) -> None:
    """A tester's find: ``cwd = "nonexistent_dir"`` read "command not found" in serve and tools."""
    gone = tmp_path / "gone"
    config = McpServerConfig(transport="stdio", command=sys.executable, cwd=gone)
    async with McpBridge({"lost": config}, McpStdioConfig(), base_dir=tmp_path) as bridge:
        await bridge.wait_settled(10)
        lost = bridge.status()["lost"]
    assert lost.error == f"cannot start {sys.executable!r}: its cwd {str(gone)!r} is not a folder"


async def test_a_server_that_exits_at_start_fails_clearly(bridge: McpBridge) -> None:
    broken = bridge.status()["broken"]
    assert broken.state in (ServerState.FAILED, ServerState.RECONNECTING)
    assert broken.error == f"{sys.executable!r} closed the connection (see its stderr)"


async def test_an_unreachable_url_fails_clearly(bridge: McpBridge) -> None:
    nowhere = bridge.status()["nowhere"]
    assert nowhere.state in (ServerState.FAILED, ServerState.RECONNECTING)
    assert nowhere.error is not None
    assert nowhere.error.startswith("cannot connect to http://127.0.0.1:")


@pytest.mark.parametrize("name", SERVERS)
async def test_toggling_a_tool_reports_the_new_tool_set(bridge: McpBridge, changes: Changes, name: str) -> None:
    assert text(await bridge.call_tool(name, "toggle_extra_tool", {})) == "added extra"
    status = await changes.until(name, lambda status: "extra" in tool_names(status))
    assert tool_names(status) == DEMO_TOOLS | {"extra"}
    assert text(await bridge.call_tool(name, "extra", {})) == "extra tool called"

    assert text(await bridge.call_tool(name, "toggle_extra_tool", {})) == "removed extra"
    status = await changes.until(name, lambda status: "extra" not in tool_names(status))
    assert tool_names(status) == DEMO_TOOLS
    assert status.connects == 1


# --- calls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
async def test_a_quick_call_returns_its_result(bridge: McpBridge, name: str) -> None:
    result = await bridge.call_tool(name, "add", {"a": 2, "b": 3})
    assert result == ToolResult(
        is_error=False, content=[{"type": "text", "text": "5.0"}], structured_content={"result": 5.0}
    )


@pytest.mark.parametrize("name", SERVERS)
async def test_progress_arrives_rising_before_the_result(bridge: McpBridge, name: str) -> None:
    events: list[Progress | str] = []

    async def on_progress(progress: Progress) -> None:
        events.append(progress)

    result = await bridge.call_tool(name, "slow_count", {"steps": 3, "delay": 0.01}, on_progress=on_progress)
    events.append(text(result))
    assert events == [
        Progress(1, 3, "step 1 of 3"),
        Progress(2, 3, "step 2 of 3"),
        Progress(3, 3, "step 3 of 3"),
        "counted to 3",
    ]


@pytest.mark.parametrize("name", SERVERS)
async def test_a_failing_tool_is_an_error_result_not_an_exception(bridge: McpBridge, name: str) -> None:
    result = await bridge.call_tool(name, "fail", {"message": "the disk is full"})
    assert result.is_error
    assert text(result).endswith("the disk is full")


@pytest.mark.parametrize("name", SERVERS)
async def test_a_timeout_raises_and_cancels_the_tool_on_the_server(bridge: McpBridge, name: str) -> None:
    before = await cancelled_count(bridge, name)
    with pytest.raises(ToolTimeoutError, match=f"'{name}.sleep' did not finish within 0.3 s"):
        await bridge.call_tool(name, "sleep", {"seconds": 60}, timeout=0.3)
    assert await cancelled_count(bridge, name, at_least=before + 1) == before + 1


@pytest.mark.parametrize("name", SERVERS)
async def test_cancelling_the_caller_stops_the_tool_on_the_server(bridge: McpBridge, name: str) -> None:
    before = await cancelled_count(bridge, name)
    running = anyio.Event()

    async def on_progress(progress: Progress) -> None:
        running.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(
                lambda: bridge.call_tool(name, "slow_count", {"steps": 500, "delay": 0.02}, on_progress=on_progress)
            )
            await running.wait()
            task_group.cancel_scope.cancel()

    assert await cancelled_count(bridge, name, at_least=before + 1) == before + 1
    assert text(await bridge.call_tool(name, "add", {"a": 1, "b": 2})) == "3.0"


# --- elicitation ---------------------------------------------------------------------------------


def answering(
    action: Literal["accept", "decline", "cancel"], content: dict[str, Any] | None = None
) -> Callable[[ElicitationRequest], Awaitable[ElicitationAnswer]]:
    async def on_elicit(request: ElicitationRequest) -> ElicitationAnswer:
        assert request.message == "Who are you, and which colour do you like best?"
        assert request.schema["required"] == ["name", "favourite_colour"]
        return ElicitationAnswer(action, content)

    return on_elicit


@pytest.mark.parametrize("name", SERVERS)
async def test_an_answered_elicitation_reaches_the_tool(bridge: McpBridge, name: str) -> None:
    on_elicit = answering("accept", {"name": "Ann", "favourite_colour": "blue"})
    result = await bridge.call_tool(name, "ask_user", {}, on_elicit=on_elicit)
    assert text(result) == "Ann likes blue"


@pytest.mark.parametrize("name", SERVERS)
async def test_a_declined_elicitation_reaches_the_tool(bridge: McpBridge, name: str) -> None:
    result = await bridge.call_tool(name, "ask_user", {}, on_elicit=answering("decline"))
    assert text(result) == "declined"


async def test_an_elicitation_without_on_elicit_is_declined(bridge: McpBridge) -> None:
    assert text(await bridge.call_tool("demo", "ask_user", {})) == "declined"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("demo", "Bob likes green"),
        ("modern", "Bob likes green"),
        ("web", "Bob likes green"),
        ("web_legacy", "Bob likes green"),
        # 2025 protocol over stdio: nothing ties the request to its call, so with two calls in flight it is declined.
        ("legacy", "declined"),
    ],
)
async def test_an_elicitation_during_other_calls_goes_to_its_own_call(
    bridge: McpBridge, name: str, expected: str
) -> None:
    busy = anyio.Event()

    async def on_progress(progress: Progress) -> None:
        busy.set()

    async def wrong_caller(request: ElicitationRequest) -> ElicitationAnswer:
        raise AssertionError("the elicitation went to the wrong call")

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(
            lambda: bridge.call_tool(
                name, "slow_count", {"steps": 500, "delay": 0.02}, on_progress=on_progress, on_elicit=wrong_caller
            )
        )
        with anyio.fail_after(10):
            await busy.wait()
        on_elicit = answering("accept", {"name": "Bob", "favourite_colour": "green"})
        result = await bridge.call_tool(name, "ask_user", {}, on_elicit=on_elicit)
        task_group.cancel_scope.cancel()
    assert text(result) == expected


async def test_time_waiting_for_an_answer_does_not_count_against_the_call_timeout(bridge: McpBridge) -> None:
    async def slow_human(request: ElicitationRequest) -> ElicitationAnswer:
        with anyio.move_on_after(0.5):  # the human takes longer than the call's whole timeout
            await anyio.Event().wait()
        return ElicitationAnswer("accept", {"name": "Cy", "favourite_colour": "red"})

    result = await bridge.call_tool("demo", "ask_user", {}, on_elicit=slow_human, timeout=0.3)
    assert text(result) == "Cy likes red"


# --- losing a server -----------------------------------------------------------------------------


async def test_a_killed_server_fails_its_call_then_is_restarted() -> None:
    changes = Changes()
    async with McpBridge({"demo": stdio_server()}, McpStdioConfig(), base_dir=ROOT, on_change=changes) as bridge:
        await changes.until("demo", connected)
        first = await bridge.call_tool("demo", "pid", {})
        assert first.structured_content is not None
        pid = first.structured_content["result"]
        running = anyio.Event()

        async def on_progress(progress: Progress) -> None:
            running.set()

        async def kill_when_running() -> None:
            await running.wait()
            os.kill(pid, signal.SIGKILL)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(kill_when_running)
                with pytest.raises(ToolError, match="^MCP server 'demo' disconnected during the call$"):
                    await bridge.call_tool("demo", "slow_count", {"steps": 500, "delay": 0.02}, on_progress=on_progress)

        status = await changes.until("demo", lambda status: connected(status) and status.connects == 2)
        assert tool_names(status) == DEMO_TOOLS
        lost = [seen for seen in changes.seen if seen.state is ServerState.RECONNECTING]
        assert lost[0].error == "connection lost: the server process exited"
        assert lost[0].tools == ()
        second = await bridge.call_tool("demo", "pid", {})
        assert second.structured_content is not None
        assert second.structured_content["result"] != pid

    assert bridge.status()["demo"].state is ServerState.STOPPED
    assert changes.seen[-1].state is ServerState.STOPPED


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_restarted_http_server_is_reconnected(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(supervisor_module, "HEALTH_INTERVAL", 0.1)  # 2025 protocol: a dead server is found by ping
    port = unused_port()
    config = McpServerConfig(transport="http", url=f"http://127.0.0.1:{port}/mcp", protocol_mode=mode)
    changes = Changes()
    process = await anyio.to_thread.run_sync(start_http_demo, port)
    try:
        async with McpBridge({"web": config}, McpStdioConfig(), base_dir=ROOT, on_change=changes) as bridge:
            await changes.until("web", connected)
            stop(process)
            lost = await changes.until("web", lambda status: not connected(status))
            assert lost.error is not None
            assert lost.error.startswith("connection lost: ")
            with pytest.raises(ToolUnavailableError, match="'web' is not connected"):
                await bridge.call_tool("web", "add", {"a": 1, "b": 2})

            process = await anyio.to_thread.run_sync(start_http_demo, port)
            await changes.until("web", lambda status: connected(status) and status.connects == 2)
            assert text(await bridge.call_tool("web", "add", {"a": 1, "b": 2})) == "3.0"
    finally:
        stop(process)


async def test_closing_the_bridge_while_a_server_starts_stops_it() -> None:
    changes = Changes()
    async with McpBridge({"demo": stdio_server()}, McpStdioConfig(), base_dir=ROOT, on_change=changes) as bridge:
        assert bridge.status()["demo"].state is ServerState.CONNECTING
    assert bridge.status()["demo"] == ServerStatus("demo", ServerState.STOPPED, (), None, 0)
    assert [status.state for status in changes.seen] == [ServerState.STOPPED]
