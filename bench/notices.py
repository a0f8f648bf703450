"""How long an MCP server's state change stalls the event loop with thousands of transactions open.

    .venv/bin/python bench/notices.py [--transactions N]

The hub tells every transaction that uses the server (an INFO and a TOOL_LIST to each member).
Measured: the longest time a ticker task waits for the loop while that fan-out runs, for the
hub's fan-out (it yields every 100 transactions) against the same fan-out done in one go (how
it was done before, the baseline), side by side in the same run. Also the number of member
notices one failing server causes over 20 retries, before (every retry) and now (state changes).
Results go to bench/RESULTS-notices.md. In-process, no network.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.agents.registry import load_agents  # noqa: E402
from haip_runtime.auth.tokens import Principal  # noqa: E402
from haip_runtime.bridge.models import ServerState, ServerStatus  # noqa: E402
from haip_runtime.config.models import SessionConfig  # noqa: E402
from haip_runtime.conversation.transaction import AgentSlot  # noqa: E402
from haip_runtime.hub.router import Hub  # noqa: E402
from haip_runtime.protocol.envelope import Event  # noqa: E402
from haip_runtime.protocol.events import EventType  # noqa: E402
from haip_runtime.server.app import Runtime  # noqa: E402
from haip_runtime.session.session import Session  # noqa: E402
from haip_runtime.session.window import Outbox  # noqa: E402
from tests.support.serving import make_config  # noqa: E402

CONFIG = make_config({"mcp": {"servers": {"s": {"transport": "stdio", "command": "/nonexistent"}}}})


def populate(hub: Hub, count: int) -> None:
    spec = load_agents(CONFIG)["echo"]
    for number in range(count):
        session = Session(Principal(f"user{number}"), frozenset({"INFO", "TOOL_LIST"}), SessionConfig())
        session.attach(Outbox(10**6))
        transaction = hub.transactions.new(session.user, None)
        transaction.add_member(session)
        instance = spec.create(transaction_id=transaction.id, started_by=session.user, params={})
        transaction.add_agent(AgentSlot("echo", instance, ("s",)))
        hub.transactions.add(transaction)


def all_at_once(hub: Hub, server: str, state: str, error: str | None) -> None:
    """The fan-out as it was: one synchronous loop over every transaction."""
    for transaction in list(hub.transactions.live.values()):
        if not transaction.ended and any(server in slot.tool_servers for slot in transaction.agents.values()):
            transaction.publish(Event(EventType.INFO, {"event": "mcp.server", "server": server, "state": state}))
            hub.context.send_tool_list(transaction)


async def longest_stall(fan_out: object) -> float:
    """The longest gap between a ticker's turns on the loop while ``fan_out()`` runs.

    The garbage collector is paused while measuring: a full collection of the frames earlier rounds
    left in the sessions' replay windows would otherwise land in either side at random.
    """
    longest, done = 0.0, anyio.Event()
    gc.collect()
    gc.disable()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await anyio.lowlevel.checkpoint()
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        result = fan_out()  # type: ignore[operator]
        if result is not None:
            await result
        done.set()
    gc.enable()
    return longest


async def measure(count: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each fan-out's longest stall, the two alternating."""
    baseline, ours = [], []
    async with Hub(CONFIG, load_agents(CONFIG)) as hub:
        populate(hub, count)
        for _ in range(rounds):
            baseline.append(await longest_stall(lambda: all_at_once(hub, "s", "failed", "down")))
            ours.append(await longest_stall(lambda: hub.server_changed("s", "failed", "down")))
        hub.transactions.live.clear()
    return {"baseline": statistics.median(baseline), "ours": statistics.median(ours)}


def notices_per_retries(retries: int) -> int:
    """Member notices a server failing ``retries`` times causes (each retry: FAILED, then RECONNECTING)."""
    runtime = Runtime(CONFIG)
    send, receive = anyio.create_memory_object_stream[tuple[str, str, str | None]](10**6)
    runtime._notices = send
    for _ in range(retries):
        for state in (ServerState.FAILED, ServerState.RECONNECTING):
            runtime._server_changed(ServerStatus("s", state, (), "cannot start '/nonexistent': command not found", 0))
    count = receive.statistics().current_buffer_used
    send.close()
    receive.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transactions", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    stall = anyio.run(measure, args.transactions, args.rounds)
    notices = notices_per_retries(20)
    ratio = stall["ours"] / stall["baseline"]
    lines = [
        "# MCP server notices: loop stall and notice count",
        "",
        f"Written by `bench/notices.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine.",
        "",
        "| measure | haip-runtime | baseline | ratio |",
        "|---|---|---|---|",
        f"| longest loop stall telling {args.transactions} transactions a server failed (median of {args.rounds}) "
        f"| {stall['ours'] * 1000:.1f} ms | {stall['baseline'] * 1000:.1f} ms (one synchronous loop) | {ratio:.3f}x |",
        f"| member notices for a server failing 20 times | {notices} | 40 (one per state flip) | |",
        "",
    ]
    (ROOT / "bench" / "RESULTS-notices.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
