"""A tool that requires MCP tasks, through the runtime: a real uvicorn, server-everything from npm over
stdio, a member over WebSocket who sees the task's states, answers its input request and cancels it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest

from haip_runtime.client import HaipClient, Received
from tests.support.everything import everything_server
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

RESEARCH = "everything.simulate-research-query"
GATED = "gated.simulate-research-query"


@pytest.fixture(scope="module")
def task_server() -> Iterator[LiveServer]:
    config = {
        "agents": {"operator": {"plugin": "operator", "mcp_servers": ["everything", "gated", "timed"]}},
        "mcp": {
            "servers": {
                "everything": everything_server(),
                "gated": everything_server(require_approval=["simulate-research-query"], approval_timeout_seconds=5),
                "timed": everything_server(timeout_seconds=1),
            }
        },
    }
    with live_server(make_config(config)) as live:
        yield live


@asynccontextmanager
async def member(live: LiveServer) -> AsyncIterator[tuple[HaipClient, str]]:
    async with HaipClient(live.ws_url, token=live.token(), timeout=20) as client:
        tx = await client.start_transaction("operator")
        wanted = {RESEARCH, GATED}
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and wanted <= {t["name"] for t in e.get("tools", [])})
        yield client, tx


def updates(client: HaipClient, call_id: str) -> list[Received]:
    return [e for e in client.received if e.type == "TOOL_UPDATE" and e.get("call_id") == call_id]


async def tasks_metric(live: LiveServer, status: str) -> float:
    async with httpx2.AsyncClient() as http:
        text = (await http.get(f"{live.http_url}/metrics")).text
    line = f'haip_mcp_tasks_total{{server="everything",status="{status}"}} '
    return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)


async def test_a_task_tool_shows_its_states_asks_a_member_and_ends_with_its_result(task_server: LiveServer) -> None:
    before = await tasks_metric(task_server, "completed")
    async with member(task_server) as (client, tx):
        params = {"topic": "python", "ambiguous": True}
        await client.send("TOOL_CALL", {"call_id": "r1", "tool": RESEARCH, "params": params}, transaction=tx)
        asking = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "INPUT_REQUIRED")
        await client.send("TOOL_UPDATE", {"call_id": "r1", "input": {"interpretation": "snake"}}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "r1", timeout=30)
        seen = updates(client, "r1")
    assert asking.get("request")["server"] == "everything"
    assert asking.get("request")["schema"]["required"] == ["interpretation"]
    assert done.get("status") == "OK"
    assert done.get("result")["content"][0]["text"].startswith("# Research Report: python (snake)")
    running = [(e.get("task")["status"], e.get("message")) for e in seen if e.get("task")]
    assert running[:2] == [("working", "Gathering sources..."), ("working", "Analyzing content...")]
    assert ("working", "Generating report...") in running
    assert len({e.get("task")["id"] for e in seen if e.get("task")}) == 1
    assert await tasks_metric(task_server, "completed") == before + 1


async def test_tool_cancel_cancels_the_task_and_the_member_sees_the_server_confirm_it(task_server: LiveServer) -> None:
    before = await tasks_metric(task_server, "cancelled")
    async with member(task_server) as (client, tx):
        await client.send(
            "TOOL_CALL", {"call_id": "r2", "tool": RESEARCH, "params": {"topic": "tides"}}, transaction=tx
        )
        await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("message") == "Analyzing content...")
        await client.send("TOOL_CANCEL", {"call_id": "r2", "reason": "enough"}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "r2")
        seen = updates(client, "r2")
    confirmed = [e for e in seen if e.get("task", {}).get("status") == "cancelled"]
    assert done.get("status") == "CANCELLED" and done.get("error")["message"] == "cancelled by alice: enough"
    assert len(confirmed) == 1 and confirmed[0].get("status") == "CANCELLING"
    assert confirmed[0].get("message").endswith(": Client cancelled task execution.")  # the server's own words
    assert await tasks_metric(task_server, "cancelled") == before + 1


async def test_run_cancel_cancels_the_runs_task_and_the_member_sees_the_server_confirm_it(
    task_server: LiveServer,
) -> None:
    """A tester's find: a RUN_CANCEL sent tasks/cancel but members saw no CANCELLING, only TOOL_DONE."""
    async with member(task_server) as (client, tx):
        await client.send_text(tx, f'/call {RESEARCH} {{"topic": "tides"}}')
        started = await client.wait_for("RUN_STARTED")
        call = await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("message") == "Analyzing content...")
        await client.send("RUN_CANCEL", {"run_id": started.get("run_id")}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call.get("call_id"))
        await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.get("status") == "CANCELLED")
        seen = updates(client, str(call.get("call_id")))
    confirmed = [e for e in seen if e.get("task", {}).get("status") == "cancelled"]
    assert done.get("status") == "CANCELLED"
    assert len(confirmed) == 1 and confirmed[0].get("status") == "CANCELLING"
    assert confirmed[0].get("message").endswith(": Client cancelled task execution.")
    assert seen.index(confirmed[0]) == len(seen) - 1  # the last word before TOOL_DONE


async def test_a_task_past_its_timeout_is_cancelled_and_the_member_sees_the_server_confirm_it(
    task_server: LiveServer,
) -> None:
    async with member(task_server) as (client, tx):
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and "timed.simulate-research-query" in str(e.payload))
        call = {"call_id": "t1", "tool": "timed.simulate-research-query", "params": {"topic": "tides"}}
        await client.send("TOOL_CALL", call, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "t1", timeout=20)
        seen = updates(client, "t1")
    confirmed = [e for e in seen if e.get("task", {}).get("status") == "cancelled"]
    assert done.get("status") == "ERROR" and done.get("error")["code"] == "TIMEOUT"
    assert "it was cancelled on the server" in done.get("error")["message"]
    assert len(confirmed) == 1 and confirmed[0].get("status") == "CANCELLING"


async def test_a_task_tool_under_require_approval_waits_for_a_member_before_its_task_starts(
    task_server: LiveServer,
) -> None:
    async with member(task_server) as (client, tx):
        await client.send("TOOL_CALL", {"call_id": "g1", "tool": GATED, "params": {"topic": "x"}}, transaction=tx)
        await client.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")
        await client.send("TOOL_UPDATE", {"call_id": "g1", "decision": "reject", "reason": "not now"}, transaction=tx)
        done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "g1")
        seen = updates(client, "g1")
    assert done.get("status") == "CANCELLED" and done.get("error")["code"] == "REJECTED"
    assert not any(e.get("task") for e in seen)  # no task was created on the server


def test_the_tools_command_marks_the_tools_that_run_as_tasks(tmp_path: Path) -> None:
    server = everything_server()
    config = tmp_path / "haip.toml"
    config.write_text(f"[mcp.servers.everything]\ntransport = 'stdio'\ncommand = {server['command']!r}\n"
                      f"args = {server['args']!r}\n")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "tools", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    marked = [line.split()[0] for line in result.stdout.splitlines() if "[task]" in line]
    assert marked == [RESEARCH]
