"""Memory through rounds of idle connections, with tracemalloc: what stays, and whether it grows.
Results go to bench/MEMORY-IDLE.md.

    .venv/bin/python bench/idle_memory.py [--connections 2000] [--rounds 4]

The runtime runs in this process (uvicorn in a thread, as tests/support/serving.py does) with
tracemalloc on; each round a separate client process opens ``--connections`` WebSocket connections,
says HAI on each, waits for every INFO, then closes them all. Once every session has expired (the
runtime's /health says 0 sessions), the round's RSS, traced memory and a snapshot are taken. The
snapshots of the first and last rounds are compared by allocation site: what grew, by how much.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def client(port: int, tokens_file: str) -> None:
    """The load: one process, every token a connection that says HAI, waits for INFO, then closes."""
    import anyio
    from websockets.asyncio.client import connect

    tokens = Path(tokens_file).read_text().split()
    opened = anyio.Event()
    ready = [0]

    async def one(token: str, limiter: anyio.Semaphore) -> None:
        async with limiter:
            ws = await connect(f"ws://127.0.0.1:{port}/haip/websocket", compression=None, open_timeout=60)
        hai = {"haip_version": "1.1.2", "accept_major": [1], "auth": {"token": f"Bearer {token}"}}
        envelope = {"id": "h", "session": "", "seq": "1", "ts": "1", "channel": "SYSTEM", "type": "HAI", "payload": hai}
        await ws.send(json.dumps(envelope))
        while json.loads(await ws.recv())["type"] != "INFO":
            pass
        ready[0] += 1
        if ready[0] == len(tokens):
            opened.set()
        await opened.wait()
        await ws.close()

    async def run() -> None:
        limiter = anyio.Semaphore(100)
        async with anyio.create_task_group() as tg:
            for token in tokens:
                tg.start_soon(one, token, limiter)

    anyio.run(run)


def main(args: argparse.Namespace) -> dict[str, object]:
    import anyio
    import uvicorn

    from haip_runtime.config import validate_config
    from haip_runtime.server import allocator
    from haip_runtime.server.app import Runtime, create_app

    tracemalloc.start(12)
    config = validate_config(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "session": {"resume_timeout_seconds": 1},
            "limits": {"sessions_per_user": 100_000},
            "agents": {"echo": {"plugin": "echo"}},
        },
        base_dir=ROOT,
    )
    runtime = Runtime(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, runtime), log_config=None, ws_per_message_deflate=False))
    runtime.reaper.attach(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)  # noqa: TID251 - no event loop in this thread: the server runs in its own
    results: dict[str, object] = {"connections": args.connections, "rounds": args.rounds}
    rounds: list[dict[str, float]] = []
    snapshots: list[Path] = []
    with tempfile.TemporaryDirectory() as folder:
        tokens = Path(folder) / "tokens"
        tokens.write_text("\n".join(runtime.authenticator.issue(f"idle-{n}") for n in range(args.connections)))
        for _ in range(args.rounds):
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--client", str(port), str(tokens)], check=True)
            while len(runtime.hub.sessions) or server.server_state.connections:  # sessions, and sockets
                time.sleep(0.2)  # noqa: TID251 - this thread has no event loop; the sessions expire in the server's
            gc.collect()
            allocator.release()
            traced = tracemalloc.get_traced_memory()[0] / 1024 / 1024
            seconds = round(time.perf_counter() - started, 1)
            rounds.append({"rss_mb": round(rss_mb(), 1), "traced_mb": round(traced, 2), "seconds": seconds})
            dumped = Path(folder) / f"round-{len(rounds)}.snapshot"
            tracemalloc.take_snapshot().dump(str(dumped))  # on disk: held in memory it would be measured
            snapshots.append(dumped)
            gc.collect()
            print(rounds[-1], flush=True)
        server.should_exit = True
        thread.join(timeout=20)
        tracemalloc.stop()
        keep = [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        ]
        second, last = (
            tracemalloc.Snapshot.load(str(path)).filter_traces(keep) for path in (snapshots[1], snapshots[-1])
        )
    growth = last.compare_to(second, "traceback")
    results["rounds_measured"] = rounds
    results["grew_kb_from_round_2_to_last"] = round(sum(stat.size_diff for stat in growth) / 1024, 1)
    results["top_growth"] = [
        {"kb": round(stat.size_diff / 1024, 1), "count": stat.count_diff, "at": [str(f) for f in stat.traceback[-4:]]}
        for stat in growth[:8]
    ]
    results["python"] = platform.python_version()
    del anyio
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    print(json.dumps(main(parser.parse_args()), indent=2))
