"""The load process of bench/cluster.py's fan-out: `python bench/cluster_load.py '<json spec>'` prints one
JSON line of results.

One transaction, its members spread over the nodes of a cluster (``urls``, ``tokens`` and ``members``:
one entry per node; the first member on the first node starts it, so its turns run there). Once every
member has joined, the bench streaming agent (bench/streamer.py) writes ``count`` numbered, stamped
tokens (``"<index>:<time.time()> "``) at ``rate`` per second. Every member checks that it got every
index once and in order, and takes each token's lag: the time it parsed the token minus the time the
agent wrote it (the nodes and this process share the machine's clock). The same code runs against
one node (every entry the same URL) for the baseline.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from common import cpu_seconds, percentile, waited_seconds  # type: ignore[import-not-found]
from load import Peer, drop, open_peer  # type: ignore[import-not-found]

#: Tries of a join on a node that does not know the transaction yet (the starting node writes it to
#: PostgreSQL within its flush interval), 50 ms apart.
JOIN_TRIES = 100
#: Seconds past the stream's own duration after which a member still waiting for its end is given up.
LINGER = 30


@dataclass
class Member:
    """What one member got of the stream."""

    node: int
    peer: Peer
    tokens: int = 0
    expected: int = 0
    wrong: int = 0
    lags: list[float] = field(default_factory=list)

    async def read(self) -> None:
        """Read to the stream's MESSAGE_END: count the tokens, check their indexes, take their lags."""
        while True:
            frame = orjson.loads(await self.peer.ws.recv())
            kind = frame["type"]
            if kind == "MESSAGE_PART":
                now = time.time()
                for token in frame["payload"]["text"].split():
                    index, _, stamp = token.partition(":")
                    self.wrong += int(index) != self.expected  # missing, repeated or out of order
                    self.expected = int(index) + 1
                    self.tokens += 1
                    self.lags.append(now - float(stamp))
            elif kind == "MESSAGE_END":
                return
            elif kind == "ERROR":
                raise RuntimeError(f"ERROR {frame['payload']}")


async def join(url: str, token: str, tx: str) -> Peer:
    """A new member of ``tx`` through ``url``; tried again while that node does not know it yet."""
    peer = await open_peer(url, token)
    for _ in range(JOIN_TRIES):
        await peer.send("TRANSACTION_JOIN", {}, tx=tx)
        while True:
            frame = await peer.receive()
            if frame["type"] == "TRANSACTION_JOIN":
                return peer
            if frame["type"] == "ERROR":
                break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"could not join {tx} through {url}: {frame['payload']}")


async def fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """Open and join the members, have the agent stream, read every member's stream; what each got."""
    urls, tokens, count = spec["urls"], spec["tokens"], spec["count"]
    watch: dict[str, list[Any]] = spec.get("watch") or {}
    leader = await open_peer(urls[0], tokens[0])
    tx = await leader.start("stream")
    members = [Member(0, leader)]
    for node, (url, token) in enumerate(zip(urls, tokens, strict=True)):
        wanted = spec["members"][node] - (node == 0)
        for batch in range(0, wanted, 20):
            joined = await asyncio.gather(*(join(url, token, tx) for _ in range(min(20, wanted - batch))))
            members += [Member(node, peer) for peer in joined]
    before = {name: cpu_seconds(pid, children) for name, (pid, children) in watch.items()}
    waited = {name: waited_seconds(pid) for name, (pid, _) in watch.items()}
    started, own = time.perf_counter(), time.process_time()
    await leader.message(tx, f"count={count} rate={spec['rate']} stamp=1 number=1")
    reading = [asyncio.create_task(m.read()) for m in members]
    _, unfinished = await asyncio.wait(reading, timeout=count / spec["rate"] + LINGER)
    elapsed = time.perf_counter() - started
    for task in unfinished:  # counted below as members without every token
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)  # their reads are over before the leader's next
    errors = [
        repr(task.exception())[:300] for task in reading if task.done() and not task.cancelled() and task.exception()
    ]
    cpu = {name: cpu_seconds(pid, children) - before[name] for name, (pid, children) in watch.items()}
    cpu["load"] = time.process_time() - own  # this process: when it is busy, lags are partly its own
    waited = {name: waited_seconds(pid) - waited[name] for name, (pid, _) in watch.items()}
    ended = await run_end(members[0])
    lags = [lag for m in members for lag in m.lags]
    for member in members:
        drop(member.peer)
    by_node = [[lag for m in members if m.node == node for lag in m.lags] for node in range(len(urls))]
    return {
        "members": len(members),
        "complete": sum(1 for m in members if m.tokens == count and m.expected == count and not m.wrong),
        "wrong": sum(m.wrong for m in members),
        "tokens": sum(m.tokens for m in members),
        "p50_ms": percentile(lags, 50) * 1000,
        "p99_ms": percentile(lags, 99) * 1000,
        "max_ms": max(lags, default=float("nan")) * 1000,
        "p99_by_node_ms": [percentile(node_lags, 99) * 1000 for node_lags in by_node],
        "seconds": elapsed,
        "unfinished": len(unfinished),
        "errors": errors[:3],
        "short_by_node": [sum(count - m.tokens for m in members if m.node == node) for node in range(len(urls))],
        "cpu": cpu,
        "waited": waited,
        "run_end": ended,
    }


async def run_end(leader: Member) -> str:
    """How the agent's run ended, as the member who asked saw it (RUN_FINISHED's status, or RUN_ERROR's
    code and message): a stream cut short ends with MESSAGE_END too."""
    try:
        async with asyncio.timeout(10):
            while True:
                frame = orjson.loads(await leader.peer.ws.recv())
                if frame["type"] in ("RUN_FINISHED", "RUN_ERROR"):
                    payload = frame["payload"]
                    detail = payload.get("status") or f"{payload.get('code')}: {payload.get('message')}"
                    return f"{frame['type']} {detail}"
    except TimeoutError:
        return "no RUN_FINISHED or RUN_ERROR within 10 s"


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(uvloop.run(fanout(spec))), flush=True)


if __name__ == "__main__":
    main()
