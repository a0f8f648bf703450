"""Every target of issue 11, each against its baseline run alternately with it; writes BENCHMARKS.md.

    .venv/bin/python bench/suite.py            # the full run (about 20 minutes, a 10-minute soak)
    .venv/bin/python bench/suite.py --short    # about two minutes, the same code with smaller numbers,
                                               # written to bench/BENCHMARKS-short.md (scripts/bench-short)

Servers are subprocesses pinned to one core (`haip-runtime serve` on a generated config, or the bare
Starlette app of bench/baseline.py), load generators are bench/load.py processes pinned to the other.
Rounds alternate A, B, A, B and a ratio is the median of the per-round ratios. The short mode is for CI
to prove the suite runs; its absolute numbers are no pass/fail gate (scripts/check does not run it).
Last, it runs bench/store.py (issue 20: the PostgreSQL store against SQLite), bench/cluster.py (issue 21:
``[cluster]`` against one process) and bench/workers.py (issue 21: ``serve --workers 2`` against one
process), each ``--short`` with the suite's, and copies their tables into the report.
"""

from __future__ import annotations

import argparse
import compileall
import logging
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (  # type: ignore[import-not-found]
    BASELINE_APP,
    BENCH,
    PYTHON,
    ROOT,
    Rounds,
    Server,
    baseline_server,
    bench_config,
    cores,
    haip_server,
    held_load,
    load,
    machine,
    pin,
    raise_fd_limit,
    time_until_ready,
)


@dataclass(frozen=True)
class Scale:
    rounds: int
    echo_seconds: float
    latency_seconds: float
    stream_tokens: int
    first_tokens: int
    tool_calls: int
    idle_conns: int
    idle_sessions: int
    fanout_tokens: int
    resumes: int
    stall_tokens: int
    soak_seconds: float
    profile_seconds: float
    pressure_tokens: int


FULL = Scale(4, 10, 6, 2000, 300, 300, 5000, 10000, 2000, 20, 100, 600, 10, 3000)
SHORT = Scale(3, 1.5, 1, 200, 40, 30, 200, 500, 300, 5, 30, 15, 0, 200)
#: Target 3 under pressure: clients slower than the server (busy 0.5 ms after each frame, a 4 KB socket
#: receive buffer), 1000-character tokens so the server's socket buffers fill.
PRESSURE = {"size": 1000, "read_delay": 0.0005, "rcvbuf": 4096}

SERVER, LOAD = cores()


@dataclass
class Row:
    number: int
    what: str
    ours: str
    base: str
    ratio: str
    spread: str
    target: str
    met: bool | None


ROWS: list[Row] = []
NOTES: list[str] = []


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- 1, 2: echo ----------------------------------------------------------------------------------------------


def echo_targets(scale: Scale, haip: Server, bare: Server) -> tuple[Rounds, Rounds]:
    """Throughput at 50 × 4 in flight, then latency of one connection, alternating haip and bare."""
    common = {"mode": "echo", "warmup": 1.0}
    throughput, latency50, latency99 = Rounds(), Rounds(), Rounds()
    for _ in range(scale.rounds):
        spec = {**common, "conns": 50, "inflight": 4, "seconds": scale.echo_seconds}
        ours = load(LOAD, {**spec, "url": haip.ws(), "token": haip.token})
        base = load(LOAD, {**spec, "url": bare.ws("/echo"), "token": None})
        throughput.add(ours["rate"], base["rate"])
    for _ in range(scale.rounds):
        spec = {**common, "conns": 1, "inflight": 1, "seconds": scale.latency_seconds}
        ours = load(LOAD, {**spec, "url": haip.ws(), "token": haip.token})
        base = load(LOAD, {**spec, "url": bare.ws("/echo"), "token": None})
        latency50.add(ours["p50_ms"], base["p50_ms"])
        latency99.add(ours["p99_ms"], base["p99_ms"])
    ROWS.append(
        Row(
            1,
            "echo throughput, 50 connections × 4 in flight, authenticated, reference dialect",
            f"{statistics.median(throughput.ours):,.0f} round trips/s",
            f"{statistics.median(throughput.base):,.0f}/s (bare Starlette echo)",
            f"{throughput.ratio:.2f}x",
            throughput.spread(),
            "≥ 0.7x",
            throughput.ratio >= 0.7,
        )
    )
    added50 = statistics.median(a - b for a, b in zip(latency50.ours, latency50.base, strict=True))
    added99 = statistics.median(a - b for a, b in zip(latency99.ours, latency99.base, strict=True))
    ROWS.append(
        Row(
            2,
            "added latency per round trip, 1 connection",
            f"p50 {statistics.median(latency50.ours):.2f} ms, p99 {statistics.median(latency99.ours):.2f} ms",
            f"p50 {statistics.median(latency50.base):.2f} ms, p99 {statistics.median(latency99.base):.2f} ms",
            f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
            f"p50 {latency50.spread()}",
            "p50 ≤ +0.3 ms, p99 ≤ +1.5 ms",
            added50 <= 0.3 and added99 <= 1.5,
        )
    )
    return throughput, latency50


# -- 3, 4: streaming -----------------------------------------------------------------------------------------


def stream_targets(scale: Scale, haip: Server, bare: Server, echo_latency: Rounds) -> float:
    frames, tokens = Rounds(), Rounds()
    for _ in range(scale.rounds):
        spec = {"mode": "stream", "clients": 10, "count": scale.stream_tokens}
        ours = load(LOAD, {**spec, "url": haip.ws(), "token": haip.token})
        base = load(LOAD, {**spec, "url": bare.ws("/push"), "token": None})
        frames.add(ours["frames_per_s"], base["frames_per_s"])
        tokens.add(ours["tokens_per_s"], base["tokens_per_s"])
    ROWS.append(
        Row(
            3,
            f"agent token streaming to 10 clients ({scale.stream_tokens} tokens each, at once)",
            f"{statistics.median(frames.ours):,.0f} messages/s, {statistics.median(tokens.ours):,.0f} tokens/s",
            f"{statistics.median(frames.base):,.0f} messages/s (bare Starlette push loop)",
            f"{frames.ratio:.2f}x messages, {tokens.ratio:.2f}x tokens",
            frames.spread(),
            "≥ 0.6x messages/s",
            frames.ratio >= 0.6,
        )
    )
    pressed = Rounds()
    for _ in range(min(scale.rounds, 3)):
        spec = {"mode": "stream", "clients": 10, "count": scale.pressure_tokens, **PRESSURE}
        ours = load(LOAD, {**spec, "url": haip.ws(), "token": haip.token})
        base = load(LOAD, {**spec, "url": bare.ws("/push"), "token": None})
        pressed.add(ours["tokens_per_s"], base["tokens_per_s"])
        frames_pressed = ours["frames_per_s"]
    ROWS.append(
        Row(
            3,
            f"the same to 10 slow clients ({scale.pressure_tokens} tokens of 1000 characters each; a client "
            "busy 0.5 ms per frame, 4 KB socket receive buffer)",
            f"{statistics.median(pressed.ours):,.0f} tokens/s (last round: {frames_pressed:,.0f} messages/s)",
            f"{statistics.median(pressed.base):,.0f} tokens/s (bare push loop, one token per message)",
            f"{pressed.ratio:.2f}x tokens",
            pressed.spread(),
            "≥ 1.0x tokens/s with merging under pressure",
            pressed.ratio >= 1.0,
        )
    )
    first = Rounds()
    for index in range(scale.rounds):
        ours = load(LOAD, {"mode": "first_token", "url": haip.ws(), "token": haip.token, "count": scale.first_tokens})
        first.add(ours["p50_ms"], echo_latency.base[index])
    p50 = statistics.median(first.ours)
    ROWS.append(
        Row(
            4,
            "client MESSAGE → first token, agent answering at once",
            f"p50 {p50:.2f} ms",
            f"p50 {statistics.median(first.base):.2f} ms (bare echo round trip, target 2's rounds)",
            f"{first.ratio:.2f}x",
            first.spread(),
            "p50 ≤ 1 ms",
            p50 <= 1.0,
        )
    )
    return statistics.median(frames.ours)


# -- 5: MCP tool calls ---------------------------------------------------------------------------------------


def tool_target(scale: Scale) -> None:
    import anyio
    import transports  # type: ignore[import-not-found]

    from tests.support.demo_mcp import start_http_demo
    from tests.support.demo_mcp import stop as stop_demo

    port = transports.unused_port()
    demo = start_http_demo(port)
    url = f"http://127.0.0.1:{port}/mcp"
    p50 = {name: Rounds() for name in ("stdio", "http")}
    p99 = {name: Rounds() for name in ("stdio", "http")}
    try:
        with haip_server(SERVER, mcp_url=url) as haip:
            for _ in range(scale.rounds):  # each round interleaves runtime and SDK calls call by call
                times, _connect = anyio.run(transports.measure, haip.ws(), haip.token, url, scale.tool_calls)
                for name in p50:
                    ours, base = times[f"runtime {name}"], times[f"sdk {name}"]
                    p50[name].add(transports.percentile(ours, 50), transports.percentile(base, 50))
                    p99[name].add(transports.percentile(ours, 99), transports.percentile(base, 99))
    finally:
        stop_demo(demo)
    for name in p50:
        a, b = p50[name], p99[name]
        ROWS.append(
            Row(
                5,
                f"MCP tool call through the runtime, {name}",
                f"p50 {statistics.median(a.ours):.2f} ms, p99 {statistics.median(b.ours):.2f} ms",
                f"p50 {statistics.median(a.base):.2f} ms, p99 {statistics.median(b.base):.2f} ms (direct mcp.Client)",
                f"{a.ratio:.2f}x p50, {b.ratio:.2f}x p99",
                a.spread(),
                "p50 ≤ 1.1x, p99 ≤ 1.3x",
                a.ratio <= 1.1 and b.ratio <= 1.3,
            )
        )


# -- 6: idle connections and sessions ------------------------------------------------------------------------


def idle_memory(server: Server, url: str, token: str | None, conns: int) -> tuple[float, dict[str, Any]]:
    """KB of server RSS per idle authenticated connection (after a warm-up batch of 50)."""
    with held_load(LOAD, {"mode": "idle", "url": url, "token": token, "conns": 50}):
        time.sleep(0.5)
        before = server.rss_kb()
    with held_load(LOAD, {"mode": "idle", "url": url, "token": token, "conns": conns}) as opened:
        time.sleep(1.0)
        after = server.rss_kb()
    return (after - before) / max(1, opened["opened"]), opened


def memory_target(scale: Scale) -> None:
    per = Rounds()
    for _ in range(scale.rounds):
        with haip_server(SERVER, fd_limit=scale.idle_conns + 512) as haip:
            ours, opened = idle_memory(haip, haip.ws(), haip.token, scale.idle_conns)
        with baseline_server(SERVER, fd_limit=scale.idle_conns + 512) as bare:
            base, _ = idle_memory(bare, bare.ws("/idle"), None, scale.idle_conns)
        per.add(ours, base)
    ROWS.append(
        Row(
            6,
            f"idle authenticated connection memory ({scale.idle_conns:,} connections)",
            f"{statistics.median(per.ours):.1f} KB each",
            f"{statistics.median(per.base):.1f} KB each (bare Starlette idle WebSockets)",
            f"{per.ratio:.2f}x",
            per.spread(),
            "≤ 1.5x",
            per.ratio <= 1.5,
        )
    )
    wanted = scale.idle_sessions
    limit = raise_fd_limit(wanted + 512)
    if limit < wanted + 512:
        NOTES.append(f"Target 6: this machine's descriptor limit ({limit}) is below {wanted + 512}; tried anyway.")
    with haip_server(SERVER, fd_limit=wanted + 512) as haip:
        start = haip.rss_kb()
        with held_load(LOAD, {"mode": "idle", "url": haip.ws(), "token": haip.token, "conns": wanted}) as opened:
            time.sleep(1.0)
            rss = haip.rss_kb()
            health = fetch(haip.http("/health"))
    sessions = int(m.group(1)) if health and (m := re.search(r'"sessions":\s*(\d+)', health)) else opened["opened"]
    ROWS.append(
        Row(
            6,
            f"{wanted:,} idle sessions held at once (one authenticated connection each)",
            f"{sessions:,} sessions held, {opened['failed']} refused; RSS {rss / 1024:.0f} MB "
            f"({(rss - start) / max(1, opened['opened']):.1f} KB each), opened in {opened['seconds']:.1f} s",
            "—",
            "—",
            "1 run",
            f"{wanted:,} held",
            sessions >= wanted and opened["failed"] == 0,
        )
    )
    if opened["errors"]:
        NOTES.append(f"Target 6 (sessions): first refusals: {opened['errors']}")


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body.decode()
    except OSError:
        return None


# -- 7, 8, 9: fan-out, resume, a stalled reader --------------------------------------------------------------


def fanout_target(scale: Scale, haip: Server) -> None:
    runs = [
        load(
            LOAD,
            {
                "mode": "fanout",
                "url": haip.ws(),
                "token": haip.token,
                "members": 100,
                "count": scale.fanout_tokens,
                "rate": 1000,
            },
        )  # fmt: skip
        for _ in range(max(1, scale.rounds // 2))
    ]
    worst = max(runs, key=lambda r: r["p99_ms"])
    complete = all(r["complete"] == r["members"] for r in runs)
    p99 = statistics.median(r["p99_ms"] for r in runs)
    ROWS.append(
        Row(
            7,
            f"one transaction, 100 members, agent streaming {scale.fanout_tokens} tokens at 1,000 tokens/s",
            f"{'every' if complete else 'NOT every'} member got every token; delivery lag p50 "
            f"{statistics.median(r['p50_ms'] for r in runs):.1f} ms, p99 {p99:.1f} ms "
            f"(worst run {worst['p99_ms']:.1f}, max {worst['max_ms']:.0f} ms)",
            "—",
            "—",
            f"{len(runs)} runs",
            "every token to every member; p99 lag ≤ 50 ms",
            complete and p99 <= 50,
        )
    )


def resume_target(scale: Scale, haip: Server, stream_rate: float) -> None:
    result = load(
        LOAD, {"mode": "resume", "url": haip.ws(), "token": haip.token, "count": 1000, "rounds": scale.resumes}
    )
    ratio = result["tokens_per_s"] / stream_rate
    ROWS.append(
        Row(
            8,
            "1,000 missed messages on resume",
            f"{result['tokens_per_s']:,.0f} messages/s caught up; handshake p50 {result['handshake_p50_ms']:.1f} ms, "
            f"p99 {result['handshake_p99_ms']:.1f} ms; {result['parts_replayed']:.0f} parts replayed",
            f"{stream_rate:,.0f} messages/s (target 3's live rate)",
            f"{ratio:.2f}x",
            f"{scale.resumes} resumes",
            "≥ 0.5x; handshake p99 ≤ 20 ms",
            ratio >= 0.5 and result["handshake_p99_ms"] <= 20,
        )
    )


def stall_target(scale: Scale, haip: Server) -> None:
    p99 = Rounds()
    spec = {
        "mode": "stall",
        "url": haip.ws(),
        "token": haip.token,
        "clients": 50,
        "count": scale.stall_tokens,
        "rate": 20,
    }
    for _ in range(scale.rounds):
        ours = load(LOAD, {**spec, "stalled": True})
        base = load(LOAD, {**spec, "stalled": False})
        p99.add(ours["p99_ms"], base["p99_ms"])
    ROWS.append(
        Row(
            9,
            "one stalled reader among 50 clients streaming at 20 tokens/s each",
            f"others' delivery lag p99 {statistics.median(p99.ours):.1f} ms",
            f"p99 {statistics.median(p99.base):.1f} ms (the same 50 without it)",
            f"{p99.ratio:.2f}x",
            p99.spread(),
            "others' p99 ≤ 1.5x",
            p99.ratio <= 1.5,
        )
    )


# -- 10: soak ------------------------------------------------------------------------------------------------

SOAK_TOML = """
[storage]
backend = "sqlite"
path = "soak.db"

[transactions]
idle_seconds = 5
"""


#: Seconds of the soak's load run before its baseline is counted.
WARM_UP = 10.0


def soak_target(scale: Scale) -> None:
    import transports  # type: ignore[import-not-found]

    from tests.support.demo_mcp import start_http_demo
    from tests.support.demo_mcp import stop as stop_demo

    port = transports.unused_port()
    demo = start_http_demo(port)
    try:
        with haip_server(SERVER, mcp_url=f"http://127.0.0.1:{port}/mcp", extra=SOAK_TOML, resume_timeout=5) as haip:
            time.sleep(2)  # the MCP servers connect
            # A warm-up of the same load first: what is opened once, at first use (SQLite opens its
            # write-ahead log at the first write), is no leak, and belongs in the count to come back to.
            warm = {"mode": "soak", "url": haip.ws(), "token": haip.token, "seconds": WARM_UP, "tools": True}
            load(LOAD, warm, timeout=WARM_UP + 300)
            time.sleep(12)  # resume_timeout (5 s) and transactions idle_seconds (5 s) pass
            before = gauges(haip)
            samples: list[tuple[float, dict[str, float]]] = []
            stop = threading.Event()

            def sample() -> None:
                start = time.monotonic()
                while not stop.wait(max(1.0, scale.soak_seconds / 60)):
                    samples.append((time.monotonic() - start, gauges(haip)))

            sampler = threading.Thread(target=sample)
            sampler.start()
            spec = {"mode": "soak", "url": haip.ws(), "token": haip.token, "seconds": scale.soak_seconds, "tools": True}
            try:
                done = load(LOAD, spec, timeout=scale.soak_seconds + 300)
            finally:
                stop.set()
                sampler.join()
            time.sleep(12)  # resume_timeout (5 s) and transactions idle_seconds (5 s) pass
            after = gauges(haip)
    finally:
        stop_demo(demo)
    slope = rss_slope(samples)
    counts = ", ".join(f"{n} {k}" for k, n in done["done"].items())
    fds_ok = after["fds"] <= before["fds"]
    tasks_ok = after.get("tasks", 0) <= before.get("tasks", 0)
    tasks = f"tasks {before['tasks']:.0f} → {after['tasks']:.0f}" if "tasks" in after else "tasks: no /metrics"
    ROWS.append(
        Row(
            10,
            f"{scale.soak_seconds / 60:.1f}-minute soak: churn, streams, resumes, tool calls",
            f"RSS {slope:+.2f} %/min after warm-up (peak {max(s['rss_kb'] for _, s in samples) / 1024:.0f} MB); "
            f"descriptors {before['fds']:.0f} → {after['fds']:.0f}, {tasks}, "
            f"threads {before['threads']:.0f} → {after['threads']:.0f}; {counts}; {done['errors']} errors",
            "—",
            "—",
            f"{len(samples)} samples",
            "memory < 1 %/min; descriptors and tasks back to baseline",
            None if scale.soak_seconds < 300 else abs(slope) < 1 and fds_ok and tasks_ok and done["errors"] == 0,
        )
    )
    if done["first_errors"]:
        NOTES.append(f"Target 10: first soak errors: {done['first_errors']}")


def gauges(server: Server) -> dict[str, float]:
    values: dict[str, float] = {"rss_kb": server.rss_kb(), "fds": server.fds(), "threads": server.threads()}
    text = fetch(server.http("/metrics")) or ""
    if match := re.search(r"^haip_event_loop_tasks (\S+)$", text, re.MULTILINE):
        values["tasks"] = float(match.group(1))
    return values


def rss_slope(samples: list[tuple[float, dict[str, float]]]) -> float:
    """RSS growth in % per minute over the samples after the first fifth (warm-up), least squares."""
    kept = samples[len(samples) // 5 :]
    if len(kept) < 3:
        return float("nan")
    xs = [t / 60 for t, _ in kept]
    ys = [s["rss_kb"] for _, s in kept]
    slope = statistics.linear_regression(xs, ys).slope
    return slope / statistics.mean(ys) * 100


# -- 11: start-up --------------------------------------------------------------------------------------------


def startup_target(scale: Scale, directory: Path) -> None:
    config = bench_config(directory)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Both sides load bytecode, as an installed wheel does (pip compiles at install): uvicorn and Starlette
    # come compiled from site-packages, while this source tree would otherwise be compiled on every start
    # wherever PYTHONDONTWRITEBYTECODE is set (about 90 ms of CPU).
    compileall.compile_dir(ROOT / "haip_runtime", quiet=1)
    compileall.compile_file(BENCH / "streamer.py", quiet=1)
    times = Rounds()
    for _ in range(scale.rounds):
        ours = time_until_ready([PYTHON, "-m", "haip_runtime", "serve", "--config", str(config)], "listening on", env)
        base = time_until_ready([PYTHON, "-c", BASELINE_APP], "listening", env)
        times.add(ours, base)
    ROWS.append(
        Row(
            11,
            "start-up to listening (echo and the streaming agent, no MCP)",
            f"{statistics.median(times.ours) * 1000:.0f} ms",
            f"{statistics.median(times.base) * 1000:.0f} ms (bare uvicorn + Starlette)",
            f"{times.ratio:.2f}x",
            times.spread(),
            "≤ 1.5x",
            times.ratio <= 1.5,
        )
    )


# -- the PostgreSQL store (issue 20) -------------------------------------------------------------------------


def run_part(script: str, results: str, short: bool) -> tuple[str, str]:
    """Run ``bench/<script>`` (its own short mode with --short) on all the cores this suite was given, as a
    deployment on this machine would; what it wrote to ``bench/<results>.md`` (``-short`` in short mode),
    and that file's name."""
    output = BENCH / (f"{results}-short.md" if short else f"{results}.md")
    command = [PYTHON, str(BENCH / script), "--output", str(output), *(["--short"] if short else [])]
    subprocess.run(
        command,
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
        timeout=3600,
        preexec_fn=lambda: os.sched_setaffinity(0, SERVER | LOAD),  # this process is pinned to LOAD
    )
    return output.read_text(encoding="utf-8"), output.name


def written_on(text: str) -> str:
    """When a bench's results file says it was written ("?" if it does not)."""
    return match.group(1) if (match := re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", text)) else "?"


def store_bench(short: bool) -> list[str]:
    """bench/store.py's tables, for the report."""
    return store_tables(*run_part("store.py", "STORE-RESULTS", short))


def workers_bench(short: bool) -> list[str]:
    """bench/workers.py's tables (issue 21: `serve --workers 2` against one process), for the report."""
    return workers_section(*run_part("workers.py", "WORKERS-RESULTS", short))


def workers_section(text: str, name: str) -> list[str]:
    """The section of BENCHMARKS.md for bench/workers.py's results (``text``, written to ``name``)."""
    written = written_on(text)
    return [
        "## `serve --workers 2` against one process (issue 21)",
        "",
        f"`bench/workers.py` wrote bench/{name} on {written} (how it is measured is there):"
        " echo round trips per second, nothing pinned, the load generators sharing the cores.",
        "",
        *[
            "#" + line if line.startswith("## ") else line  # its tables, verdict and bounds, one level down
            for line in text[text.index("| server") :].partition("## Profile")[0].splitlines()
        ],
        *([f"The py-spy profile of a worker is in bench/{name}.", ""] if "## Profile" in text else []),
    ]


def store_tables(text: str, name: str) -> list[str]:
    """The section of BENCHMARKS.md for bench/store.py: its summary, numbered headings and tables, and
    where the rest is (how each part is measured, the servers' settings, the machine)."""
    written = written_on(text)
    lines = [
        "## The PostgreSQL store against SQLite (issue 20)",
        "",
        f"`bench/store.py` wrote bench/{name} on {written}: how each part is measured, the PostgreSQL servers' "
        "settings (the test cluster runs with `fsync=off`; a second one with `fsync=on` is measured beside it) "
        "and the machine are there. Its summary and tables:",
        "",
    ]
    bullets = False
    for line in text.splitlines():
        if line.startswith("## "):
            lines += ["#" + line, ""]
            bullets = line == "## In short"
        elif line.startswith("|") or (bullets and line.startswith("- ")):
            lines.append(line)
        elif line and bullets:
            bullets = False  # the summary ends at its first line that is not a bullet
        if not line.startswith(("|", "- ")) and lines[-1].startswith(("|", "- ")):
            lines.append("")
    return lines


# -- the cluster (issue 21) ----------------------------------------------------------------------------------


def cluster_bench(short: bool) -> list[str]:
    """bench/cluster.py's summary and tables, for the report."""
    return cluster_tables(*run_part("cluster.py", "CLUSTER-RESULTS", short))


def cluster_tables(text: str, name: str) -> list[str]:
    """The section of BENCHMARKS.md for bench/cluster.py: its part of the results file (between its
    markers), headings, summary and tables only; how each is measured stays in the file."""
    part = text.partition("<!-- cluster -->")[2].partition("<!-- /cluster -->")[0]
    written = written_on(part)
    lines = [
        "## The cluster: `[cluster]` against one process (issue 21)",
        "",
        f"`bench/cluster.py` wrote its part of bench/{name} on {written}: how each part is measured, the "
        "machine's load during the run and the processes' pinning are there. Its summary and tables:",
        "",
    ]
    for line in part.splitlines():
        if line.startswith("### "):
            lines += [line, ""]
        elif line.startswith(("|", "- ")):
            lines.append(line)
        elif lines[-1].startswith(("|", "- ")):
            lines.append("")
    return lines


# -- profile -------------------------------------------------------------------------------------------------


def profile_echo(scale: Scale, haip: Server) -> list[str]:
    """py-spy on the server under target 1's echo load: where the time goes, inclusive and self."""
    spy = Path(PYTHON).with_name("py-spy")
    if scale.profile_seconds <= 0 or not spy.exists():
        return ["(no profile in this run: py-spy is not installed or --short)"]
    raw = BENCH / "profile-echo.txt"
    record = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(haip.pid),
            "--duration",
            str(int(scale.profile_seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spec = {"mode": "echo", "warmup": 0.5, "conns": 50, "inflight": 4, "seconds": scale.profile_seconds + 1}
    load(LOAD, {**spec, "url": haip.ws(), "token": haip.token})
    record.wait(timeout=120)
    if not raw.exists():
        return ["(py-spy could not attach to the server here)"]
    return summarise_profile(raw.read_text())


def summarise_profile(raw: str, top: int = 15) -> list[str]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [short_frame(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        packages[package(stack.split(";")[-1])] += count
    if not total:
        return ["(the profile is empty)"]
    lines = [f"{total:,} samples at 250 Hz. Self time by where the code lives:", ""]
    lines += ["| % | code |", "|---|---|"]
    lines += [f"| {n / total * 100:.1f} | {p} |" for p, n in packages.most_common(top)]
    lines += ["", "Inclusive (the function and what it calls; the event loop's own frames left out):", ""]
    lines += ["| % | function |", "|---|---|"]
    shown = [(f, n) for f, n in inclusive.most_common() if n < 0.8 * total]
    lines += [f"| {n / total * 100:.1f} | `{f}` |" for f, n in shown[:top]]
    lines += ["", "Self (where the CPU actually is):", "", "| % | function |", "|---|---|"]
    lines += [f"| {n / total * 100:.1f} | `{f}` |" for f, n in own.most_common(top)]
    return lines


def package(frame: str) -> str:
    """The library, haip_runtime module or stdlib module of a py-spy frame (its paths are package-relative)."""
    match = re.match(r".*? \((.*?)(?::\d+)?\)$", frame.strip())
    parts = match.group(1).split("/") if match else [frame]
    if parts[0] == "haip_runtime":
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def short_frame(frame: str) -> str:
    """`function (path/to/module.py:12)` → `function (module.py)`."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    name, path = match.groups()
    return f"{name} ({path})"


# -- the report ----------------------------------------------------------------------------------------------

# What limits each target that the full run of 2026-11-26 missed, from its profile (below the table in
# BENCHMARKS.md) and the measurements named here. Kept with the code so the next run prints them too;
# revise them when the figures change.
LIMITS: dict[int, str] = {
    1: "the server's one core, spent on Python per turn: about 180 µs of CPU per round trip against "
    "the bare echo's 30 µs (process CPU time over the same load). 0.7x would leave the whole pipeline "
    "about 15 µs more than the bare echo's own Python. What a turn still costs (py-spy below, and cProfile "
    "of an in-process echo): six events published into the transaction's log for the one MESSAGE a "
    "reference-dialect client receives (the user's message, RUN_STARTED, MESSAGE_START, MESSAGE_PART, "
    "MESSAGE_END, RUN_FINISHED; each an event with its own id, stamped, kept in the tail and the store, "
    "which is what history, rejoin and the REST API read); a task, a `Turn` and an anyio cancel scope "
    "per turn; pydantic validation of the envelope and its payload; and three trips through the event "
    "loop per turn (the connection, the turn, the writer) where the bare echo has one, which is why "
    "asyncio's own `Handle._run` and the selector rank high. The cyclic garbage collector, after "
    "`gc.freeze()` at start-up and a young-generation threshold of 50,000, is about a tenth (turning it off "
    "took 183 instead of 220 µs per round trip on a grown heap). Done for this issue, from 1,688 round "
    "trips/s (0.05x) and about 610 µs per round trip: collector tuning; ids from a seeded generator "
    "instead of `uuid4`; events stamped in place instead of copied; turns as plain asyncio tasks instead "
    "of anyio `start_soon` (32 µs each); orjson; the WebSocket read by the connection itself instead of "
    "a reader task and a queue; `say` handing its whole message over before it yields; one transaction "
    "save per turn.",
    2: "the same per-turn work as target 1 on one connection; the p99 adds the collector's pauses and "
    "the shared machine.",
    3: "the cost per token: every `MessageStream.write` publishes one MESSAGE_PART event through the "
    "transaction's log and the member's session (an id, the stamp, the tail and the store, JSON once, "
    "the replay window) and the writer's send: about 28 µs of the server's core per frame against the "
    "bare loop's 10 µs (a `json.dumps` and a `send`). In the first row the clients keep up, so every "
    "token is its own frame (messages/s = tokens/s). In the second, the clients are slower than the "
    "server: while a connection's socket is full the parts of a message wait unstamped and go out "
    "merged (`Session._send`), so tokens/s exceed what one token per frame allows; how many merge "
    "depends on how much the socket buffers take first.",
    4: "the turn's fixed cost before the first token: a task is spawned for the run, RUN_STARTED and "
    "MESSAGE_START are published before the first MESSAGE_PART.",
    5: "the extra HAIP hop around the same MCP call: a WebSocket frame in, the hub and the tool proxy, "
    "and three frames out (TOOL_CALL, TOOL_UPDATE RUNNING, TOOL_DONE). A bare WebSocket round trip on this "
    "machine is about 0.25 ms, already more than the 0.2-0.3 ms the target leaves on a 2.4 ms stdio "
    "call. Over stdio the runtime also shares its core with the MCP server it started (the child inherits "
    "the bench's pinning), while the SDK baseline's server runs beside the load generator. The p99 "
    "follows the p50 plus the collector's pauses.",
    6: "per-connection and per-session state. An idle authenticated WebSocket holds no task of its own "
    "besides uvicorn's ASGI task (which reads the socket): the writer starts when there is something "
    "to write and retires after a second with nothing (`Outbox.frames` with a linger); heartbeat, token expiry, gap "
    "watch and the 1013 grace are callbacks on the runtime's one timer task (`haip_runtime/session/timers.py`). "
    "What remains over the bare app (tracemalloc over 1,000 idle connections): the replay window with the "
    "server HAI and session.ready frames (about 1.2 KB of text), the session (duplicate-id window, "
    "credit and flow state, downgrader) and the connection's objects and suspended call chain (the "
    "Starlette route and our connection's coroutines), a few KB each. The baseline pings nothing (uvicorn's "
    "`ws_ping_interval=None`) while the runtime keeps a heartbeat: with uvicorn's pings on in the bare app "
    "too, it held about 0.4 KB more per connection on uvloop (2026-12-06: 1.42x instead of 1.47x).",
    7: "target 3's rate: 100 members at 1,000 tokens/s is 100,000 frames/s when each token is its own "
    "frame, more than the pipeline writes per second on one core, so members' sockets fill; their parts "
    "then merge (target 3's second row) and every member still gets every token. The one load process "
    "parsing 100,000 stamps/s is near its own limit too.",
    9: "CPU, not blocking: the stalled client's answer (20,000 parts of 200 bytes) is produced, encoded "
    "and recorded until its connection is 1,000 frames behind and closed with 1013; that burst takes the "
    "core from the others' streams for a moment. Others are never blocked (every one of their streams completes) "
    "and their p99 of a few milliseconds is also within the machine's noise (rounds range 0.47-3.67x).",
    11: "imports, a third of them pydantic's: importing pydantic (about 55 ms of CPU) and building the "
    "19 config models (about 25 ms; the first model also loads pydantic's schema machinery) against about "
    "150 ms for the whole bare app; then haip-runtime's own modules (about 70 ms of `-X importtime` self "
    "time, dataclass creation a fifth of it) and `gc.collect()` in `allocator.settle` (about 20 ms, plus "
    "about 10 ms of automatic collections while importing). Already out of start-up: PyJWT and "
    "cryptography (imported on the first token check), prometheus_client (on the first scrape), payload "
    "validators (built on first use), attribute docstrings (read for the JSON Schema only).",
}


PROFILE_NOTE = (
    "`py-spy record --nonblocking --rate 250` attached to the server for 10 s of target 1's load (50 connections "
    "× 4 in flight), right after targets 1 and 2 ran on the same server, so with the heap they left. The raw "
    "stacks are written to bench/profile-echo.txt (not committed). Garbage collection has no frame of its own "
    "in py-spy: its time shows as self time of the line whose allocation triggered it."
)


#: Whose versions the report gives.
PACKAGES = ("haip-runtime", "uvicorn", "starlette", "websockets", "mcp", "anyio")


def write_report(
    scale: Scale,
    short: bool,
    started: float,
    profile: list[str],
    store: list[str],
    cluster: list[str],
    workers: list[str],
) -> str:
    rows = [
        f"| {r.number} | {r.what} | {r.ours} | {r.base} | {r.ratio} | {r.spread} | {r.target} | "
        f"{'too short to judge' if r.met is None else 'met' if r.met else 'MISSED'} |"
        for r in ROWS
    ]
    missed = sorted({r.number for r in ROWS if r.met is False})
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/suite.py{' --short' if short else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {(time.monotonic() - started) / 60:.1f} minutes. {machine(PACKAGES)}. "
        f"Server pinned to core(s) {sorted(SERVER)}, load generators to {sorted(LOAD)}. The machine is shared "
        "with other engineers' test runs, which is why every ratio is the median of per-round ratios.",
        "",
        "| # | what | haip-runtime | baseline | ratio | spread | target | |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## How it is measured",
        "",
        "- haip-runtime is a real `haip-runtime serve` subprocess on a generated config (bench/common.py: the",
        "  echo agent, the bench-only streaming agent of bench/streamer.py, dev-mode auth, per-user rate and",
        "  session limits raised so the pipeline is measured, not the throttles). The baseline is the bare",
        "  Starlette app of bench/baseline.py on the same uvicorn and the same WebSocket implementation.",
        "  Compression is off on both sides; everything runs on 127.0.0.1.",
        "- Load generators are separate processes (bench/load.py, the `websockets` client, raw HAIP: the",
        "  reference SDK's dialect for echo and idle connections, the full dialect for streams).",
        "- Rounds alternate haip-runtime and baseline (A, B, A, B); the ratio is the median of the",
        "  per-round ratios and `spread` their range. Lag (targets 7, 9) is wall-clock time from the",
        "  agent writing a token (the token is its own timestamp) to the client parsing it.",
        "- Target 4's baseline is target 2's bare echo round trip; target 8's is target 3's live",
        "  rate; target 9 compares haip-runtime with itself. Target 10 runs with the SQLite store,",
        "  `resume_timeout_seconds = 5` and `transactions.idle_seconds = 5`; it counts descriptors and",
        "  tasks after a 10 s warm-up of the same load (what is opened once, at first use, such as",
        "  SQLite's write-ahead log, is in that count), then again 12 s after the soak. Target 11",
        "  compiles haip-runtime's bytecode first, as installing a wheel does, so both sides start from",
        "  `.pyc` files.",
        "- One load process on one core can itself be the limit: the bare echo baseline is bounded by",
        "  the load generator's Python, which flatters no one but narrows the ratios.",
        "",
        "## Speech",
        "",
        "`bench/speech.py` writes bench/SPEECH-RESULTS.md: end of speech → transcript and → first audio chunk",
        "through the runtime against the engines called directly, and each engine's real-time factor on this CPU.",
        "",
        "## Cluster bus",
        "",
        "`bench/cluster_bus.py` writes its part of bench/CLUSTER-RESULTS.md in a few seconds: appends per second",
        "through the Lua script (one at a time, 16 in flight, 16 per call, and streamed parts through the batcher),",
        "each delivered to a second node, and Redis commands per appended event from `INFO commandstats`.",
        "",
        *cluster,
        *store,
        *workers,
    ]
    if NOTES:
        lines += ["## Notes from this run", "", *[f"- {note}" for note in NOTES], ""]
    lines += ["## What limits the missed targets", ""]
    lines += [f"- **{n}**: {LIMITS.get(n, 'not analysed yet.')}" for n in missed] or ["Nothing missed."]
    lines += ["", "## Profile: the server under target 1's echo load (py-spy)", "", PROFILE_NOTE, "", *profile, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="about a minute: the same code, smaller numbers")
    parser.add_argument("--output", type=Path, help="default: BENCHMARKS.md, or bench/BENCHMARKS-short.md with --short")
    args = parser.parse_args()
    args.output = args.output or (BENCH / "BENCHMARKS-short.md" if args.short else ROOT / "BENCHMARKS.md")
    scale = SHORT if args.short else FULL
    logging.basicConfig(level=logging.WARNING)  # before the MCP SDK's own basicConfig at INFO (every HTTP request)
    started = time.monotonic()
    pin(os.getpid(), LOAD)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="haip-bench-") as tmp:
        log("11: start-up")
        startup_target(scale, Path(tmp))
    with haip_server(SERVER) as haip, baseline_server(SERVER) as bare:
        log("1, 2: echo")
        _, latency = echo_targets(scale, haip, bare)
        log("profile")
        profile = profile_echo(scale, haip)
        log("3, 4: streaming")
        rate = stream_targets(scale, haip, bare, latency)
        log("7: fan-out")
        fanout_target(scale, haip)
        log("8: resume")
        resume_target(scale, haip, rate)
        log("9: stalled reader")
        stall_target(scale, haip)
    log("5: tool calls")
    tool_target(scale)
    log("6: memory")
    memory_target(scale)
    log("10: soak")
    soak_target(scale)
    log("store: SQLite against PostgreSQL (bench/store.py)")
    store = store_bench(args.short)
    log("cluster: [cluster] on against off (bench/cluster.py)")
    cluster = cluster_bench(args.short)
    log("workers: serve --workers 2 against one process (bench/workers.py)")
    workers = workers_bench(args.short)
    ROWS.sort(key=lambda r: r.number)
    report = write_report(scale, args.short, started, profile, store, cluster, workers)
    args.output.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
