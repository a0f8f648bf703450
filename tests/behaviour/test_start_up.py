"""Start-up: a message sent while the MCP servers are still connecting reaches the model with their tools.

A real uvicorn, the demo MCP server as a subprocess that is slow to start, a server that cannot start at
all, and an OpenAI-compatible model at the wire (``tests/support/vendor.py``) that records what it was offered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import ROOT, LiveServer, live_server, make_config
from tests.support.vendor import Reply, VendorServer, openai_text, vendor_server

pytestmark = pytest.mark.anyio

#: The demo server, a second slower to start than it would be (a server that loads a model, say).
SLOW_DEMO = (
    "import runpy, sys, time; time.sleep(1); sys.argv = [sys.argv[1]]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


@pytest.fixture
def starting(vendor: VendorServer) -> Iterator[LiveServer]:
    """A runtime that has just started: the client talks to it before its MCP servers are up."""
    gpt = vendor.openai_llm()
    slow = {
        "transport": "stdio",
        "command": sys.executable,
        "args": ["-c", SLOW_DEMO, str(ROOT / "haip_runtime" / "demo" / "mcp_server.py")],
    }
    ghost = {"transport": "stdio", "command": "/nonexistent/mcp-server"}
    config = {
        "llm": {"gpt": gpt},
        "agents": {"assistant": {"plugin": "assistant", "llm": "gpt", "mcp_servers": ["demo", "ghost"]}},
        "mcp": {"servers": {"demo": slow, "ghost": ghost}},
    }
    with live_server(make_config(config)) as live:
        yield live


async def test_the_first_message_waits_for_servers_still_connecting_and_the_model_is_offered_their_tools(
    starting: LiveServer, vendor: VendorServer
) -> None:
    vendor.script(Reply(openai_text("I can add numbers.")))
    async with HaipClient(starting.ws_url, token=starting.token(), timeout=20) as client:
        tx = await client.start_transaction("assistant")
        state_when_sent = starting.runtime.server_health()["demo"][0]
        await client.send_text(tx, "what can you do?")
        finished = await client.wait_for("RUN_FINISHED")
        answer = await client.wait_for("MESSAGE_END")
        lists = [e.get("tools") for e in client.received if e.type == "TOOL_LIST"]
    offered = {tool["function"]["name"] for tool in vendor.requests[0].body["tools"]}
    assert state_when_sent in ("starting", "connecting")  # the race this is about
    assert finished.get("status") == "OK" and answer.run_id == finished.run_id
    assert {"demo_add", "demo_slow_count", "demo_ask_user"} <= offered
    assert not any(name.startswith("ghost_") for name in offered)  # the server that failed costs its tools only
    assert lists[0] == [] and any(tool["name"] == "demo.add" for tool in lists[-1])  # told again once connected


async def test_a_tool_called_directly_right_after_start_up_waits_for_its_server(starting: LiveServer) -> None:
    async with HaipClient(starting.ws_url, token=starting.token(), timeout=20) as client:
        tx = await client.start_transaction("assistant")
        state_when_sent = starting.runtime.server_health()["demo"][0]
        await client.send(
            "TOOL_CALL", {"call_id": "c1", "tool": "demo.add", "params": {"a": 2, "b": 3}}, transaction=tx
        )
        done = await client.wait_for("TOOL_DONE")
    assert state_when_sent in ("starting", "connecting")
    assert done.get("status") == "OK" and done.get("result")["structuredContent"] == {"result": 5.0}
