"""Fault 3: an MCP server could flood the log. A stdio server writing 2 MB/s to stderr grew the
runtime's log by 39 MB in 20 s: the child's stderr was the runtime's own. Now the runtime reads
it and logs at most ``BURST`` lines at once and ``PER_MINUTE`` a minute per server, and says how
many it dropped."""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.demo_mcp import DEMO
from tests.support.peers import open_peer
from tests.support.serving import live_server, make_config

pytestmark = pytest.mark.anyio
BURST = 20  # haip_runtime.bridge.childlog.BURST, spelled out so this test also runs on code without it

LINES = 50_000
#: The demo server, after 50,000 lines (3.5 MB) on stderr.
NOISY = (
    f"import runpy, sys\nfor n in range({LINES}): print('noise', n, 'x' * 60, file=sys.stderr)\n"
    f"sys.stderr.flush(); sys.argv = ['demo']; runpy.run_path({str(DEMO)!r}, run_name='__main__')"
)


async def test_fault_3_a_flood_on_an_mcp_servers_stderr_costs_a_few_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servers = {"noisy": {"transport": "stdio", "command": sys.executable, "args": ["-c", NOISY]}}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["noisy"]}}
    with (
        caplog.at_level(logging.INFO),
        live_server(make_config({"agents": agents, "mcp": {"servers": servers}})) as live,
    ):
        token = live.token()
        async with open_peer("websocket", live, token) as peer:  # the server has started, so has its flood
            await peer.receive()
            await peer.hai(token, accept_events=list(ALL_EVENTS))
            await peer.receive_type("INFO")
            await peer.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
            while "noisy.add" not in {
                t["name"] for t in (await peer.receive_type("TOOL_LIST", 30))["payload"]["tools"]
            }:
                pass
    for pump in [t for t in threading.enumerate() if t.name == "mcp-stderr-noisy"]:
        pump.join(timeout=10)  # the child is gone: its pipe ends, and the pump says what it dropped
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MCP server 'noisy' stderr")]
    noise = [line for line in lines if "noise" in line]
    assert BURST <= len(noise) <= BURST + 2 and len(lines) <= BURST + 3
    dropped = sum(int(line.split(": ")[1].split()[0]) for line in lines if line.endswith("a minute)"))
    dropped += sum(int(line.rsplit("(", 1)[1].split()[0]) for line in lines if line.endswith("before this)"))
    assert len(noise) + dropped >= LINES  # every line is either logged or counted
