"""Custom tools in Python (`transport = "python"`): the example haip_runtime/demo/team_tools.py through a real server,
then the bridge itself (elicitation per protocol era, factories, load failures) and `haip-runtime check`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from haip_runtime.bridge import ElicitationAnswer, ElicitationRequest, McpBridge, ServerState, ServerStatus
from haip_runtime.bridge.inprocess import load_server
from haip_runtime.client import HaipClient, Received
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import PluginError, ToolError
from tests.support.serving import ROOT, LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

TEAM = {"transport": "python", "server": "haip_runtime.demo.team_tools:server"}


def team_config(**extra: Any) -> dict[str, Any]:
    return {
        "agents": {"operator": {"plugin": "operator", "mcp_servers": ["team", "quick"]}},
        "mcp": {
            "servers": {
                "team": {**TEAM, "require_approval": ["send_announcement"]},
                # The same module again, in the 2025 protocol era, with a short timeout.
                "quick": {
                    **TEAM,
                    "protocol_mode": "legacy",
                    "timeout_seconds": 0.5,
                    "allowed_tools": ["index_notes", "book_meeting"],
                },
            }
        },
        **extra,
    }


@pytest.fixture(scope="module")
def team_server() -> Iterator[LiveServer]:
    with live_server(make_config(team_config())) as live:
        yield live


def tool_names(event: Received) -> set[str]:
    return {tool["name"] for tool in event.get("tools", [])}


@asynccontextmanager
async def operator(live: LiveServer, user: str = "alice") -> AsyncIterator[tuple[HaipClient, str]]:
    async with HaipClient(live.ws_url, token=live.token(user), timeout=20) as client:
        tx = await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and {"team.divide", "quick.index_notes"} <= tool_names(e))
        yield client, tx


async def call(client: HaipClient, tx: str, command: str) -> Received:
    """Send an operator command; return the TOOL_DONE of the call it makes."""
    done_before = {e.get("call_id") for e in client.received if e.type == "TOOL_DONE"}
    await client.send_text(tx, command)
    first = await client.wait_for(lambda e: e.type == "TOOL_CALL" and e.get("call_id") not in done_before)
    return await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == first.get("call_id"))


async def cancelled_so_far(client: HaipClient, tx: str, at_least: int = 0) -> int:
    done = await call(client, tx, f'/call team.activity {{"min_cancelled": {at_least}}}')
    count: int = done.get("result")["structuredContent"]["cancelled"]
    return count


async def test_python_server_tools_are_listed_with_their_server(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, _):
        listing = [e for e in client.received if e.type == "TOOL_LIST"][-1]
    divide = next(tool for tool in listing.get("tools") if tool["name"] == "team.divide")
    assert divide == {
        "name": "team.divide",
        "description": "Divide `a` by `b`. Dividing by zero raises: the caller gets a tool error, the runtime goes on.",
        "server": "team",
    }
    assert {name for name in tool_names(listing) if name.startswith("quick.")} == {
        "quick.index_notes",
        "quick.book_meeting",
    }
    assert team_server.runtime.health()["mcp"]["team"] == {"state": "connected", "tools": 8, "error": None}


async def test_python_server_tool_schema_comes_from_the_type_hints(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        await client.send("TOOL_SCHEMA", {"tool": "team.index_notes"}, transaction=tx)
        reply = await client.wait_for("TOOL_SCHEMA")
    schema = reply.get("schema")["inputSchema"]
    assert set(schema["properties"]) == {"notes", "delay"}  # the Context parameter is not an argument
    assert schema["properties"]["notes"]["type"] == "integer"


async def test_python_tool_reports_progress_then_its_result(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        done = await call(client, tx, '/call team.index_notes {"notes": 4, "delay": 0.05}')
        flow = [e for e in client.received if e.get("call_id") == done.get("call_id")]
    progress = [e for e in flow if e.type == "TOOL_UPDATE" and e.get("progress") is not None]
    assert [e.type for e in flow][0] == "TOOL_CALL" and flow[-1] is done
    assert len(progress) >= 2 and [e.get("progress") for e in progress] == sorted(e.get("progress") for e in progress)
    assert progress[-1].get("progress") == 4 and progress[-1].get("total") == 4
    assert progress[-1].get("message") == "indexed note 4 of 4"
    assert done.get("status") == "OK" and done.get("result")["content"] == [{"type": "text", "text": "indexed 4 notes"}]


async def test_tool_cancel_stops_the_python_tool(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        before = await cancelled_so_far(client, tx)
        await client.send_text(tx, '/call team.index_notes {"notes": 1000, "delay": 0.05}')
        running = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("progress") is not None)
        await client.send("TOOL_CANCEL", {"call_id": running.get("call_id"), "reason": "enough"}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == running.get("call_id"))
        after = await cancelled_so_far(client, tx, before + 1)
    assert done.get("status") == "CANCELLED"
    assert done.get("error") == {"code": "CANCELLED", "message": "cancelled by alice: enough"}
    assert after == before + 1  # the tool's own task saw the cancellation


async def test_python_tool_past_its_timeout_is_cancelled_in_its_task(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        before = await cancelled_so_far(client, tx)
        done = await call(client, tx, '/call quick.index_notes {"notes": 1000, "delay": 0.05}')
        after = await cancelled_so_far(client, tx, before + 1)
    assert done.get("status") == "ERROR" and done.get("error")["code"] == "TIMEOUT"
    assert after == before + 1


@pytest.mark.parametrize(("decision", "status"), [("approve", "OK"), ("reject", "CANCELLED")])
async def test_python_tool_under_require_approval(team_server: LiveServer, decision: str, status: str) -> None:
    async with operator(team_server) as (client, tx):
        await client.send_text(tx, '/call team.send_announcement {"text": "cake at 4"}')
        waiting = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
        call_id = waiting.get("call_id")
        await client.send("TOOL_UPDATE", {"call_id": call_id, "decision": decision}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call_id)
    assert done.get("status") == status
    if decision == "approve":
        assert done.get("result")["content"][0]["text"] == "announced: cake at 4"
    else:
        assert done.get("error")["code"] == "REJECTED"


@pytest.mark.parametrize("server", ["team", "quick"], ids=["2026-protocol", "2025-protocol"])
@pytest.mark.parametrize("answer", ["input", "decline"])
async def test_python_tool_asks_the_user_for_input(team_server: LiveServer, server: str, answer: str) -> None:
    async with operator(team_server) as (client, tx):
        await client.send_text(tx, f'/call {server}.book_meeting {{"topic": "roadmap"}}')
        asking = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
        reply: dict[str, Any] = {"call_id": asking.get("call_id")}
        if answer == "input":
            reply["input"] = {"day": "Tuesday", "room": "Lovelace"}
        else:
            reply["decision"] = "decline"
        await client.send("TOOL_UPDATE", reply, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == asking.get("call_id"))
    assert asking.get("request")["message"] == "Which day, and which room?"
    assert set(asking.get("request")["schema"]["properties"]) == {"day", "room"}
    expected = "booked 'roadmap' on Tuesday in Lovelace" if answer == "input" else "not booked: declined"
    assert done.get("status") == "OK" and done.get("result")["content"][0]["text"] == expected


async def test_an_exception_in_a_python_tool_is_a_tool_error_and_the_runtime_goes_on(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        crashed = await call(client, tx, '/call team.divide {"a": 1, "b": 0}')
        finished = await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.run_id == crashed.run_id)
        refused = await call(client, tx, '/call team.lookup_note {"title": "secrets"}')
        fine = await call(client, tx, '/call team.divide {"a": 1, "b": 4}')
    assert crashed.get("status") == "ERROR"
    # the exception's text stays in the server log; the caller learns which tool failed
    assert crashed.get("error") == {"code": "TOOL_ERROR", "message": "Error executing tool divide"}
    assert finished.get("status") == "OK"
    assert refused.get("error")["message"] == "Error executing tool lookup_note: no note titled 'secrets'"
    assert fine.get("status") == "OK" and fine.get("result")["structuredContent"] == {"result": 0.25}


async def test_blocking_work_runs_in_a_thread_and_returns(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        done = await call(client, tx, '/call team.checksum {"text": "abc", "rounds": 3}')
    value = b"abc"
    for _ in range(3):
        value = hashlib.sha256(value).digest()
    assert done.get("result")["content"][0]["text"] == value.hex()


async def test_member_calls_a_python_tool_directly(team_server: LiveServer) -> None:
    async with operator(team_server) as (client, tx):
        params = {"text": "one two three"}
        await client.send("TOOL_CALL", {"call_id": "wc-1", "tool": "team.word_count", "params": params}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "wc-1")
    assert done.get("status") == "OK" and done.get("result")["structuredContent"] == {"result": 3}


async def test_role_without_a_python_tool_is_refused_and_does_not_see_it() -> None:
    config = team_config(roles={"user": {"tools": ["team.word_count"]}})
    with live_server(make_config(config)) as live:
        async with HaipClient(live.ws_url, token=live.token("bob"), timeout=20) as client:
            tx = await client.start_transaction("operator")
            listing = await client.wait_for(lambda e: e.type == "TOOL_LIST" and bool(tool_names(e)))
            sent = await client.send("TOOL_CALL", {"tool": "team.divide", "params": {"a": 1, "b": 1}}, transaction=tx)
            error = await client.wait_for("ERROR")
            via_agent = await call(client, tx, '/call team.send_announcement {"text": "hi"}')
            allowed = await call(client, tx, '/call team.word_count {"text": "a b"}')
    assert tool_names(listing) == {"team.word_count"}
    assert error.get("code") == "UNAUTHORIZED" and error.get("related_id") == sent
    assert via_agent.get("error")["code"] == "UNAUTHORIZED"
    assert allowed.get("status") == "OK"


# --- the bridge, without HAIP -------------------------------------------------------------------


def python_server(spec: str, **options: Any) -> McpServerConfig:
    return McpServerConfig(transport="python", server=spec, **options)


@asynccontextmanager
async def bridge_of(**servers: McpServerConfig) -> AsyncIterator[McpBridge]:
    async with McpBridge(servers, McpStdioConfig(), base_dir=ROOT) as bridge:
        await bridge.wait_settled(10)
        yield bridge


async def test_ctx_elicit_works_in_the_2025_protocol_and_each_call_gets_its_own_answer() -> None:
    async def answer(request: ElicitationRequest) -> ElicitationAnswer:
        who = request.message.removeprefix("What is the name of ").removesuffix("?")
        return ElicitationAnswer("accept", {"name": who.upper()})

    results: dict[str, str] = {}
    async with bridge_of(asking=python_server("tests.support.python_servers:server", protocol_mode="legacy")) as bridge:

        async def ask(who: str) -> None:
            result = await bridge.call_tool("asking", "ask_name", {"who": who}, on_elicit=answer)
            results[who] = result.content[0]["text"]

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for who in ("ada", "grace", "alan"):
                    group.start_soon(ask, who)
    assert results == {"ada": "ada is ADA", "grace": "grace is GRACE", "alan": "alan is ALAN"}


async def test_ctx_elicit_in_the_2026_protocol_fails_the_call_clearly() -> None:
    async def answer(request: ElicitationRequest) -> ElicitationAnswer:
        raise AssertionError("never asked")

    async with bridge_of(asking=python_server("tests.support.python_servers:server")) as bridge:
        with pytest.raises(ToolError) as caught:
            await bridge.call_tool("asking", "ask_name", {"who": "ada"}, on_elicit=answer)
        status = bridge.status()["asking"]
    assert "no back-channel for server-initiated requests" in str(caught.value)
    assert status.state is ServerState.CONNECTED


async def test_a_factory_is_called_and_its_server_connected() -> None:
    async with bridge_of(made=python_server("tests.support.python_servers:make_server")) as bridge:
        result = await bridge.call_tool("made", "hello", {"who": "haip"})
        status = bridge.status()["made"]
    assert status.state is ServerState.CONNECTED and [tool.name for tool in status.tools][0] == "hello"
    assert result.content[0]["text"] == "hello, haip"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_changed_tool_list_is_followed_in_process(mode: Literal["auto", "legacy"]) -> None:
    listings: list[set[str]] = []
    changed = anyio.Event()

    def on_change(status: ServerStatus) -> None:
        listings.append({tool.name for tool in status.tools})
        if "extra" in listings[-1]:
            changed.set()

    demo = {"demo": python_server("haip_runtime.demo.mcp_server:server", protocol_mode=mode)}
    async with McpBridge(demo, McpStdioConfig(), base_dir=ROOT, on_change=on_change) as bridge:
        await bridge.wait_settled(10)
        added = await bridge.call_tool("demo", "toggle_extra_tool", {})
        with anyio.fail_after(5):
            await changed.wait()
        await bridge.call_tool("demo", "toggle_extra_tool", {})  # leave the shared module as it was
    assert added.content[0]["text"] == "added extra"
    assert {"add", "extra"} <= next(listing for listing in listings if "extra" in listing)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_tool_calling_sys_exit_fails_only_its_call(mode: Literal["auto", "legacy"]) -> None:
    async with bridge_of(made=python_server("tests.support.python_servers:make_server", protocol_mode=mode)) as bridge:
        missing = await bridge.call_tool("made", "parse_args", {"line": "--verbose"})  # argparse: SystemExit(2)
        left = await bridge.call_tool("made", "leave", {})
        fine = await bridge.call_tool("made", "parse_args", {"line": "--count 7"})
        status = bridge.status()["made"]
    assert missing.is_error and missing.content[0]["text"] == "Error executing tool parse_args: it raised SystemExit"
    assert left.is_error and left.content[0]["text"] == "Error executing tool leave: it raised SystemExit"
    assert fine.content[0]["text"] == "7" and status.state is ServerState.CONNECTED and status.connects == 1


async def test_a_server_that_cannot_be_loaded_fails_with_one_line_and_costs_itself_only() -> None:
    async with bridge_of(
        ghost=python_server("tests.support.python_servers:nope"),
        made=python_server("tests.support.python_servers:make_server"),
    ) as bridge:
        statuses = bridge.status()
    assert statuses["ghost"].state is ServerState.FAILED
    assert statuses["ghost"].error == "mcp.servers.ghost.server: 'tests.support.python_servers' has no attribute 'nope'"
    assert statuses["made"].state is ServerState.CONNECTED


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (
            "tests.support.python_servers:not_a_server",
            "'tests.support.python_servers:not_a_server' is an int, not an MCPServer",
        ),
        (
            "tests.support.python_servers:returns_none",
            "'tests.support.python_servers:returns_none' returned a NoneType, not an",
        ),
        (
            "tests.support.python_servers:broken_factory",
            "calling 'tests.support.python_servers:broken_factory' failed: RuntimeError",
        ),
        ("json:JSONDecoder", "'json:JSONDecoder' returned a JSONDecoder, not an MCPServer"),
        ("plugins/nothing_here.py:server", "no such file: "),
        ("tools_nobody_wrote:server", "cannot import 'tools_nobody_wrote': ModuleNotFoundError"),
        ("team", "'team' is neither a known MCP server nor 'module:server'"),
    ],
    ids=["not-callable", "returns-none", "factory-raises", "wrong-class", "no-file", "no-module", "no-entry-point"],
)
def test_load_server_says_what_is_wrong_in_one_line(spec: str, error: str) -> None:
    with pytest.raises(PluginError) as caught:
        load_server("x", python_server(spec), ROOT)
    message = str(caught.value)
    assert message.startswith(f"mcp.servers.x.server: {error}") and "\n" not in message


def test_python_transport_needs_a_server() -> None:
    with pytest.raises(ValueError, match="transport 'python' needs 'server'"):
        McpServerConfig(transport="python")


# --- haip-runtime check --------------------------------------------------------------------------


def run_check(tmp_path: Path, spec: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "haip.toml"
    config.write_text(f"[mcp.servers.mine]\ntransport = 'python'\nserver = '{spec}'\n", encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "haip_runtime", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=False,
    )


def test_check_loads_a_python_server_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "from mcp.server.mcpserver import MCPServer\nserver = MCPServer('mine')\nother = 'text'\n", encoding="utf-8"
    )
    good = run_check(tmp_path, "mine.py:server")
    missing = run_check(tmp_path, "mine.py:servre")
    wrong = run_check(tmp_path, "mine:other")
    assert good.returncode == 0 and "is valid (0 agent(s), 1 MCP server(s))" in good.stderr
    assert missing.returncode == 1 and missing.stdout == ""
    config = tmp_path / "haip.toml"
    assert missing.stderr == f"haip-runtime: {config}: mcp.servers.mine.server: 'mine.py' has no attribute 'servre'\n"
    assert wrong.returncode == 1
    assert (
        wrong.stderr == f"haip-runtime: {config}: mcp.servers.mine.server: 'mine:other' is a str, not an MCPServer"
        " or a callable returning one\n"
    )


def test_an_installed_entry_point_names_a_python_server(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "team_ep_tools-0.1.dist-info").mkdir(parents=True)
    (site / "team_ep_tools-0.1.dist-info" / "METADATA").write_text("Name: team-ep-tools\nVersion: 0.1\n")
    (site / "team_ep_tools-0.1.dist-info" / "entry_points.txt").write_text(
        "[haip_runtime.mcp_servers]\nteam-ep = team_ep_tools:server\n"
    )
    (site / "team_ep_tools.py").write_text(
        "from mcp.server.mcpserver import MCPServer\nserver = MCPServer('ep')\n"
        "@server.tool()\ndef shout(text: str) -> str:\n    '''Shout `text`.'''\n    return text.upper()\n"
    )
    config = tmp_path / "haip.toml"
    config.write_text("[mcp.servers.mine]\ntransport = 'python'\nserver = 'team-ep'\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "tools", "--config", str(config), "--timeout", "30"],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["mine", "python", "connected", "1"]
    assert "  mine.shout  Shout `text`." in result.stdout


async def test_the_readmes_python_tools_example_runs_as_written(tmp_path: Path) -> None:
    """An author's find: the README's example used names it never defined. It is run here as written."""
    import importlib.util
    import re

    from mcp import Client

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# plugins/mytools\.py\n.*?)```", readme, re.S)
    assert code is not None
    (tmp_path / "mytools.py").write_text(code.group(1))
    spec = importlib.util.spec_from_file_location("readme_mytools", tmp_path / "mytools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    async with Client(module.server) as client:
        indexed = await client.call_tool("index_notes", {"notes": 3})
        found = await client.call_tool("lookup", {"title": "welcome"})
        missing = await client.call_tool("lookup", {"title": "nope"})
    assert not indexed.is_error and indexed.content[0].text == "indexed 3 notes"  # type: ignore[union-attr]
    assert found.content[0].text == "Start here."  # type: ignore[union-attr]
    assert missing.is_error and "no note titled 'nope'" in missing.content[0].text  # type: ignore[union-attr]
