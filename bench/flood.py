"""A client that stops reading while it keeps sending, beside a member and an agent that carry on.

    .venv/bin/python bench/flood.py [--seconds S]

One runtime (echo agent, default limits: the flood beyond 100 messages/s is answered
RATE_LIMITED, to the flooder only) on a real uvicorn. The flooder joins a transaction, then sends
MESSAGEs as fast as its socket takes them and never reads (its WebSocket library stops reading
once 4 frames wait). Another session of the same user, a member of the same transaction, reads
everything and times a probe message to the agent (MESSAGE to the agent's reply) before the
flood (baseline) and during it, side by side in the same run. Measured: when and how the flooder
is closed (code, frames it was behind), its session's memory in the runtime (replay window, held
events) and the process's resident memory, the member's probe latency ratio, and whether the
flooder's session resumes afterwards. Results go to bench/FLOOD.md. Only 127.0.0.1 is
contacted, in bounded loops.
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
from typing import Any

import anyio
import anyio.to_thread
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.protocol.envelope import new_id, now_ms  # noqa: E402
from haip_runtime.session.session import Session  # noqa: E402
from tests.support.serving import LiveServer, live_server, make_config  # noqa: E402

PROBES = 40
#: Bounds the flood (at about 60,000 a second it takes the whole of --seconds).
MAX_MESSAGES = 2_000_000


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Peer:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seq = 0

    async def send(self, type: str, payload: Any, transaction: str | None = None, **extra: Any) -> None:
        self.seq += 1
        envelope = {"id": new_id(), "session": "", "transaction": transaction, "seq": str(self.seq), "ts": now_ms()}
        envelope |= {"channel": "USER" if type == "MESSAGE" else "SYSTEM", "type": type, "payload": payload, **extra}
        await self.ws.send(json.dumps(envelope))

    async def until(self, wanted: Any) -> dict[str, Any]:
        while True:
            envelope: dict[str, Any] = json.loads(await self.ws.recv())
            if wanted(envelope):
                return envelope


async def hello(ws: ClientConnection, token: str, **hai: Any) -> tuple[Peer, dict[str, Any]]:
    peer = Peer(ws)
    server_hai = json.loads(await ws.recv())
    await peer.send("HAI", {"accept_major": [1], "auth": {"token": token}, **hai}, session=hai.pop("session", ""))
    await peer.until(lambda e: e["type"] == "INFO")
    return peer, server_hai


async def probe(member: Peer, tx: str, label: str) -> float:
    started = time.perf_counter()
    await member.send("MESSAGE", label, transaction=tx)
    await member.until(lambda e: e["type"] == "MESSAGE" and e["payload"] == f"you said: {label}")
    return time.perf_counter() - started


async def flood(url: str, token: str, seconds: float) -> None:
    """The flooder, in a process of its own: set up, wait for "go", send without reading, report."""
    async with connect(url, compression=None, max_queue=4, close_timeout=1) as ws:
        flooder, server_hai = await hello(ws, token)
        await flooder.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await flooder.until(lambda e: e["type"] == "TRANSACTION_START"))["transaction"]
        print(json.dumps({"session": server_hai["session"], "tx": tx}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        sent, began = 0, time.perf_counter()
        with anyio.move_on_after(seconds):  # a send waits while the runtime does not read
            try:
                while sent < MAX_MESSAGES:
                    await flooder.send("MESSAGE", f"flood {sent}", transaction=tx)
                    sent += 1
            except ConnectionClosed:
                pass
        print(json.dumps({"sent": sent, "seq": flooder.seq, "cut_after": time.perf_counter() - began}), flush=True)


async def run(live: LiveServer, process: subprocess.Popen[str], token: str, seconds: float) -> dict[str, Any]:
    url = live.ws_url
    results: dict[str, Any] = {}
    assert process.stdin is not None and process.stdout is not None
    with anyio.fail_after(30):
        ready = json.loads(await anyio.to_thread.run_sync(process.stdout.readline))
    session: Session = live.runtime.hub.sessions.sessions[ready["session"]]
    outbox = session.outbox
    assert outbox is not None
    async with connect(url, compression=None) as member_ws, connect(url, compression=None) as other_ws:
        member, _ = await hello(member_ws, token)
        await member.send("TRANSACTION_JOIN", {}, transaction=ready["tx"])
        await member.until(lambda e: e["type"] == "TRANSACTION_JOIN")
        other, _ = await hello(other_ws, live.token("bystander"))
        await other.send("TRANSACTION_START", {"toolName": "echo"}, transaction="own")
        other_tx = (await other.until(lambda e: e["type"] == "TRANSACTION_START"))["transaction"]

        async def probes(label: str, count: int) -> tuple[list[float], list[float]]:
            """Alternately: the member in the flooder's transaction, the bystander in its own."""
            mine: list[float] = []
            theirs: list[float] = []
            for n in range(count):
                mine.append(await probe(member, ready["tx"], f"{label}-{n}"))
                theirs.append(await probe(other, other_tx, f"{label}-{n}"))
            return mine, theirs

        baseline, other_baseline = await probes("calm", PROBES)
        rss_before = rss_kib()
        peak = {"rss": rss_before, "window": 0, "held": 0}
        process.stdin.write("go\n")
        process.stdin.flush()
        started = time.perf_counter()

        async def watch() -> None:
            while outbox.close_code is None and time.perf_counter() - started < seconds:
                peak["rss"] = max(peak["rss"], rss_kib())
                peak["window"] = max(peak["window"], session.window.bytes)
                peak["held"] = max(peak["held"], session.flow.held)
                await anyio.sleep(0.01)
            results["closed_after"] = time.perf_counter() - started
            results["backlog_at_close"] = outbox.backlog
            results["window_at_close"] = session.window.bytes

        during: list[float] = []
        other_during: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with anyio.move_on_after(seconds):
                for n in range(PROBES):
                    during.append(await probe(member, ready["tx"], f"busy-{n}"))
                    other_during.append(await probe(other, other_tx, f"busy-{n}"))
        with anyio.fail_after(seconds + 30):
            done = json.loads(await anyio.to_thread.run_sync(process.stdout.readline))
        after, other_after = await probes("after", PROBES)
    results |= {
        "sent": done["sent"],
        "cut_after": done["cut_after"],
        "close_code": outbox.close_code,
        "close_reason": outbox.close_reason,
        "peak": peak,
        "rss_before": rss_before,
        "baseline": baseline,
        "during": during,
        "after": after,
        "other": (other_baseline, other_during, other_after),
        "window_limit": session.window.max_bytes,
        "violations": sum(
            1
            for seq in range(session.window.first_seq, session.window.last_seq + 1)
            if "FLOW_CONTROL_VIOLATION" in (session.window.get(seq) or "")
        ),
    }
    async with connect(url, compression=None) as again_ws:
        again = Peer(again_ws)
        again.seq = done["seq"]
        await again_ws.recv()
        # From the last seq it was sent (a client that had read its backlog); the frames it never read may
        # have left the replay window (bounded in bytes), which a resume from an older seq is told.
        body = {"accept_major": [1], "auth": {"token": token}, "last_rx_seq": str(session.last_seq)}
        await again.send("HAI", body, session=ready["session"])
        resumed = await again.until(lambda e: e["type"] == "INFO" and e["payload"].get("event") == "session.ready")
        results["resumed"] = resumed["payload"]["resumed"]
    return results


def report(results: dict[str, Any], seconds: float) -> str:
    baseline, during = results["baseline"], results["during"]
    peak = results["peak"]
    mib = 1024 * 1024
    lines = [
        "# A client that stops reading while it keeps sending",
        "",
        f"Written by `bench/flood.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine; "
        f"flood for at most {seconds:.0f} s. The flooder runs in a process of its own; server and member share one "
        "(its RSS is shown).",
        "",
        "One runtime on a real uvicorn (echo agent, default limits). The flooder sends MESSAGEs to its",
        "transaction as fast as its socket takes them and never reads. Another session of the same user, a member",
        "of the same transaction, and another user in a transaction of their own read everything and time a",
        "probe (MESSAGE to the agent's reply) before the flood, during it and after the flooder was closed.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| flooder closed with | {results['close_code']} ({results['close_reason']}) |",
        f"| closed after | {results['closed_after']:.2f} s |",
        f"| its socket cut after | {results['cut_after']:.2f} s ({results['sent']} messages sent until then: uvicorn"
        " reads a WebSocket it closed until the close reply, and the runtime aborts one with none within"
        " 2 s, server/sockets.py; uvicorn alone would read for 10 s) |",
        f"| frames it was behind at its close | {results['backlog_at_close']} "
        "(bound: session.max_buffered_messages = 1000) |",
        f"| FLOW_CONTROL_VIOLATIONs it was sent | {results['violations']} |",
        f"| its replay window, peak / at its close | {peak['window'] / mib:.2f} / "
        f"{results['window_at_close'] / mib:.2f} MiB (bound {results['window_limit'] / mib:.0f} MiB) |",
        f"| its held events, peak | {peak['held']} |",
        f"| process RSS before the flood / peak during | {results['rss_before'] / 1024:.0f} / "
        f"{peak['rss'] / 1024:.0f} MiB |",
        probe_row("member in the flooder's transaction", baseline, during, results["after"]),
        probe_row("bystander in a transaction of its own", *results["other"]),
        f"| flooder's session resumed afterwards | {results['resumed']} |",
        "",
        "Until its 1013, the runtime reads, refuses (RATE_LIMITED, then FLOW_CONTROL_VIOLATION once its credit",
        "is gone: its FLOW_UPDATEs are never read) and answers every envelope of the flood; on two shared cores",
        "that work, and the flooder's own, is what slows the other clients meanwhile. Nothing waits on the",
        "flooder: the agent answers everyone throughout (the columns are medians; the machine is shared).",
        "",
    ]
    return "\n".join(lines)


def probe_row(who: str, before: list[float], during: list[float], after: list[float]) -> str:
    """p50 of the probes before, during and after the flood, and during / before."""
    p50 = statistics.median
    busy = p50(during) if during else float("nan")
    return (
        f"| {who}: probe p50 before / during / after (ratio during / before) | {p50(before) * 1000:.2f} / "
        f"{busy * 1000:.2f} / {p50(after) * 1000:.2f} ms ({busy / p50(before):.1f}x; {len(during)} probes during) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--flood", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        anyio.run(flood, args.flood[0], args.flood[1], args.seconds)
        return
    with live_server(make_config()) as live:
        token = live.token("flood")
        command = [sys.executable, __file__, "--flood", live.ws_url, token, "--seconds", str(args.seconds)]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            results = anyio.run(run, live, process, token, args.seconds)
        finally:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.close()
            process.wait(timeout=30)
            process.stdout.close()
    text = report(results, args.seconds)
    (ROOT / "bench" / "FLOOD.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
