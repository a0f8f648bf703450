"""MCP servers kept in their lane: a noisy or failing server costs a bounded number of log lines and
member notifications, and says clearly why it is down."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import anyio
import httpx2
import pytest

from haip_runtime.bridge import McpBridge, ServerState, ServerStatus, ToolInfo
from haip_runtime.bridge.dialer import describe_failure, shown_url
from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.server.app import Runtime
from tests.support.serving import make_config

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
GARBAGE = "for i in range(200): print(f'not json {i}', flush=True)"


async def test_a_server_printing_garbage_costs_a_bounded_number_of_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    noisy = McpServerConfig(transport="stdio", command=sys.executable, args=["-c", GARBAGE], connect_timeout_seconds=5)
    servers = {"noisy": noisy}
    changes: list[ServerStatus] = []
    done = anyio.Event()

    def seen(status: ServerStatus) -> None:
        changes.append(status)
        if status.state is ServerState.FAILED:
            done.set()

    async with McpBridge(servers, McpStdioConfig(), base_dir=ROOT, on_change=seen, stderr=None):
        with anyio.fail_after(20):
            await done.wait()
    sdk = [record for record in caplog.records if record.name == "mcp.client.stdio"]
    assert 1 <= len(sdk) <= 5 and not any(record.exc_info for record in sdk)
    assert "not json" in sdk[0].getMessage()


async def test_a_server_that_never_finishes_the_handshake_says_so() -> None:
    silent = McpServerConfig(
        transport="stdio",
        command=sys.executable,
        args=["-c", "import sys; sys.stdin.read()"],
        connect_timeout_seconds=0.5,
    )
    async with McpBridge({"silent": silent}, McpStdioConfig(), base_dir=ROOT) as bridge:
        await bridge.wait_settled(20)
        status = bridge.status()["silent"]
    assert status.error == f"{sys.executable!r} did not complete the MCP handshake within 0.5 s"


async def test_members_hear_of_state_changes_not_of_every_retry() -> None:
    config = make_config({"mcp": {"servers": {"ghost": {"transport": "stdio", "command": "/nonexistent"}}}})
    runtime = Runtime(config)
    send, receive = anyio.create_memory_object_stream[tuple[str, str, str | None, bool]](100)
    runtime._notices = send
    down = "cannot start '/nonexistent': command not found"
    tool = ToolInfo("ghost", "boo", "", {"type": "object"}, None, None)
    for state in [ServerState.FAILED, ServerState.RECONNECTING] * 5:
        runtime._server_changed(ServerStatus("ghost", state, (), down, 0))
    runtime._server_changed(ServerStatus("ghost", ServerState.CONNECTED, (), None, 1))
    runtime._server_changed(ServerStatus("ghost", ServerState.CONNECTED, (tool,), None, 1))  # a tool came
    runtime._server_changed(ServerStatus("ghost", ServerState.CONNECTED, (tool,), None, 1))  # a relist, the same
    runtime._server_changed(ServerStatus("ghost", ServerState.RECONNECTING, (), "connection lost: gone", 1))
    runtime._server_changed(ServerStatus("ghost", ServerState.CONNECTED, (tool,), None, 2))  # back: not a change
    send.close()
    async with receive:
        notices = [notice async for notice in receive]
    assert notices == [
        ("ghost", "failed", down, False),
        ("ghost", "connected", None, False),
        ("ghost", "connected", None, True),
        ("ghost", "reconnecting", "connection lost: gone", False),
        ("ghost", "connected", None, False),
    ]


def test_failures_shown_to_members_carry_no_url_credentials_or_query() -> None:
    url = "http://user:pw-secret@127.0.0.1:1/mcp?api_key=sk-secret"
    config = McpServerConfig(transport="http", url=url)
    refused = describe_failure(config, httpx2.ConnectError("connection refused"), connect_timeout=1)
    status = describe_failure(config, httpx2.HTTPError(f"Client error '401' for url '{url}'"), connect_timeout=1)
    assert refused == "cannot connect to http://127.0.0.1:1/mcp: connection refused"
    assert status == "HTTP error from http://127.0.0.1:1/mcp: Client error '401' for url 'http://127.0.0.1:1/mcp'"
    assert shown_url("https://[::1]:8443/a/b?x=1#f") == "https://[::1]:8443/a/b"
