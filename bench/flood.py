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
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.protocol.envelope import new_id, now_ms  # noqa: E402
from haip_runtime.session import Session  # noqa: E402
from tests.serving import LiveServer, live_server, make_config  # noqa: E402

PROBES = 40
MAX_MESSAGES = 200_000


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


async def run(live: LiveServer, seconds: float) -> dict[str, Any]:
    url, token = live.ws_url, live.token("flood")
    results: dict[str, Any] = {}
    async with connect(url, compression=None, max_queue=4) as flood_ws, connect(url, compression=None) as member_ws:
        flooder, flood_hai = await hello(flood_ws, token)
        await flooder.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await flooder.until(lambda e: e["type"] == "TRANSACTION_START"))["transaction"]
        member, _ = await hello(member_ws, token)
        await member.send("TRANSACTION_JOIN", {}, transaction=tx)
        await member.until(lambda e: e["type"] == "TRANSACTION_JOIN")
        session: Session = live.runtime.hub.sessions.sessions[flood_hai["session"]]
        outbox = session.outbox
        assert outbox is not None
        baseline = [await probe(member, tx, f"calm-{n}") for n in range(PROBES)]
        rss_before = rss_kib()
        peak = {"rss": rss_before, "window": 0, "held": 0, "backlog": 0}
        sent = 0
        started = time.perf_counter()

        async def flood() -> None:
            nonlocal sent
            with anyio.move_on_after(seconds):  # a send waits while the runtime does not read
                try:
                    while sent < MAX_MESSAGES:
                        await flooder.send("MESSAGE", f"flood {sent}", transaction=tx)
                        sent += 1
                except ConnectionClosed:
                    pass

        async def watch() -> None:
            while outbox.close_code is None and time.perf_counter() - started < seconds:
                peak["rss"] = max(peak["rss"], rss_kib())
                peak["window"] = max(peak["window"], session.window.bytes)
                peak["held"] = max(peak["held"], session.flow.held)
                peak["backlog"] = max(peak["backlog"], outbox.backlog)
                await anyio.sleep(0.01)
            results["closed_after"] = time.perf_counter() - started
            results["backlog_at_close"] = outbox.backlog
            results["sent_at_close"] = sent

        during: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            tg.start_soon(watch)
            with anyio.move_on_after(seconds):
                for n in range(PROBES):
                    during.append(await probe(member, tx, f"busy-{n}"))
        with anyio.fail_after(10):
            after_close = await probe(member, tx, "after-close")
        results |= {
            "sent": sent,
            "close_code": outbox.close_code,
            "close_reason": outbox.close_reason,
            "peak": peak,
            "rss_before": rss_before,
            "baseline": baseline,
            "during": during,
            "after_close": after_close,
            "window_limit": session.window.max_bytes,
            "violations": sum(
                1
                for seq in range(session.window.first_seq, session.window.last_seq + 1)
                if "FLOW_CONTROL_VIOLATION" in (session.window.get(seq) or "")
            ),
        }
    async with connect(url, compression=None) as again_ws:
        again = Peer(again_ws)
        again.seq = flooder.seq
        await again_ws.recv()
        # From the last seq it was sent (a client that had read its backlog); the frames it never read may
        # have left the replay window (bounded in bytes), which a resume from an older seq is told.
        body = {"accept_major": [1], "auth": {"token": token}, "last_rx_seq": str(session.last_seq)}
        await again.send("HAI", body, session=flood_hai["session"])
        ready = await again.until(lambda e: e["type"] == "INFO" and e["payload"].get("event") == "session.ready")
        results["resumed"] = ready["payload"]["resumed"]
    return results


def report(results: dict[str, Any], seconds: float) -> str:
    p50 = statistics.median
    baseline, during = results["baseline"], results["during"]
    peak = results["peak"]
    mib = 1024 * 1024
    lines = [
        "# A client that stops reading while it keeps sending",
        "",
        f"Written by `bench/flood.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {platform.machine()}, shared 2-core machine; "
        f"flood for at most {seconds:.0f} s. Server, flooder and member share one process (RSS covers all three).",
        "",
        "One runtime on a real uvicorn (echo agent, default limits). The flooder sends MESSAGEs to its",
        "transaction as fast as its socket takes them and never reads. Another session of the same user, a member",
        "of the same transaction, reads everything and times a probe (MESSAGE to the agent's reply) before the",
        "flood and during it.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| flooder closed with | {results['close_code']} ({results['close_reason']}) |",
        f"| closed after | {results['closed_after']:.2f} s, {results['sent_at_close']} messages sent by then "
        f"({results['sent']} before its socket refused more) |",
        f"| frames it was behind at its close | {results['backlog_at_close']} "
        "(bound: session.max_buffered_messages = 1000) |",
        f"| FLOW_CONTROL_VIOLATIONs it was sent | {results['violations']} |",
        f"| its replay window, peak | {peak['window'] / mib:.2f} MiB (bound {results['window_limit'] / mib:.0f} MiB) |",
        f"| its held events, peak | {peak['held']} |",
        f"| process RSS before the flood / peak during | {results['rss_before'] / 1024:.0f} / "
        f"{peak['rss'] / 1024:.0f} MiB |",
        f"| member probe p50 before / during the flood | {p50(baseline) * 1000:.2f} / "
        f"{(p50(during) * 1000 if during else float('nan')):.2f} ms ({len(during)} probes during) |",
        f"| ratio during / before (p50) | {(p50(during) / p50(baseline) if during else float('nan')):.1f}x |",
        f"| member probe after the flooder was closed | {results['after_close'] * 1000:.2f} ms |",
        f"| flooder's session resumed afterwards | {results['resumed']} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    with live_server(make_config()) as live:
        results = anyio.run(run, live, args.seconds)
    text = report(results, args.seconds)
    (ROOT / "bench" / "FLOOD.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
