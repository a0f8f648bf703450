"""An `echo` turn through the MCP door (`/mcp`) against the same turn over HAIP WebSocket: p50 and p99.

    .venv/bin/python bench/mcp_door.py [--calls N] [--rounds R]

One runtime (a real uvicorn on 127.0.0.1, in its own thread) with `[mcp_server] enabled`. Each
client keeps one connection and one conversation, and times a message to `echo` until its answer
is complete: over MCP a `tools/call` (continuing the conversation by id) until its result, in the
2026-07-28 protocol and in the 2025-11-25 one, and the same call as an MCP task (2025-11-25: the
task-augmented `tools/call`, then `tasks/result`); over HAIP a `MESSAGE` until `RUN_FINISHED`. The
four are measured in alternating rounds, side by side, so the machine's load hits them alike.
Results go to bench/RESULTS-mcp-door.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mcp_types as types  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from bench.common import RAISED_LIMITS, percentile  # noqa: E402
from haip_runtime.bridge.tasks import _create  # noqa: E402  (the SDK sends no task-augmented call)
from haip_runtime.client import HaipClient  # noqa: E402
from haip_runtime.protocol.events import ALL_EVENTS  # noqa: E402
from tests.support.serving import LiveServer, live_server, make_config  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS-mcp-door.md"
Turn = Callable[[], Awaitable[None]]


async def measure(live: LiveServer, calls: int, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        "MCP (2026-07-28)": [],
        "MCP (2025-11-25)": [],
        "MCP task (2025-11-25)": [],
        "HAIP WebSocket": [],
    }
    headers = {"Authorization": f"Bearer {live.token()}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http_modern,
        httpx2.AsyncClient(headers=headers, timeout=30) as http_legacy,
        Client(streamable_http_client(f"{live.http_url}/mcp", http_client=http_modern)) as modern,
        Client(streamable_http_client(f"{live.http_url}/mcp", http_client=http_legacy), mode="legacy") as legacy,
        HaipClient(live.ws_url, token=live.token(), accept_events=list(ALL_EVENTS)) as haip,
    ):
        turns = {
            "MCP (2026-07-28)": await mcp_turn(modern),
            "MCP (2025-11-25)": await mcp_turn(legacy),
            "MCP task (2025-11-25)": await task_turn(legacy),
            "HAIP WebSocket": await haip_turn(haip),
        }
        for turn in turns.values():  # warm-up
            for _ in range(20):
                await turn()
        for _ in range(rounds):
            for name, turn in turns.items():
                for _ in range(calls // rounds):
                    started = time.perf_counter()
                    await turn()
                    samples[name].append((time.perf_counter() - started) * 1000)
    return samples


async def mcp_turn(client: Client) -> Turn:
    first = await client.call_tool("echo", {"message": "hello"})
    assert first.structured_content is not None
    conversation = first.structured_content["conversation_id"]

    async def turn() -> None:
        result = await client.call_tool("echo", {"message": "hello", "conversation_id": conversation})
        assert not result.is_error

    return turn


async def task_turn(client: Client) -> Turn:
    first = await client.call_tool("echo", {"message": "hello"})
    assert first.structured_content is not None
    arguments = {"message": "hello", "conversation_id": first.structured_content["conversation_id"]}

    async def turn() -> None:
        created = await _create(client.session, "echo", arguments, 60)
        request = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=created.task.task_id))
        result = await client.session.send_request(request, types.CallToolResult)
        assert not result.is_error

    return turn


async def haip_turn(client: HaipClient) -> Turn:
    transaction = await client.start_transaction("echo")

    async def turn() -> None:
        client.received.clear()  # one turn at a time: the next RUN_FINISHED is this message's
        await client.send_text(transaction, "hello")
        await client.wait_for("RUN_FINISHED")

    return turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed turns per client (default: 1000)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    args = parser.parse_args()
    config = make_config({**RAISED_LIMITS, "mcp_server": {"enabled": True}})  # latency, not quotas
    with live_server(config) as live:
        samples = anyio.run(measure, live, args.calls, args.rounds)
    haip = samples["HAIP WebSocket"]
    rows = []
    for name, values in samples.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        ratio = f"{p50 / percentile(haip, 50):.2f}x / {p99 / percentile(haip, 99):.2f}x"
        rows.append(f"| {name} | {len(values)} | {p50:.2f} ms | {p99:.2f} ms | {ratio} |")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# An `echo` turn: the MCP door against HAIP WebSocket",
            "",
            f"Written by `bench/mcp_door.py` on {stamp}, Python {platform.python_version()}, {platform.machine()},"
            " shared 2-core machine; client and server in one process (the server in its own thread), 127.0.0.1.",
            "",
            "| door | turns | p50 | p99 | ratio to HAIP (p50 / p99) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "A turn: one message to `echo` in a conversation kept open, until its answer is complete (MCP: the",
            "`tools/call` result, which waits for the run's end; an MCP task: the task-augmented `tools/call`, then",
            "`tasks/result`, two requests; HAIP: `RUN_FINISHED`). Measured in alternating",
            "rounds on one connection each; the MCP SDK's client and server costs (JSON-RPC, SSE framing, a POST",
            "per call) are part of the MCP numbers.",
            "",
        ]
    )
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
