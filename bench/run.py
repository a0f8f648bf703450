"""Benchmarks, each against a baseline measured side by side in the same run; results go to bench/RESULTS.md.

    .venv/bin/python bench/run.py [--rounds N]

1. Start-up: `haip-runtime serve` on the default haip.toml until it prints where to connect, against a bare
   uvicorn + Starlette app printing the same (the floor any Python ASGI server pays).
2. Echo round trips: a HAIP client sending MESSAGE and waiting for the echo agent's RUN_FINISHED, against a
   bare websockets echo server answering each frame (the floor of one WebSocket round trip in Python).
3. Cancellation: TOOL_CANCEL of a running demo-server tool until TOOL_DONE CANCELLED reaches the client,
   against the MCP SDK alone cancelling the same call on the same kind of stdio server.
4. Progress flood: a tool reporting 1000 progress steps in a burst, and how many TOOL_UPDATEs reach the client.
Only 127.0.0.1 is contacted, in bounded loops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import anyio
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BASELINE_APP, RAISED_LIMITS, time_until_ready  # noqa: E402  # type: ignore[import-not-found]

from haip_runtime.client import HaipClient  # noqa: E402
from tests.support.serving import live_server, make_config  # noqa: E402


def startup(rounds: int) -> dict[str, float]:
    ours, base = [], []
    for _ in range(rounds):  # interleaved, so both see the same machine load
        serve = [sys.executable, "-m", "haip_runtime", "serve", "--config", "haip.toml", "--port", "0"]
        ours.append(time_until_ready(serve, "haip-runtime listening on"))
        base.append(time_until_ready([sys.executable, "-c", BASELINE_APP], "listening"))
    return {"haip_median_s": statistics.median(ours), "baseline_median_s": statistics.median(base)}


async def echo_round_trips(url: str, token: str, count: int) -> float:
    async with HaipClient(url, token=token) as client:
        tx = await client.start_transaction("echo")
        events = client.events()
        start = time.perf_counter()
        with anyio.fail_after(60):  # bounded: a turn that never finishes fails the bench
            for index in range(count):
                await client.send_text(tx, f"message {index}")
                async for event in events:
                    if event.type == "ERROR":
                        raise RuntimeError(f"the server refused message {index}: {event.raw.get('payload')}")
                    if event.type == "RUN_FINISHED":
                        break
        return count / (time.perf_counter() - start)


async def raw_round_trips(count: int) -> float:
    async def echo(ws: object) -> None:
        async for frame in ws:  # type: ignore[attr-defined]
            await ws.send(frame)  # type: ignore[attr-defined]

    async with serve(echo, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            start = time.perf_counter()
            for index in range(count):
                await ws.send(json.dumps({"type": "MESSAGE", "payload": f"message {index}"}))
                await ws.recv()
            return count / (time.perf_counter() - start)


def round_trips(count: int) -> dict[str, float]:
    with live_server(make_config(RAISED_LIMITS)) as live:
        ours = anyio.run(echo_round_trips, live.ws_url, live.token(), count)
    base = anyio.run(raw_round_trips, count)
    return {"haip_turns_per_s": ours, "baseline_round_trips_per_s": base}


DEMO = ROOT / "haip_runtime" / "demo" / "mcp_server.py"
SLOW = {"steps": 100000, "delay": 0.02}


async def runtime_cancel_latency(url: str, token: str, rounds: int) -> tuple[list[float], int]:
    async with HaipClient(url, token=token, timeout=30) as client:
        tx = await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and bool(e.get("tools")))
        latencies = []
        for index in range(rounds):
            call_id = f"bench-{index}"
            await client.send(
                "TOOL_CALL", {"call_id": call_id, "tool": "demo.slow_count", "params": SLOW}, transaction=tx
            )
            await client.wait_for(
                lambda e, c=call_id: e.type == "TOOL_UPDATE" and e.get("call_id") == c and e.get("progress") is not None
            )
            start = time.perf_counter()
            await client.send("TOOL_CANCEL", {"call_id": call_id}, transaction=tx)
            await client.wait_for(lambda e, c=call_id: e.type == "TOOL_DONE" and e.get("call_id") == c)
            latencies.append(time.perf_counter() - start)
        await client.send(
            "TOOL_CALL",
            {"call_id": "flood", "tool": "demo.slow_count", "params": {"steps": 1000, "delay": 0}},
            transaction=tx,
        )
        await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "flood", timeout=60)
        updates = [e for e in client.received if e.type == "TOOL_UPDATE" and e.get("call_id") == "flood"]
        return latencies, sum(1 for e in updates if e.get("progress") is not None)


async def sdk_cancel_latency(rounds: int) -> list[float]:
    from mcp import Client, StdioServerParameters

    latencies = []
    async with Client(StdioServerParameters(command=sys.executable, args=[str(DEMO)]), mode="legacy") as client:
        for _ in range(rounds):
            started = anyio.Event()

            async def on_progress(
                progress: float, total: float | None, message: str | None, e: anyio.Event = started
            ) -> None:
                e.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client.call_tool("slow_count", SLOW, progress_callback=on_progress))
                await started.wait()
                start = time.perf_counter()
                tg.cancel_scope.cancel()
            latencies.append(time.perf_counter() - start)
    return latencies


def cancellation(rounds: int) -> dict[str, float]:
    servers = {
        "demo": {"transport": "stdio", "command": sys.executable, "args": [str(DEMO)], "protocol_mode": "legacy"}
    }
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["demo"]}}
    with live_server(make_config({"agents": agents, "mcp": {"servers": servers}})) as live:
        ours, flood = anyio.run(runtime_cancel_latency, live.ws_url, live.token(), rounds)
    base = anyio.run(sdk_cancel_latency, rounds)
    return {
        "haip_ms": statistics.median(ours) * 1000,
        "max_ms": max(ours) * 1000,
        "baseline_ms": statistics.median(base) * 1000,
        "flood_updates": flood,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=300)
    args = parser.parse_args()
    start = startup(args.rounds)
    trips = round_trips(args.messages)
    cancel = cancellation(args.rounds * 2)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine.",
        "",
        "| measure | haip-runtime | baseline | ratio |",
        "|---|---|---|---|",
        f"| start-up to 'listening' (median of {args.rounds}) | {start['haip_median_s']:.2f} s | "
        f"{start['baseline_median_s']:.2f} s (bare uvicorn + Starlette) | "
        f"{start['haip_median_s'] / start['baseline_median_s']:.2f}x |",
        f"| sequential echo turns ({args.messages}) | {trips['haip_turns_per_s']:.0f}/s | "
        f"{trips['baseline_round_trips_per_s']:.0f}/s (bare websockets echo) | "
        f"{trips['haip_turns_per_s'] / trips['baseline_round_trips_per_s']:.2f}x |",
        f"| TOOL_CANCEL to TOOL_DONE (median of {args.rounds * 2}; max {cancel['max_ms']:.1f} ms) | "
        f"{cancel['haip_ms']:.1f} ms | {cancel['baseline_ms']:.1f} ms (MCP SDK cancelling the call itself) | "
        f"{cancel['haip_ms'] / cancel['baseline_ms']:.2f}x |",
        f"| progress flood: 1000 notifications in a burst | {cancel['flood_updates']:.0f} TOOL_UPDATEs | "
        "1000 (uncoalesced) | |",
        "",
        "An echo turn is MESSAGE in, then RUN_STARTED, MESSAGE_START, MESSAGE_PART, MESSAGE_END and",
        "RUN_FINISHED out (five frames), through session, transaction, agent run and negotiation;",
        "the baseline is one frame each way. Start-up includes connecting the demo MCP server in",
        "the background (it does not delay the listener).",
        "",
    ]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
