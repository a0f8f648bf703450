"""Benchmarks, each against a baseline measured side by side in the same run; results go to bench/RESULTS.md.

    .venv/bin/python bench/run.py [--rounds N]

1. Start-up: `haip-runtime serve` on the default haip.toml until it prints where to connect, against a bare
   uvicorn + Starlette app printing the same (the floor any Python ASGI server pays).
2. Echo round trips: a HAIP client sending MESSAGE and waiting for the echo agent's RUN_FINISHED, against a
   bare websockets echo server answering each frame (the floor of one WebSocket round trip in Python).
Only 127.0.0.1 is contacted, in bounded loops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.client import HaipClient  # noqa: E402
from tests.serving import live_server, make_config  # noqa: E402

BASELINE_APP = """
import socket, uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.responses import PlainTextResponse
async def hi(request): return PlainTextResponse("hi")
class S(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print("listening", flush=True)
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(128)
S(uvicorn.Config(Starlette(routes=[Route("/", hi)]), log_level="warning")).run(sockets=[sock])
"""


def time_until_ready(command: list[str], marker: str) -> float:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if marker in line:
                return time.perf_counter() - start
        raise RuntimeError(f"{command} exited before printing {marker!r}")
    finally:
        process.terminate()
        process.wait(timeout=15)
        process.stdout.close()


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
        for index in range(count):
            await client.send_text(tx, f"message {index}")
            async for event in events:
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
    with live_server(make_config()) as live:
        ours = anyio.run(echo_round_trips, live.ws_url, live.token(), count)
    base = anyio.run(raw_round_trips, count)
    return {"haip_turns_per_s": ours, "baseline_round_trips_per_s": base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=300)
    args = parser.parse_args()
    start = startup(args.rounds)
    trips = round_trips(args.messages)
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
