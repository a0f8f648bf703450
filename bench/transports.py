"""A trivial tool call through the runtime over each MCP transport, side by side; results go to bench/TRANSPORTS.md.

    .venv/bin/python bench/transports.py [--calls N]

The same server (haip_runtime/demo/mcp_server.py, tool `add`) is reached three ways by one runtime:
`python` (the module's `MCPServer` in-process), `stdio` (a subprocess) and `http` (streamable HTTP to
a subprocess). A HAIP client calls `add` directly (TOOL_CALL → TOOL_DONE over a real WebSocket) and
the calls are interleaved across transports so each sees the same machine load. The baseline is the
MCP SDK's own `Client` calling the same tool over the same transport, without the runtime,
interleaved with the runtime's calls in the same loop. Only 127.0.0.1 is contacted, in bounded loops.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RAISED_LIMITS  # noqa: E402  # type: ignore[import-not-found]

from haip_runtime.client import HaipClient  # noqa: E402
from tests.support.demo_mcp import start_http_demo, stop  # noqa: E402
from tests.support.serving import live_server, make_config  # noqa: E402

DEMO = ROOT / "haip_runtime" / "demo" / "mcp_server.py"
TRANSPORTS = ("python", "stdio", "http")
WARM_UP = 30
ARGS = {"a": 1, "b": 2}


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def servers(url: str) -> dict[str, dict[str, Any]]:
    return {
        "python": {"transport": "python", "server": "haip_runtime.demo.mcp_server:server"},
        "stdio": {"transport": "stdio", "command": sys.executable, "args": [str(DEMO)]},
        "http": {"transport": "http", "url": url},
    }


async def interleaved(calls: int, call: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, list[float]]:
    """`calls` timed calls per transport, round-robin, after a warm-up; seconds per call."""
    for _ in range(WARM_UP):
        for one in call.values():
            await one()
    times: dict[str, list[float]] = {name: [] for name in call}
    for _ in range(calls):
        for name, one in call.items():
            start = time.perf_counter()
            await one()
            times[name].append(time.perf_counter() - start)
    return times


def runtime_callers(client: HaipClient, tx: str) -> dict[str, Callable[[], Awaitable[None]]]:
    """One TOOL_CALL → TOOL_DONE of `add` per transport, as a HAIP member calling it directly."""
    counter = iter(range(10**9))

    def caller(server: str) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            call_id = f"{server}-{next(counter)}"
            body = {"call_id": call_id, "tool": f"{server}.add", "params": ARGS}
            await client.send("TOOL_CALL", body, transaction=tx)
            done = await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == call_id)
            assert done.get("status") == "OK", done.payload
            client.received.clear()  # keep wait_for's scan short over thousands of calls

        return one

    return {f"runtime {name}": caller(name) for name in TRANSPORTS}


def sdk_callers(clients: dict[str, Any]) -> dict[str, Callable[[], Awaitable[None]]]:
    def caller(client: Any) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            result = await client.call_tool("add", ARGS)
            assert not result.is_error

        return one

    return {f"sdk {name}": caller(client) for name, client in clients.items()}


@asynccontextmanager
async def sdk_clients(url: str) -> AsyncIterator[tuple[dict[str, Any], dict[str, float]]]:
    """The MCP SDK's own clients, one per transport, and how long each took to connect."""
    from mcp import Client, StdioServerParameters

    spec = importlib.util.spec_from_file_location("bench_demo_mcp_server", DEMO)  # its own copy, not the runtime's
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    targets: dict[str, Any] = {
        "python": demo.server,
        "stdio": StdioServerParameters(command=sys.executable, args=[str(DEMO)]),
        "http": url,
    }
    clients: dict[str, Any] = {}
    connect: dict[str, float] = {}
    async with AsyncExitStack() as stack:
        for name, target in targets.items():
            start = time.perf_counter()
            clients[name] = await stack.enter_async_context(Client(target, cache=None))
            connect[name] = time.perf_counter() - start
        yield clients, connect


async def measure(ws_url: str, token: str, mcp_url: str, calls: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Runtime and SDK calls over every transport, all interleaved in one loop."""
    async with HaipClient(ws_url, token=token, timeout=30) as client, sdk_clients(mcp_url) as (clients, connect):
        tx = await client.start_transaction("operator")
        wanted = {f"{name}.add" for name in TRANSPORTS}
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and wanted <= {t["name"] for t in e.get("tools", [])})
        times = await interleaved(calls, runtime_callers(client, tx) | sdk_callers(clients))
    return times, connect


def percentile(samples: list[float], p: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500, help="timed calls per transport (default: 500)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # before MCPServer's own basicConfig at INFO (every HTTP request)
    port = unused_port()
    process = start_http_demo(port)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        config = {
            **RAISED_LIMITS,
            "agents": {"operator": {"plugin": "operator", "mcp_servers": list(TRANSPORTS)}},
            "mcp": {"servers": servers(url)},
        }
        with live_server(make_config(config)) as live:
            times, connect = anyio.run(measure, live.ws_url, live.token(), url, args.calls)
    finally:
        stop(process)
    ours = {name: times[f"runtime {name}"] for name in TRANSPORTS}
    rows = []
    for name in TRANSPORTS:
        p50, p99 = percentile(ours[name], 50), percentile(ours[name], 99)
        b50, b99 = percentile(times[f"sdk {name}"], 50), percentile(times[f"sdk {name}"], 99)
        rows.append(
            f"| `{name}` | {p50:.2f} ms | {p99:.2f} ms | {b50:.2f} ms | {b99:.2f} ms | {p50 / b50:.1f}x | "
            f"{connect[name] * 1000:.0f} ms |"
        )
    py50 = percentile(ours["python"], 50)
    lines = [
        "# Tool calls per MCP transport",
        "",
        f"Written by `bench/transports.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine; "
        f"{args.calls} calls per transport and path, all interleaved, after {WARM_UP} warm-up calls each.",
        "",
        "A trivial call (`add`, haip_runtime/demo/mcp_server.py) from a HAIP client: TOOL_CALL in, TOOL_CALL, "
        "TOOL_UPDATE RUNNING and TOOL_DONE out, over a real WebSocket, through session, transaction, "
        "tool proxy and MCP bridge. Baseline: the MCP SDK's `Client` calling the same tool over the "
        "same transport, without the runtime. Connect: the SDK's `Client` entering (start-up and "
        "handshake; the HTTP server was already running).",
        "",
        "| transport | runtime p50 | runtime p99 | SDK alone p50 | SDK alone p99 | p50 ratio | SDK connect |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Through the runtime, the p50 of "
        + " and ".join(f"`{name}` is {percentile(ours[name], 50) / py50:.2f}x" for name in TRANSPORTS[1:])
        + " that of `python`.",
        "",
    ]
    (ROOT / "bench" / "TRANSPORTS.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
