"""A load generator process: `python bench/load.py '<json spec>'` prints one JSON line of results.

Run by bench/suite.py, pinned to the core the server does not use. It speaks raw HAIP over the
`websockets` client (compression off), on uvloop with orjson (a third less CPU per echo round trip
than asyncio's loop and the json module), so the client's own cost stays small and equal on both sides:
against haip-runtime (``token`` set) it authenticates and talks to an agent; against the bare app
(``token`` null) it uses bench/baseline.py's /echo, /push and /idle. Modes: echo, stream,
first_token, idle (holds its connections until stdin closes), fanout, resume, stall, soak.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from common import cpu_seconds, percentile, raise_fd_limit  # type: ignore[import-not-found]
from websockets.asyncio.client import ClientConnection, connect

# The reference TypeScript SDK's accept_events (REFERENCE-CLIENTS.md): no runs, no streamed parts.
REFERENCE_EVENTS = [
    "HAI", "PING", "PONG", "ERROR", "FLOW_UPDATE", "TRANSACTION_START", "TRANSACTION_END", "TRANSACTION_JOIN",
    "REPLAY_REQUEST", "MESSAGE_UPDATE", "MESSAGE", "AUDIO", "INFO", "TOOL_LIST", "TOOL_SCHEMA",
]  # fmt: skip
NATIVE_EVENTS = REFERENCE_EVENTS + [
    "MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "RUN_STARTED", "RUN_FINISHED", "RUN_ERROR", "RUN_CANCEL",
    "TOOL_CALL", "TOOL_UPDATE", "TOOL_DONE", "TOOL_CANCEL",
]  # fmt: skip
IDS = itertools.count()
PID = os.getpid()


class Peer:
    """One raw HAIP connection: numbered envelopes out, the last numeric seq received remembered."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seq = 0
        self.session = ""
        self.last_seq = 0
        self.ready = False

    async def send(self, type: str, payload: Any, tx: str | None = None, channel: str = "SYSTEM", **extra: Any) -> None:
        self.seq += 1
        envelope = {
            "id": f"{PID}-{next(IDS)}",
            "session": self.session,
            "transaction": tx,
            "seq": str(self.seq),
            "ts": str(int(time.time() * 1000)),
            "channel": channel,
            "type": type,
            "payload": payload,
            **extra,
        }
        await self.ws.send(orjson.dumps(envelope).decode())

    async def receive(self) -> dict[str, Any]:
        frame: dict[str, Any] = orjson.loads(await self.ws.recv())
        seq = frame.get("seq")
        if isinstance(seq, str) and seq.isdigit():
            self.last_seq = int(seq)
        return frame

    async def until(self, *types: str) -> dict[str, Any]:
        while True:
            frame = await self.receive()
            if frame["type"] in types:
                return frame
            if frame["type"] == "ERROR":
                raise RuntimeError(f"ERROR {frame['payload']}")

    async def hai(self, token: str, events: list[str], **payload: Any) -> dict[str, Any]:
        body = {
            "haip_version": "1.1.2",
            "accept_major": [1],
            "accept_events": events,
            "auth": {"token": f"Bearer {token}"},
        }
        await self.send("HAI", {**body, **payload})
        while True:
            frame = await self.receive()
            if frame["type"] == "INFO" and frame["payload"].get("event") == "session.ready":
                return frame
            if frame["type"] == "ERROR" and frame["payload"].get("code") != "RESUME_FAILED":
                raise RuntimeError(f"handshake refused: {frame['payload']}")

    async def start(self, agent: str) -> str:
        await self.send("TRANSACTION_START", {"toolName": agent, "params": {}}, tx=f"ref-{next(IDS)}")
        frame = await self.until("TRANSACTION_START")
        return str(frame["transaction"])

    async def message(self, tx: str, text: str) -> None:
        await self.send("MESSAGE", text, tx=tx, channel="USER")


async def open_peer(url: str, token: str, events: list[str] = NATIVE_EVENTS, **kwargs: Any) -> Peer:
    ws = await connect(url, compression=None, open_timeout=60, ping_interval=None, max_size=None, **kwargs)
    peer = Peer(ws)
    first = await peer.receive()  # the server's HAI names the session
    peer.session = str(first.get("session", ""))
    await peer.hai(token, events)
    return peer


async def reconnect(url: str, token: str, old: Peer) -> Peer:
    """A new connection sending the resuming HAI for ``old``'s session (its replay is left to read)."""
    back = Peer(await connect(url, compression=None, ping_interval=None, max_size=None))
    await back.receive()  # the new connection's server HAI
    back.session = old.session
    body = {"haip_version": "1.1.2", "accept_major": [1], "accept_events": NATIVE_EVENTS}
    await back.send("HAI", {**body, "auth": {"token": f"Bearer {token}"}, "last_rx_seq": str(old.last_seq)})
    return back


def drop(peer: Peer) -> None:
    """Cut the connection without a closing handshake, as a lost network would."""
    peer.ws.transport.abort()


# -- 1, 2: echo ------------------------------------------------------------------------------------------


async def echo(spec: dict[str, Any]) -> dict[str, Any]:
    """``conns`` connections × ``inflight`` messages in flight for ``seconds`` after ``warmup``.

    ``watch`` ({name: [pid, with children]}, optional): the CPU seconds those processes spend over the
    same timed window are returned too (bench/cluster.py: the server's, Redis's, PostgreSQL's)."""
    token, conns, inflight = spec["token"], spec["conns"], spec["inflight"]
    peers = await asyncio.gather(*(_echo_peer(spec) for _ in range(conns)))
    counted: list[int] = [0]
    latencies: list[float] = []
    start = time.perf_counter()
    warm, stop = start + spec["warmup"], start + spec["warmup"] + spec["seconds"]
    watch: dict[str, list[Any]] = spec.get("watch") or {}
    cpu: dict[str, float] = {}

    async def sample() -> None:
        await asyncio.sleep(warm - time.perf_counter())
        before = {name: cpu_seconds(pid, children) for name, (pid, children) in watch.items()}
        await asyncio.sleep(stop - time.perf_counter())
        cpu.update({name: cpu_seconds(pid, children) - before[name] for name, (pid, children) in watch.items()})

    async def run(peer: Peer, tx: str | None) -> None:
        sent: deque[float] = deque()
        for _ in range(inflight):
            sent.append(time.perf_counter())
            await peer.message(tx, "hello") if token else await peer.send("MESSAGE", "hello", channel="USER")
        while True:
            frame = orjson.loads(await peer.ws.recv())
            if frame["type"] != "MESSAGE":
                continue
            now = time.perf_counter()
            began = sent.popleft()
            if now >= warm:
                counted[0] += 1
                latencies.append(now - began)
            if now >= stop:
                return
            sent.append(time.perf_counter())
            await peer.message(tx, "hello") if token else await peer.send("MESSAGE", "hello", channel="USER")

    await asyncio.gather(sample(), *(run(peer, tx) for peer, tx in peers))
    for peer, _ in peers:
        drop(peer)
    return {
        "trips": counted[0],
        "cpu": cpu,
        "rate": counted[0] / spec["seconds"],
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


async def _echo_peer(spec: dict[str, Any]) -> tuple[Peer, str | None]:
    if spec["token"] is None:
        ws = await connect(spec["url"], compression=None, ping_interval=None)
        return Peer(ws), None
    peer = await open_peer(spec["url"], spec["token"], REFERENCE_EVENTS)
    return peer, await peer.start("echo")


# -- 3, 4: streaming -------------------------------------------------------------------------------------


async def stream(spec: dict[str, Any]) -> dict[str, Any]:
    """``clients`` clients each asking for ``count`` tokens at once, all together: frames/s and tokens/s.

    ``size``: characters per token (4). ``read_delay``: seconds the client process is busy after each
    frame it reads (0), and ``rcvbuf``: its socket's receive buffer in bytes (the system's default): a
    client slower than the server, whose socket fills, so the server is under pressure.
    """
    token, count, size, delay = spec["token"], spec["count"], spec.get("size", 4), spec.get("read_delay", 0)
    frames, chars = [0], [0]

    def options() -> dict[str, Any]:
        if not spec.get("rcvbuf"):
            return {}
        host, _, port = spec["url"].split("/")[2].partition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec["rcvbuf"])  # before connecting: the window
        sock.connect((host, int(port)))
        sock.setblocking(False)
        return {"sock": sock}

    async def prepare() -> tuple[Peer, str | None]:
        if token is None:
            ws = await connect(spec["url"], compression=None, ping_interval=None, max_size=None, **options())
            return Peer(ws), None
        peer = await open_peer(spec["url"], token, **options())
        return peer, await peer.start("stream")

    async def run(peer: Peer, tx: str | None) -> None:
        if tx is None:
            await peer.ws.send(f"{count} {size}")
        else:
            await peer.message(tx, f"count={count} size={size}")
        while True:
            frame = orjson.loads(await peer.ws.recv())
            kind = frame["type"]
            if kind == "MESSAGE_PART":
                frames[0] += 1
                chars[0] += len(frame["payload"]["text"])
            elif kind in ("MESSAGE_END", "END"):
                return
            if delay:
                time.sleep(delay)  # noqa: ASYNC251 - the client process is busy with what it read (a slow device)

    peers = await asyncio.gather(*(prepare() for _ in range(spec["clients"])))
    start = time.perf_counter()
    await asyncio.gather(*(run(peer, tx) for peer, tx in peers))
    elapsed = time.perf_counter() - start
    for peer, _ in peers:
        drop(peer)
    return {"frames_per_s": frames[0] / elapsed, "tokens_per_s": chars[0] / size / elapsed, "frames": frames[0]}


async def first_token(spec: dict[str, Any]) -> dict[str, Any]:
    """One client, ``count`` turns of a one-token answer: MESSAGE sent → first MESSAGE_PART."""
    peer = await open_peer(spec["url"], spec["token"])
    tx = await peer.start("stream")
    latencies = []
    for _ in range(spec["count"]):
        began = time.perf_counter()
        await peer.message(tx, "count=1")
        await peer.until("MESSAGE_PART")
        latencies.append(time.perf_counter() - began)
        await peer.until("RUN_FINISHED")
    drop(peer)
    return {"p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


# -- 6: idle connections ---------------------------------------------------------------------------------


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``conns`` authenticated idle connections, report, hold them until stdin closes."""
    raise_fd_limit(spec["conns"] + 256)
    held: list[ClientConnection] = []
    failed = [0]
    errors: list[str] = []

    async def one() -> None:
        try:
            if spec["token"] is None:
                ws = await connect(spec["url"], compression=None, ping_interval=None, open_timeout=60)
                await ws.send("hello")
                await ws.recv()
                held.append(ws)
            else:
                held.append((await open_peer(spec["url"], spec["token"], REFERENCE_EVENTS)).ws)
        except Exception as exc:  # counted and reported: a refused connection is a result here
            failed[0] += 1
            errors.append(repr(exc)[:200])

    start = time.perf_counter()
    for batch in range(0, spec["conns"], 100):
        await asyncio.gather(*(one() for _ in range(min(100, spec["conns"] - batch))))
    print(json.dumps({"opened": len(held), "failed": failed[0], "seconds": time.perf_counter() - start,
                      "errors": errors[:3]}), flush=True)  # fmt: skip
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    os._exit(0)  # thousands of closing handshakes would only measure teardown


# -- 7, 9: delivery lag ----------------------------------------------------------------------------------


async def read_stamps(peer: Peer, lags: list[float]) -> int:
    """Read one stamped stream to its MESSAGE_END; each token's lag (now - its stamp); token count."""
    tokens = 0
    while True:
        frame = orjson.loads(await peer.ws.recv())
        kind = frame["type"]
        if kind == "MESSAGE_PART":
            now = time.time()
            stamps = frame["payload"]["text"].split()
            tokens += len(stamps)
            lags.extend(now - float(stamp) for stamp in stamps)
        elif kind == "MESSAGE_END":
            return tokens


async def fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """One transaction with ``members`` members; the agent streams ``count`` stamped tokens at ``rate``."""
    url, token, count = spec["url"], spec["token"], spec["count"]
    leader = await open_peer(url, token)
    tx = await leader.start("stream")

    async def join() -> Peer:
        peer = await open_peer(url, token)
        await peer.send("TRANSACTION_JOIN", {}, tx=tx)
        await peer.until("TRANSACTION_JOIN")
        return peer

    members = [leader]
    for batch in range(0, spec["members"] - 1, 20):
        members += await asyncio.gather(*(join() for _ in range(min(20, spec["members"] - 1 - batch))))
    lags: list[float] = []
    await leader.message(tx, f"count={count} rate={spec['rate']} stamp=1")
    got = await asyncio.wait_for(asyncio.gather(*(read_stamps(m, lags) for m in members)), timeout=300)
    for member in members:
        drop(member)
    return {
        "members": len(members),
        "complete": sum(1 for tokens in got if tokens == count),
        "p50_ms": percentile(lags, 50) * 1000,
        "p99_ms": percentile(lags, 99) * 1000,
        "max_ms": max(lags) * 1000,
    }


async def stall(spec: dict[str, Any]) -> dict[str, Any]:
    """``clients`` readers of stamped streams; with ``stalled``, one more client that never reads."""
    url, token = spec["url"], spec["token"]

    async def prepare(**kwargs: Any) -> tuple[Peer, str]:
        peer = await open_peer(url, token, **kwargs)
        return peer, await peer.start("stream")

    readers = await asyncio.gather(*(prepare() for _ in range(spec["clients"])))
    stalled = await prepare(max_queue=1) if spec["stalled"] else None
    lags: list[float] = []
    if stalled is not None:
        await stalled[0].message(stalled[1], "count=20000 size=200")
    for peer, tx in readers:
        await peer.message(tx, f"count={spec['count']} rate={spec['rate']} stamp=1")
    await asyncio.wait_for(asyncio.gather(*(read_stamps(peer, lags) for peer, _ in readers)), timeout=300)
    for peer, _ in [*readers, *([stalled] if stalled else [])]:
        drop(peer)
    return {"p50_ms": percentile(lags, 50) * 1000, "p99_ms": percentile(lags, 99) * 1000}


# -- 8: resume -------------------------------------------------------------------------------------------


async def resume(spec: dict[str, Any]) -> dict[str, Any]:
    """Drop a connection, let the agent stream ``count`` parts meanwhile, resume: handshake and catch-up.

    The handshake is timed to the first replayed frame (the runtime sends the replay, then
    INFO session.ready); the catch-up rate to the end of the replay."""
    url, token, count = spec["url"], spec["token"], spec["count"]
    handshakes, rates, missed = [], [], []
    for _ in range(spec["rounds"]):
        away = await open_peer(url, token)
        tx = await away.start("stream")
        watcher = await open_peer(url, token)
        await watcher.send("TRANSACTION_JOIN", {}, tx=tx)
        await watcher.until("TRANSACTION_JOIN")
        await away.message(tx, f"count={count}")
        drop(away)
        await watcher.until("MESSAGE_END")  # everything the dropped client missed is produced
        drop(watcher)
        began = time.perf_counter()
        back = await reconnect(url, token, away)
        first, parts, ended = None, 0, False
        while not ended or not back.ready:  # the replay comes first, then INFO session.ready
            frame = await back.receive()
            first = first or time.perf_counter()
            parts += frame["type"] == "MESSAGE_PART"
            ended = ended or frame["type"] == "MESSAGE_END"
            back.ready = back.ready or (frame["type"] == "INFO" and frame["payload"].get("event") == "session.ready")
            if frame["type"] == "ERROR":
                raise RuntimeError(f"not resumed: {frame['payload']}")
        handshakes.append(first - began)
        rates.append(count / (time.perf_counter() - began))
        missed.append(parts)
        drop(back)
    return {
        "handshake_p50_ms": percentile(handshakes, 50) * 1000,
        "handshake_p99_ms": percentile(handshakes, 99) * 1000,
        "tokens_per_s": percentile(rates, 50),
        "parts_replayed": percentile([float(m) for m in missed], 50),
    }


# -- 10: soak --------------------------------------------------------------------------------------------


async def soak(spec: dict[str, Any]) -> dict[str, Any]:
    """Churn, streams, resumes and tool calls together for ``seconds``; how many of each completed."""
    url, token = spec["url"], spec["token"]
    deadline = time.monotonic() + spec["seconds"]
    done = {"churn": 0, "stream": 0, "resume": 0, "tool": 0}
    errors: list[str] = []

    async def churn() -> None:
        peer = await open_peer(url, token)
        tx = await peer.start("echo")
        await peer.message(tx, "hello")
        await peer.until("RUN_FINISHED")
        await peer.send("TRANSACTION_END", {}, tx=tx)
        await peer.until("TRANSACTION_END")
        await peer.ws.close()

    async def streams() -> None:
        peer = await open_peer(url, token)
        tx = await peer.start("stream")
        for _ in range(10):
            await peer.message(tx, "count=200 rate=2000")
            await peer.until("RUN_FINISHED")
        await peer.ws.close()

    async def resumes() -> None:
        peer = await open_peer(url, token)
        tx = await peer.start("stream")
        await peer.message(tx, "count=300 rate=1000")
        for _ in range(10):
            await peer.until("MESSAGE_PART")
        drop(peer)
        back = await reconnect(url, token, peer)
        await back.until("RUN_FINISHED")  # replayed or live
        await back.ws.close()

    async def tools() -> None:
        peer = await open_peer(url, token)
        tx = await peer.start("operator")
        while "stdio.add" not in {t["name"] for t in (await peer.until("TOOL_LIST"))["payload"]["tools"]}:
            pass
        for index in range(20):
            body = {"call_id": f"c{index}", "tool": "stdio.add", "params": {"a": 1, "b": 2}}
            await peer.send("TOOL_CALL", body, tx=tx)
            while (await peer.until("TOOL_DONE"))["payload"].get("call_id") != f"c{index}":
                pass
        await peer.ws.close()

    async def worker(name: str, cycle: Callable[[], Awaitable[None]]) -> None:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(cycle(), timeout=60)
                done[name] += 1
            except Exception as exc:  # counted and reported: the soak goes on
                errors.append(f"{name}: {exc!r}"[:200])
                await asyncio.sleep(0.5)

    plan = [("churn", churn)] * 3 + [("stream", streams)] * 2 + [("resume", resumes)]
    plan += [("tool", tools)] if spec.get("tools") else []
    await asyncio.gather(*(worker(name, cycle) for name, cycle in plan))
    return {"done": done, "errors": len(errors), "first_errors": errors[:5]}


MODES = {
    "echo": echo,
    "stream": stream,
    "first_token": first_token,
    "idle": idle,
    "fanout": fanout,
    "stall": stall,
    "resume": resume,
    "soak": soak,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = uvloop.run(MODES[spec["mode"]](spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
