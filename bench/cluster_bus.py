"""How fast the cluster's bus appends to a transaction log, and how many Redis commands each event costs.

    .venv/bin/python bench/cluster_bus.py [--events N]

A real redis-server (Debian's, on a free port, no persistence) and two nodes (``Bus``) in this
process: one appends, the other hosts the transaction, so every append is published to a listener
and the figures include the delivery. Ways of appending, each over the same number of events:
one ``append`` at a time (one script run per event); 16 appends in flight at once (over the
connection pool's connections); ``append_many`` of 16 events (one script run, one message); and
streamed parts through the ``PartBatcher`` (a batch every 5 ms or 16 KB). Commands per event come
from ``INFO commandstats`` before and after (commands run inside the script count too).
Results go to its part of bench/CLUSTER-RESULTS.md (bench/cluster.py writes another). Runs in seconds by default.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(1, str(ROOT / "bench"))

from common import write_section  # noqa: E402  # type: ignore[import-not-found]

from haip_runtime.cluster import Bus, LogEntry, LogGap  # noqa: E402
from haip_runtime.config.clustering import ClusterConfig  # noqa: E402
from tests.support.redis import running_redis  # noqa: E402

PAYLOAD = b'{"type":"MESSAGE_PART","payload":{"messageId":"m1","delta":"token "}}'


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = anyio.Event()

    def __call__(self, items: Sequence[LogEntry | LogGap]) -> None:
        self.count += len(items)
        if self.count >= self.target:
            self.done.set()

    def expect(self, total: int) -> None:
        self.target, self.done = total, anyio.Event()


async def commandstats(bus: Bus) -> dict[str, int]:
    info = await bus.redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


async def measure(
    writer: Bus, reader: Counter, events: int, append: Callable[[], Awaitable[None]]
) -> tuple[float, float, float]:
    """(events/s appended and delivered, Redis commands per event, script runs per event)."""
    reader.expect(reader.count + events)
    before = await commandstats(writer)
    started = time.perf_counter()
    await append()
    with anyio.fail_after(60):
        await reader.done.wait()
    elapsed = time.perf_counter() - started
    after = await commandstats(writer)
    delta = {name: after[name] - before.get(name, 0) for name in after if name != "info"}
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    return events / elapsed, sum(delta.values()) / events, scripts / events


async def run(events: int) -> list[tuple[str, float, float, float]]:
    with running_redis() as server:
        config = ClusterConfig(redis_url=server.url, key_prefix="bench", part_batch_ms=5)
        async with Bus(config) as writer, Bus(config) as node:
            reader = Counter()
            await node.feed.host("T", reader)

            async def one_at_a_time() -> None:
                for _ in range(events):
                    await writer.log.append("T", PAYLOAD)

            async def in_flight() -> None:
                async def lane(count: int) -> None:
                    for _ in range(count):
                        await writer.log.append("T", PAYLOAD)

                async with anyio.create_task_group() as tg:
                    for _ in range(16):
                        tg.start_soon(lane, events // 16)

            async def batched() -> None:
                for _ in range(events // 16):
                    await writer.log.append_many("T", [PAYLOAD] * 16)

            async def parts() -> None:
                for number in range(events):
                    await writer.batcher.part("T", PAYLOAD)
                    if number % 64 == 63:
                        await anyio.lowlevel.checkpoint()  # a stream yields between tokens
                await writer.batcher.flush("T")

            await measure(writer, reader, 200, one_at_a_time)  # warm-up: scripts loaded, connections open
            rows = []
            for name, append in [
                ("`append`, one at a time", one_at_a_time),
                ("`append`, 16 in flight (over the pool's connections)", in_flight),
                ("`append_many`, 16 events a call", batched),
                ("`PartBatcher.part` (5 ms / 16 KB batches)", parts),
            ]:
                rows.append((name, *await measure(writer, reader, events - events % 16, append)))
            return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    rows = anyio.run(run, args.events)
    lines = [
        "## Cluster bus: appends through the Lua script",
        "",
        f"Written by `bench/cluster_bus.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine; a local redis-server, "
        f"{args.events} events of {len(PAYLOAD)} bytes per row, "
        "each delivered to a second node hosting the transaction.",
        "",
        "| how | events/s (appended and delivered) | Redis commands per event | script runs per event |",
        "|---|---|---|---|",
        *[f"| {name} | {rate:,.0f} | {commands:.2f} | {scripts:.3f} |" for name, rate, commands, scripts in rows],
        "",
        "Commands per event count those the script runs (GET, XADD, SET, PEXPIRE, PUBLISH) and the",
        "EVALSHA itself: one event alone costs 6; in a batch of n, XADD is per event and the rest per batch.",
        "",
    ]
    write_section(ROOT / "bench" / "CLUSTER-RESULTS.md", "cluster_bus", "Cluster benchmarks (issue 21)", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
