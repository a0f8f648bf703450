"""How many nodes one Redis serves: Redis's own CPU time per echo round trip in a cluster, and its ceiling.

    .venv/bin/python bench/cluster_redis.py [--round-trips N] [--lanes N]

A real redis-server (Debian's, on a free port, no persistence) and two nodes (``Bus``) in this
process. Each lane is one user in one transaction, hosted by both nodes (a member on each), doing
echo round trips one after another with the bus operations the integration plan gives one round
trip (docs/cluster.md, "How the runtime will use it"):

- the user's ``MESSAGE`` in: ``dedup.seen`` (shared inbound dedup), then ``log.append``;
- the echo turn on the lease holder: ``RUN_STARTED`` and ``MESSAGE_START`` appended, the streamed
  ``MESSAGE_PART`` through the batcher and ``MESSAGE_END`` after it (``batcher.event``: one
  append for both), ``RUN_FINISHED`` appended: 5 appends, each one script run and one ``PUBLISH``
  delivered to the 2 hosting nodes;
- the author's session keeps the 5 envelopes it receives in its replay window (``replay.append``).

A round trip ends when the other node's feed has delivered its 6 events. What runs by time and not
per round trip is measured on its own: a node's heartbeat (``nodes.beat`` + ``quotas.refresh``,
every ``heartbeat_seconds``) and a run lease's renewal (every third of ``lease_seconds``).

Then (``--serve N``, on by default) the real thing: two ``haip-runtime serve`` nodes of
config/multi-node.toml on this Redis and a PostgreSQL of the tests' kind, N echo round trips over
WebSocket, and what Redis did for them: the issue's "Redis commands per echo round trip".

Redis's CPU time comes from ``INFO cpu`` (``used_cpu_user`` + ``used_cpu_sys`` of the server
process) before and after; commands from ``INFO commandstats``. Its ceiling on this machine is
``redis-benchmark`` (Debian's redis-tools) at saturation. Results to bench/CLUSTER-REDIS-RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.cluster import Bus, LogEntry, LogGap  # noqa: E402
from haip_runtime.config.clustering import ClusterConfig  # noqa: E402
from tests.support.redis import RedisServer, running_redis  # noqa: E402

EVENT = b'{"type":"RUN_STARTED","payload":{"run_id":"r1","agent":"echo","message_id":"m1"}}'
PART = b'{"type":"MESSAGE_PART","payload":{"message_id":"m1","delta":"you said: hello"}}'
ENVELOPE = b'{"type":"MESSAGE_PART","session":"s1","seq":"12","transaction":"t1","payload":{"delta":"x"}}'
#: Events one round trip appends to the transaction's log (the user's MESSAGE and the turn's 5, in 5 appends).
EVENTS_PER_ROUND_TRIP = 6
#: What a node does per second at full load: one runtime process holds about this many echo round trips
#: a second on one core (issue 21); the table also shows lighter loads.
NODE_LOADS = (5000, 2500, 1000)
#: The share of Redis's one core the estimate lets the cluster use (the rest: spikes, resumes, catch-ups).
UTILISATION = 0.7
#: What ``redis-benchmark`` sends to find Redis's ceiling here: a plain write, and the bus's kinds of work.
CEILING_COMMANDS = [
    ("`SET`", ["SET", "k", "v"]),
    (
        "`XADD ... MAXLEN ~ 1000` (a log or replay append's stream write)",
        ["XADD", "s", "MAXLEN", "~", "1000", "*", "f", "v"],
    ),
    ("`PUBLISH` to a channel with no subscriber", ["PUBLISH", "c", "m"]),
    ("`EVAL` of a script doing one `INCR`", ["EVAL", "return redis.call('INCR', KEYS[1])", "1", "n"]),
]
CEILING_REQUESTS = 100_000


class Arrivals:
    """The second node's feed for one lane: counts delivered events and wakes the lane when all arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = anyio.Event()

    def __call__(self, items: Sequence[LogEntry | LogGap]) -> None:
        self.count += len(items)
        if self.count >= self.target:
            self.done.set()

    def expect(self, more: int) -> anyio.Event:
        self.target += more
        self.done = anyio.Event()
        if self.count >= self.target:
            self.done.set()
        return self.done


async def round_trip(owner: Bus, lane: str, number: int, epoch: str, arrivals: Arrivals, mirror: Arrivals) -> None:
    """One echo round trip of lane ``lane`` (transaction ``T<lane>``, session ``S<lane>``) on ``owner``."""
    transaction, session = f"T{lane}", f"S{lane}"
    done = arrivals.expect(EVENTS_PER_ROUND_TRIP)
    mirrored = mirror.expect(EVENTS_PER_ROUND_TRIP)
    assert not await owner.dedup.seen(session, f"m{lane}-{number}")
    await owner.log.append(transaction, EVENT)  # the user's MESSAGE
    await owner.log.append(transaction, EVENT)  # RUN_STARTED
    await owner.log.append(transaction, EVENT)  # MESSAGE_START
    await owner.batcher.part(transaction, PART)  # the streamed text...
    await owner.batcher.event(transaction, EVENT)  # ...and MESSAGE_END after it: one append
    await owner.log.append(transaction, EVENT)  # RUN_FINISHED
    for seq in range(5):  # what the author's session receives, kept for a resume on any node
        await owner.replay.append(session, epoch, number * 5 + seq + 1, ENVELOPE)
    with anyio.fail_after(30):
        await done.wait()
        await mirrored.wait()


async def cpu_seconds(bus: Bus) -> float:
    info = await bus.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def commandstats(bus: Bus) -> dict[str, tuple[int, float]]:
    info = await bus.redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(s["calls"]), float(s["usec"])) for name, s in info.items()}


def delta(after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, int]:
    return {
        name: calls - before.get(name, (0, 0.0))[0]
        for name, (calls, _) in after.items()
        if name not in ("info",) and calls - before.get(name, (0, 0.0))[0] > 0
    }


async def lanes_on_two_nodes(url: str, lanes: int, per_lane: int, warmed: Callable[[], Awaitable[None]]) -> float:
    """``lanes`` users doing ``per_lane`` round trips each on a pair of nodes; seconds taken after ``warmed()``."""
    config = ClusterConfig(redis_url=url, key_prefix="bench", part_batch_ms=5)
    async with Bus(config) as owner, Bus(config) as other:
        arrivals = [Arrivals() for _ in range(lanes)]
        mirrors = [Arrivals() for _ in range(lanes)]
        epochs = []
        prefix = owner.node_id  # lanes of each worker process are transactions and sessions of their own
        for lane in range(lanes):  # both nodes host every transaction: a member on each
            await owner.feed.host(f"T{prefix}{lane}", mirrors[lane])
            await other.feed.host(f"T{prefix}{lane}", arrivals[lane])
            epochs.append(await owner.replay.start(f"S{prefix}{lane}"))

        async def run(count: int, offset: int) -> None:
            async def lane_of(lane: int) -> None:
                for number in range(offset, offset + count):
                    await round_trip(owner, f"{prefix}{lane}", number, epochs[lane], arrivals[lane], mirrors[lane])

            async with anyio.create_task_group() as tg:
                for lane in range(lanes):
                    tg.start_soon(lane_of, lane)

        await run(20, 0)  # warm-up: scripts loaded, connections open
        await warmed()
        started = time.perf_counter()
        await run(per_lane, 20)
        return time.perf_counter() - started


async def worker(url: str, lanes: int, per_lane: int) -> None:
    """``--worker``: say "ready" after the warm-up, start on a line from stdin, say the seconds taken."""

    async def warmed() -> None:
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

    elapsed = await lanes_on_two_nodes(url, lanes, per_lane, warmed)
    print(f"done {elapsed}", flush=True)


async def measure_round_trips(url: str, processes: int, lanes: int, per_lane: int) -> dict[str, object]:
    """``processes`` load processes (each a pair of nodes with ``lanes`` users) at once on one Redis."""
    command = [sys.executable, __file__, "--worker", url, "--lanes", str(lanes), "--round-trips", str(per_lane)]
    async with AsyncExitStack() as stack, Bus(ClusterConfig(redis_url=url, key_prefix="bench")) as probe:
        workers = [await stack.enter_async_context(await anyio.open_process(command)) for _ in range(processes)]
        lines = [BufferedByteReceiveStream(worker.stdout) for worker in workers if worker.stdout is not None]
        for reader in lines:
            assert await reader.receive_until(b"\n", 100) == b"ready"
        before_cpu, before_stats = await cpu_seconds(probe), await commandstats(probe)
        started = time.perf_counter()
        for worker in workers:
            assert worker.stdin is not None
            await worker.stdin.send(b"go\n")
        for reader in lines:
            assert (await reader.receive_until(b"\n", 100)).startswith(b"done")
        elapsed = time.perf_counter() - started
        after_cpu, after_stats = await cpu_seconds(probe), await commandstats(probe)
        for worker in workers:
            await worker.wait()
    total = processes * lanes * per_lane
    calls = delta(after_stats, before_stats)
    return {
        "round_trips": total,
        "rate": total / elapsed,
        "cpu_us": (after_cpu - before_cpu) / total * 1e6,
        "redis_busy": (after_cpu - before_cpu) / elapsed,
        "commands": sum(calls.values()) / total,
        "by_command": {name: count / total for name, count in sorted(calls.items())},
    }


async def measure_background(url: str, beats: int) -> tuple[float, float]:
    """Redis CPU µs of one node heartbeat (beat + quota refresh) and of one lease renewal."""
    config = ClusterConfig(redis_url=url, key_prefix="bench")
    async with Bus(config) as node:
        for user in range(20):  # a node holding a few sessions' slots, as a busy one does
            await node.quotas.acquire_slot(f"u{user}", "sessions", f"s{user}", 20)
        start = await cpu_seconds(node)
        for _ in range(beats):
            await node.nodes.beat()
            await node.quotas.refresh()
        heartbeat = (await cpu_seconds(node) - start) / beats * 1e6
        token = await node.leases.acquire("run:T0", 10)
        assert token is not None
        start = await cpu_seconds(node)
        for _ in range(beats):
            assert await node.leases.renew("run:T0", token, 10)
        lease = (await cpu_seconds(node) - start) / beats * 1e6
    return heartbeat, lease


async def benchmark_ceiling(server: RedisServer) -> list[tuple[str, float, float]]:
    """Redis alone at saturation: ``redis-benchmark`` (50 clients, no pipelining) per command,
    (name, commands/s, Redis CPU µs per command)."""
    program = shutil.which("redis-benchmark")
    if program is None:
        return []
    rows = []
    async with Bus(ClusterConfig(redis_url=server.url, key_prefix="bench")) as probe:
        for name, words in CEILING_COMMANDS:
            args = [program, "-p", str(server.port), "-n", str(CEILING_REQUESTS), "-c", "50", "-q", *words]
            before = await cpu_seconds(probe)
            done = await anyio.run_process(args)
            used = await cpu_seconds(probe) - before
            found = re.search(r"([\d.]+) requests per second", done.stdout.decode().replace("\r", "\n"))
            if found:
                rows.append((name, float(found.group(1)), used / CEILING_REQUESTS * 1e6))
    return rows


def report(
    result: dict[str, object],
    heartbeat: float,
    lease: float,
    ceiling: list[tuple[str, float, float]],
    processes: int,
    lanes: int,
) -> str:
    cpu_us = float(result["cpu_us"])  # type: ignore[arg-type]
    commands = float(result["commands"])  # type: ignore[arg-type]
    rate = float(result["rate"])  # type: ignore[arg-type]
    busy = float(result["redis_busy"])  # type: ignore[arg-type]
    capacity = 1e6 / cpu_us
    by_command = result["by_command"]
    assert isinstance(by_command, dict)
    scripts = float(by_command.get("evalsha", 0))
    rows = [f"| {load:,} | {UTILISATION * capacity / load:.1f} |" for load in NODE_LOADS]
    ceiling_rows = [f"| {name} | {per_second:,.0f} | {cpu:.1f} µs |" for name, per_second, cpu in ceiling]
    return "\n".join(
        [
            "# How many nodes one Redis serves",
            "",
            f"Written by `bench/cluster_redis.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"Python {platform.python_version()}, {platform.machine()}, a 2-core machine shared with the load "
            f"generator (and with other work: the figures are noisy); a local redis-server without persistence; "
            f"{processes} load processes, each a pair of nodes with {lanes} users, each user in a transaction "
            f"hosted by both nodes; {result['round_trips']:,} echo round trips.",
            "",
            "## The plan's echo round trip (replay windows and shared dedup included)",
            "",
            "| what | value |",
            "|---|---|",
            f"| **Redis commands per echo round trip** (those scripts run included) | **{commands:.1f}** |",
            f"| requests a node sends per round trip (script runs + the dedup `SET`) | {scripts + 1:.0f} |",
            f"| Redis CPU per echo round trip | {cpu_us:.0f} µs |",
            f"| round trips/s reached (the Python load processes are the limit) | {rate:,.0f} |",
            f"| Redis busy at that rate (CPU seconds per second) | {busy:.2f} |",
            f"| a node's heartbeat (beat + quota refresh, each `heartbeat_seconds`) | {heartbeat:.0f} µs |",
            f"| a run lease's renewal (each `lease_seconds / 3`) | {lease:.0f} µs |",
            "",
            "By command, per round trip: "
            + ", ".join(f"{name} {count:.1f}" for name, count in by_command.items())
            + ".",
            "",
            "## Redis's ceiling on this machine",
            "",
            f"Redis runs commands on one core: at {cpu_us:.0f} µs per round trip, "
            f"**{capacity:,.0f} echo round trips/s** fill it. `redis-benchmark` (50 clients, no pipelining) "
            "for comparison, with Redis's CPU per command:",
            "",
            "| command | commands/s | Redis CPU per command |",
            "|---|---|---|",
            *ceiling_rows,
            "",
            "## Nodes per Redis",
            "",
            f"At {UTILISATION:.0%} of Redis's core ({UTILISATION * capacity:,.0f} echo round trips/s), "
            "nodes each doing:",
            "",
            "| echo round trips/s per node | nodes one Redis serves |",
            "|---|---|",
            *rows,
            "",
            "Assumptions: the round trip is the integration plan's (one user, one echo turn: 6 events in 5",
            "appends, 5 replay appends, one dedup check), each transaction hosted by 2 nodes; 5,000 round trips/s",
            "is one node's core at full load (issue 21). Heartbeats and lease renewals cost "
            f"{heartbeat:.0f} µs per node",
            f"per second and {lease:.0f} µs per running transaction every few seconds: well under 1 % of the core",
            "for tens of nodes. A long streamed answer costs a few appends more (the batcher sends parts in 5 ms",
            "batches), not one per token. Redis's CPU per request falls as its load rises (more requests per",
            "wake-up): measured here at the load the Python processes reach, the node counts are on the low side.",
            "",
        ]
    )


async def measure_serve(url: str, round_trips: int, clients: int) -> dict[str, object]:
    """Real ``serve`` nodes (two, of config/multi-node.toml, on PostgreSQL) doing echo round trips over
    WebSocket, ``clients`` at once spread over both: Redis commands and CPU per round trip as the runtime
    does them today (whatever of the bus its code uses), heartbeats included."""
    from haip_runtime.client import HaipClient
    from tests.support.deployment import deployment
    from tests.support.postgres import PostgresServer

    database = PostgresServer.create()
    try:
        with deployment(2, url, database.create_database("bench_nodes")) as nodes:
            async with Bus(ClusterConfig(redis_url=url)) as probe, AsyncExitStack() as stack:
                sessions = []
                for number in range(clients):
                    node = nodes.nodes[number % 2]
                    client = HaipClient(node.ws_url, token=nodes.token(f"u{number}"))
                    client = await stack.enter_async_context(client)
                    sessions.append((client, await client.start_transaction("echo")))
                for client, transaction in sessions:  # warm-up
                    await turns(client, transaction, 5)
                before_cpu, before_stats = await cpu_seconds(probe), await commandstats(probe)
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for client, transaction in sessions:
                        tg.start_soon(turns, client, transaction, round_trips // clients)
                elapsed = time.perf_counter() - started
                after_cpu, after_stats = await cpu_seconds(probe), await commandstats(probe)
    finally:
        database.close()
    total = clients * (round_trips // clients)
    calls = delta(after_stats, before_stats)
    return {
        "round_trips": total,
        "seconds": elapsed,
        "rate": total / elapsed,
        "cpu_us": (after_cpu - before_cpu) / total * 1e6,
        "commands": sum(calls.values()) / total,
        "by_command": {name: count / total for name, count in sorted(calls.items())},
    }


async def turns(client: Any, transaction: str, count: int) -> None:
    """``count`` echo round trips, one after another: a message, then its run's ``RUN_FINISHED``."""
    events = client.events()
    for _ in range(count):
        await client.send_text(transaction, "hello")
        with anyio.fail_after(30):
            async for event in events:
                if event.type == "RUN_FINISHED" and event.transaction == transaction:
                    break


def serve_section(result: dict[str, object]) -> list[str]:
    by_command = result["by_command"]
    assert isinstance(by_command, dict)
    listed = ", ".join(f"{name} {count:.2f}" for name, count in by_command.items()) or "none"
    cpu_us = float(result["cpu_us"])  # type: ignore[arg-type]
    capacity = 1e6 / cpu_us
    rows = [f"| {load:,} | {UTILISATION * capacity / load:.1f} |" for load in NODE_LOADS]
    return [
        "## Real `serve` nodes",
        "",
        f"Two `haip-runtime serve` nodes of config/multi-node.toml (PostgreSQL, the bus on this Redis), "
        f"{result['round_trips']:,} echo round trips over WebSocket from 8 clients spread over both (each in "
        f"a transaction of its own), in {float(result['seconds']):.1f} s "  # type: ignore[arg-type]
        f"({float(result['rate']):,.0f}/s), heartbeats included:",  # type: ignore[arg-type]
        "",
        "| what | value |",
        "|---|---|",
        f"| **Redis commands per echo round trip** | **{float(result['commands']):.1f}** |",  # type: ignore[arg-type]
        f"| script runs (appends) per round trip | {float(by_command.get('evalsha', 0)):.2f} |",
        f"| Redis CPU per echo round trip | {cpu_us:.0f} µs |",
        f"| echo round trips/s one Redis core holds | {capacity:,.0f} |",
        "",
        f"By command, per round trip: {listed}.",
        "",
        "What the runtime does on the bus per round trip: the user's message appended, then the turn's",
        "events (what is published while an append is in flight goes in the next one), each append one",
        "script run and one delivery by the feed; and the sessions' replay windows (resume on any node),",
        "one script run per session per flush in one pipeline, carrying the recent inbound ids too (the",
        "shared dedup), plus each node's heartbeat and the runs' lease renewals.",
        "",
        f"At {UTILISATION:.0%} of Redis's core, nodes each doing:",
        "",
        "| echo round trips/s per node | nodes one Redis serves |",
        "|---|---|",
        *rows,
        "",
    ]


async def run(processes: int, lanes: int, per_lane: int, serve: int) -> str:
    with running_redis() as server:
        result = await measure_round_trips(server.url, processes, lanes, per_lane)
        heartbeat, lease = await measure_background(server.url, 500)
        ceiling = await benchmark_ceiling(server)
        served = await measure_serve(server.url, serve, 8) if serve else None
    text = report(result, heartbeat, lease, ceiling, processes, lanes)
    return text + "\n" + "\n".join(serve_section(served)) if served is not None else text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--round-trips", type=int, default=100, help="per lane")
    parser.add_argument("--lanes", type=int, default=32, help="users per load process")
    parser.add_argument("--processes", type=int, default=3, help="load processes, each a pair of nodes")
    parser.add_argument("--serve", type=int, default=2000, help="echo round trips through real serve nodes (0: skip)")
    parser.add_argument("--worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        anyio.run(worker, args.worker, args.lanes, args.round_trips)
        return
    text = anyio.run(run, args.processes, args.lanes, args.round_trips, args.serve)
    (ROOT / "bench" / "CLUSTER-REDIS-RESULTS.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
