"""The PostgreSQL store against SQLite (issue 20), side by side in one run; writes bench/STORE-RESULTS.md.

    .venv/bin/python bench/store.py            # the full run (about 3 minutes; 1,000,000 events for the reads)
    .venv/bin/python bench/store.py --short    # well under a minute, the same code with small numbers,
                                               # to prove the bench runs (bench/suite.py --short runs it)

1. Events stored per second: the store alone (no server), N MESSAGE_PART events appended to a few
   transactions with ``store.append``, then ``await store.flush()``; as one batch, and in batches of 100
   (a flush every 100 appends: one commit each, where the server's fsync shows). SQLite (a temp file)
   against PostgreSQL (our own test cluster, ``fsync=off``, or the one HAIP_TEST_POSTGRES_URL names) and
   a second cluster of our own with ``fsync=on``, rounds interleaved. Also this process's CPU time per
   1,000 events: the writer shares the event loop's process.
2. The p99 added to an echo round trip: a real `haip-runtime serve` per backend (memory, the floor;
   sqlite; postgres, ``fsync`` off and on), one HaipClient doing sequential send_text → RUN_FINISHED.
3. REST read latency at 1,000,000 events against 10,000: the databases filled directly (SQL
   ``generate_series`` for PostgreSQL, one ``executemany`` transaction for SQLite), then a served runtime's
   ``GET /haip/transactions`` (first page, and the third through the cursors) and
   ``GET /haip/transactions/{id}/events?after=500&limit=100`` (the middle of a 1,000-event transaction).

Servers are subprocesses pinned to one core (bench/common.py), this process (the client) to the other;
PostgreSQL itself is not pinned. Only 127.0.0.1 is contacted, in bounded loops.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from common import Server, cores, drain, haip_server, load, machine, percentile, pin, stores  # noqa: E402  # type: ignore[import-not-found]

from haip_runtime.client import HaipClient  # noqa: E402
from haip_runtime.config.models import StorageConfig  # noqa: E402
from haip_runtime.protocol.envelope import Event  # noqa: E402
from haip_runtime.protocol.events import Channel  # noqa: E402
from haip_runtime.store import PostgresStore, SqliteStore, Store, TransactionRecord, TransactionState  # noqa: E402
from haip_runtime.store.base import event_to_json  # noqa: E402
from haip_runtime.store.migrations import migrate  # noqa: E402
from tests.support.postgres import PostgresError, PostgresServer  # noqa: E402

#: About 60 characters: a streamed token is shorter, a sentence longer; what one MESSAGE_PART may carry.
TEXT = "The quick brown fox jumps over the lazy dog, then naps a while."
#: What a production PostgreSQL does on commit (the test cluster turns fsync and full pages off).
DURABLE = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
#: Events per transaction in the filled databases, transactions per user, and the listing's page size.
PER_TX, TX_PER_USER, PAGE = 1000, 10, 3
#: The dev token's user (`haip-runtime serve` in dev mode prints a token for "dev").
DEV_USER = "dev"
SMALL_EVENTS = 10_000

SERVER, LOAD = cores()


@dataclass(frozen=True)
class Scale:
    rounds: int
    write_events: int
    echo_trips: int
    reads: int
    big_events: int

    busy_seconds: float


FULL = Scale(rounds=6, write_events=50_000, echo_trips=3000, reads=300, big_events=1_000_000, busy_seconds=10)
SHORT = Scale(rounds=2, write_events=2_000, echo_trips=40, reads=10, big_events=20_000, busy_seconds=1.5)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] store: {text}", file=sys.stderr, flush=True)


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@dataclass
class Clusters:
    """The PostgreSQL servers measured: the test one (``fsync=off``, or external) and, when we can start
    one of our own, a durable one. ``settings`` is what each says of itself (``SHOW``)."""

    servers: dict[str, PostgresServer] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    made: list[tuple[PostgresServer, str]] = field(default_factory=list)

    def database(self, server: str) -> str:
        """A new empty database on ``server``; its URL. Dropped at the end (an external server keeps
        nothing of ours; our own clusters are deleted whole)."""
        name = f"bench_store_{os.getpid()}_{len(self.made)}"
        self.made.append((self.servers[server], name))
        return self.servers[server].create_database(name)


@contextmanager
def clusters() -> Iterator[Clusters]:
    """The servers for the whole run, stopped and deleted (or, external, cleared of our databases) after it."""
    found = Clusters()
    try:
        found.servers["postgres"] = PostgresServer.create()
        durable = PostgresServer(settings=DURABLE)
        try:
            durable.start()
            found.servers["postgres fsync=on"] = durable
        except (PostgresError, OSError) as exc:
            durable.close()
            found.notes.append(f"no PostgreSQL with fsync=on: could not start a cluster of our own ({exc})")
        for name, server in found.servers.items():
            found.settings[name] = anyio.run(describe, server.url)
        yield found
    finally:
        for server, name in found.made:
            if not server.owned:
                server.drop_database(name)
        for server in found.servers.values():
            server.close()


async def describe(url: str) -> str:
    import asyncpg

    db = await asyncpg.connect(url)
    try:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers")
        values = [f"{name}={await db.fetchval(f'SHOW {name}')}" for name in names]
        return ", ".join(values)
    finally:
        await db.close()


def postgres_config(url: str) -> StorageConfig:
    return StorageConfig.model_validate({"backend": "postgres", "url": url})


# -- 1: events stored per second -----------------------------------------------------------------------------


def new_events(count: int, transactions: int) -> list[Event]:
    """``count`` MESSAGE_PART events over ``transactions`` transactions, numbered as a log numbers them."""
    events = []
    for index in range(count):
        tx, tseq = index % transactions, index // transactions + 1
        payload = {"message_id": f"msg-{tx}-{tseq // 50}", "text": TEXT}
        events.append(
            Event("MESSAGE_PART", payload, Channel.AGENT, transaction=f"bench-{tx}", run_id=f"run-{tx}", tseq=tseq)
        )
    return events


async def write_round(store: Store, count: int, batch: int) -> tuple[float, float]:
    """(events/s, CPU ms of this process per 1,000 events) for ``count`` events, a flush per ``batch``."""
    transactions = 4
    events = new_events(count, transactions)  # built before the clock: the runtime has them already
    async with store:
        now = time.time()
        for tx in range(transactions):
            store.save_transaction(
                TransactionRecord(f"bench-{tx}", DEV_USER, ("echo",), (DEV_USER,), TransactionState.OPEN, now, now)
            )
        await store.flush()
        wall, cpu = time.perf_counter(), time.process_time()
        for index, event in enumerate(events, 1):
            store.append(event)
            if index % batch == 0:
                await store.flush()
        await store.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        health = store.health
        stored = await store.events("bench-0", after=count // transactions - 1)
        if health.writes_dropped or health.writes_lost or len(stored) != 1:
            raise RuntimeError(f"{type(store).__name__} did not keep every event: {health.public()}")
    return count / wall, cpu / count * 1000 * 1000


@dataclass
class Series:
    """Per-round figures of one measure, one list per backend."""

    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])

    def spread(self, name: str) -> str:
        values = self.figures[name]
        return f"{min(values):,.0f}–{max(values):,.0f}"


def write_rates(scale: Scale, found: Clusters, tmp: Path) -> dict[str, Series]:
    """Rounds A, B, C, A, B, C: each store fresh (a new file, a new database) every round."""
    results = {name: Series() for name in ("rate", "cpu", "rate100", "cpu100")}
    for round_number in range(scale.rounds):
        for name in ["sqlite", *found.servers]:
            for batch, suffix in ((scale.write_events, ""), (100, "100")):
                store: Store
                if name == "sqlite":
                    store = SqliteStore(tmp / f"write-{round_number}-{suffix}.db")
                else:
                    store = PostgresStore(postgres_config(found.database(name)))
                rate, cpu = anyio.run(write_round, store, scale.write_events, batch)
                results["rate" + suffix].add(name, rate)
                results["cpu" + suffix].add(name, cpu)
    return results


# -- 2: echo round trips -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far, every thread's (ended ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def echo_trips(server: Server, count: int) -> tuple[list[float], float]:
    """Seconds per sequential echo turn (MESSAGE sent → RUN_FINISHED received), after a warm-up; and the
    server process's CPU seconds per turn over the same turns."""
    warm_up = max(10, count // 10)
    samples = []
    cpu = 0.0
    async with HaipClient(server.ws(), token=server.token, timeout=30) as client:
        tx = await client.start_transaction("echo")
        events = client.events()
        for index in range(warm_up + count):
            if index == warm_up:
                cpu = cpu_seconds(server.pid)
            start = time.perf_counter()
            with anyio.fail_after(30):
                await client.send_text(tx, f"{index}: {TEXT}")
                async for event in events:
                    if event.type == "RUN_FINISHED":
                        break
            if index >= warm_up:
                samples.append(time.perf_counter() - start)
            client.received.clear()  # the client keeps every event otherwise
        cpu = cpu_seconds(server.pid) - cpu
    return samples, cpu / count


def storage_toml(name: str, found: Clusters) -> str:
    if name == "memory":
        return ""
    if name == "sqlite":
        return '[storage]\nbackend = "sqlite"\npath = "haip.db"\n'
    return f'[storage]\nbackend = "postgres"\nurl = "{found.database(name)}"\n'


def echo_latency(scale: Scale, found: Clusters) -> dict[str, Series]:
    """p50, p90 and p99 (ms) and the server's CPU µs per turn, per backend; one server each running
    throughout, rounds interleaved."""
    results = {name: Series() for name in ("p50", "p90", "p99", "cpu")}
    names = ["memory", "sqlite", *found.servers]
    with ExitStack() as stack:
        servers = {name: stack.enter_context(haip_server(SERVER, extra=storage_toml(name, found))) for name in names}
        for _ in range(scale.rounds):
            for name in names:
                server = servers[name]
                samples, cpu = anyio.run(echo_trips, server, scale.echo_trips)
                for p in (50, 90, 99):
                    results[f"p{p}"].add(name, percentile(samples, p) * 1000)
                results["cpu"].add(name, cpu * 1e6)
    return results


# -- 4: the writer under full load ---------------------------------------------------------------------------

#: Part 4's load: connections, each in a transaction of its own with the echo agent, and messages in flight.
BUSY_LOAD = {"conns": 64, "inflight": 4, "warmup": 1}
#: How often part 4 reads each server's pending writes during its load.
BUSY_POLL = 0.25


#: What part 4 found when it was added, before the writers changed (not measured by this file's code).
BUSY_NOTE = (
    "Why part 4 exists (2026-12-06): both durable stores fell behind under this load and never caught up. "
    "PostgreSQL's writer ran about seven statements per transaction in a batch, each waiting for the busy "
    "event loop's turn: at about 5,400 round trips/s its writes waiting grew by about 36,000 a second "
    "(724,000 after 20 s; 13.5 s to catch up after). SQLite's wrote each row by `executemany`, whose every "
    "row gives up the GIL, which the writer thread then waits for while the event loop's thread is busy "
    "(10,000 rows: 10.9 s instead of 17 ms): it reached `max_pending_writes` within 3 s and dropped the "
    "oldest writes for the rest of the load. Now a PostgreSQL batch is eight set-based statements whatever "
    "it holds, batches go up to 50,000 writes or 16 million characters of bodies, and SQLite writes each "
    "kind of row, and reads a transaction's events, in one statement over a JSON array."
)


def busy_round(server: Server, seconds: float) -> dict[str, float]:
    """One echo load as fast as the server answers, with the store's pending writes read meanwhile:
    round trips/s, the most writes waiting at once, those waiting at the end of the load, the writes
    dropped (``storage.max_pending_writes``, default 100,000) and the seconds to catch up after."""
    spec = {**BUSY_LOAD, "seconds": seconds, "mode": "echo", "url": server.ws(), "token": server.token}
    dropped_before = stores(server.port)["single"].get("writes_dropped", 0)
    done: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: done.append(load(LOAD, spec, timeout=seconds + 120)))
    worker.start()
    pending: list[int] = []
    while worker.is_alive():  # polling /health: another process, no event to wait on
        pending.append(int(stores(server.port)["single"].get("pending_writes", 0)))
        worker.join(BUSY_POLL)
    if not done:
        raise RuntimeError("part 4's load failed (see its stderr above)")
    at_end = pending[-1] if pending else 0
    behind, _ = drain(server.port)
    dropped = stores(server.port)["single"].get("writes_dropped", 0) - dropped_before
    return {
        "rate": done[0]["rate"],
        "peak": max(pending, default=0),
        "end": at_end,
        "dropped": dropped,
        "behind": behind,
    }


def busy_writers(scale: Scale, found: Clusters) -> dict[str, Series]:
    """Part 4 per backend (memory for the rate without a store), one server each up throughout, rounds
    interleaved."""
    results = {name: Series() for name in ("rate", "peak", "end", "dropped", "behind")}
    names = ["memory", "sqlite", *found.servers]
    with ExitStack() as stack:
        servers = {name: stack.enter_context(haip_server(SERVER, extra=storage_toml(name, found))) for name in names}
        for _ in range(scale.rounds):
            for name in names:
                for figure, value in busy_round(servers[name], scale.busy_seconds).items():
                    results[figure].add(name, value)
    return results


# -- 3: REST reads at 1 M events -----------------------------------------------------------------------------


def body_template() -> str:
    """A stored MESSAGE_PART as the store writes it, with ``@ID`` and ``@T`` where each row differs."""
    event = Event("MESSAGE_PART", {"message_id": "msg-@T", "text": TEXT}, Channel.AGENT, run_id="run-@T", id="@ID")
    return event_to_json(event)


def owner_sql() -> str:
    """The owner of transaction ``t`` (SQL): TX_PER_USER each, the dev user's in the middle of the range."""
    return f"CASE WHEN t / {TX_PER_USER} = $1 THEN '{DEV_USER}' ELSE 'user-' || (t / {TX_PER_USER}) END"


async def fill_postgres(url: str, events: int) -> None:
    """``events`` events in transactions of PER_TX, with their transaction and member rows, by SQL."""
    import asyncpg

    transactions = events // PER_TX
    dev_index = transactions // TX_PER_USER // 2
    db = await asyncpg.connect(url)
    try:
        await migrate(db, "bench", lock_timeout=10)
        base = time.time() - transactions
        await db.execute(
            f"""INSERT INTO haip_transactions
                SELECT 'tx-' || t, {owner_sql()}, ARRAY['echo'], 'ended', NULL, $2 + t, $2 + t + 0.5, {PER_TX}, 'done'
                FROM generate_series(0, $3 - 1) AS t""",
            dev_index,
            base,
            transactions,
        )
        await db.execute("INSERT INTO haip_members SELECT owner, id, updated_at FROM haip_transactions")
        await db.execute(
            f"""INSERT INTO haip_events
                SELECT 'tx-' || t, s, 'ev-' || t || '-' || s, replace(replace($1, '@ID', 'ev-' || t || '-' || s),
                       '@T', t::text)
                FROM generate_series(0, $2 - 1) AS t, generate_series(1, {PER_TX}) AS s""",
            body_template(),
            transactions,
        )
        await db.execute("ANALYZE")
    finally:
        await db.close()


def fill_sqlite(path: Path, events: int) -> None:
    """The same rows in SQLite's schema (made by opening the store once), in one transaction."""
    anyio.run(_open_and_close, SqliteStore(path))
    transactions = events // PER_TX
    dev_index = transactions // TX_PER_USER // 2
    template, base = body_template(), time.time() - transactions
    owners = [DEV_USER if t // TX_PER_USER == dev_index else f"user-{t // TX_PER_USER}" for t in range(transactions)]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO transactions VALUES (?, ?, ?, 'ended', NULL, ?, ?, ?, 'done', ?)",  # (reserved_tseq: its last)
            [(f"tx-{t}", owners[t], '["echo"]', base + t, base + t + 0.5, PER_TX, PER_TX) for t in range(transactions)],
        )
        db.executemany("INSERT INTO members VALUES (?, ?)", [(owners[t], f"tx-{t}") for t in range(transactions)])
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?)",
            (
                (f"tx-{t}", s, template.replace("@ID", f"ev-{t}-{s}").replace("@T", str(t)))
                for t in range(transactions)
                for s in range(1, PER_TX + 1)
            ),
        )
        db.execute("COMMIT")
        db.execute("ANALYZE")
    finally:
        db.close()


async def _open_and_close(store: Store) -> None:
    async with store:
        pass


def dev_transaction(events: int) -> str:
    """One of the dev user's transactions (they are in the middle of the id range)."""
    return f"tx-{events // PER_TX // TX_PER_USER // 2 * TX_PER_USER + TX_PER_USER // 2}"


class Reader:
    """Timed GETs on one kept-alive HTTP connection to a served runtime, as the dev user."""

    def __init__(self, server: Server) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {server.token}"}

    def get(self, path: str) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        self.connection.request("GET", path, headers=self.headers)
        response = self.connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        data: dict[str, Any] = json.loads(body)
        return elapsed, data

    def paths(self, events: int) -> dict[str, str]:
        """The requests timed: the list's first page, its third (through two cursors), a middle page of events."""
        first = f"/haip/transactions?limit={PAGE}"
        later = first
        for _ in range(2):
            cursor = self.get(later)[1]["next_cursor"]
            later = f"{first}&cursor={quote(cursor)}"
        tx = dev_transaction(events)
        return {
            "list, first page": first,
            "list, third page (cursor)": later,
            "events, middle page": f"/haip/transactions/{tx}/events?after={PER_TX // 2}&limit=100",
        }

    def check(self, label: str, data: dict[str, Any]) -> None:
        """The answer is the real one: a full page of the dev user's transactions, or events 501-600."""
        if label.startswith("list"):
            ok = len(data["transactions"]) == PAGE and all(t["owner"] == DEV_USER for t in data["transactions"])
        else:
            ok = [e["tseq"] for e in data["events"]] == list(range(PER_TX // 2 + 1, PER_TX // 2 + 101))
        if not ok:
            raise RuntimeError(f"{label}: not the page expected: {str(data)[:300]}")

    def close(self) -> None:
        self.connection.close()


def rest_reads(scale: Scale, found: Clusters, tmp: Path) -> dict[tuple[str, int, str], tuple[Series, Series]]:
    """{(backend, events, request): (p50 ms, p99 ms)}: four servers up at once, rounds interleaved."""
    sizes = (SMALL_EVENTS, scale.big_events)
    configs: dict[tuple[str, int], str] = {}
    for events in sizes:
        start = time.monotonic()
        path = tmp / f"read-{events}.db"
        fill_sqlite(path, events)
        configs["sqlite", events] = f'[storage]\nbackend = "sqlite"\npath = "{path}"\n'
        filled = time.monotonic()
        url = found.database("postgres")
        anyio.run(fill_postgres, url, events)
        log(f"{events:,} events filled: SQLite in {filled - start:.1f} s, PostgreSQL {time.monotonic() - filled:.1f} s")
        configs["postgres", events] = f'[storage]\nbackend = "postgres"\nurl = "{url}"\n'
    results: dict[tuple[str, int, str], tuple[Series, Series]] = {}
    with ExitStack() as stack:
        readers: dict[tuple[str, int], tuple[Reader, dict[str, str]]] = {}
        for key, toml in configs.items():
            reader = Reader(stack.enter_context(haip_server(SERVER, extra=toml)))
            stack.callback(reader.close)
            readers[key] = reader, reader.paths(key[1])
        for _ in range(scale.rounds):
            for (backend, events), (reader, paths) in readers.items():
                reader.connection.close()  # the server closes one idle 5 s (uvicorn); the next GET reconnects
                for label, path in paths.items():
                    for _ in range(5):  # warm: the pool's connections, the page cache, the server's code
                        reader.check(label, reader.get(path)[1])
                    samples = [reader.get(path)[0] for _ in range(scale.reads)]
                    p50, p99 = results.setdefault((backend, events, label), (Series(), Series()))
                    p50.add("", percentile(samples, 50) * 1000)
                    p99.add("", percentile(samples, 99) * 1000)
    return results


#: Whose versions a results file gives.
PACKAGES = ("haip-runtime", "asyncpg", "uvicorn", "websockets")

# -- the report ----------------------------------------------------------------------------------------------


def write_table(writes: dict[str, Series]) -> list[str]:
    rate, cpu, rate100, cpu100 = (writes[k] for k in ("rate", "cpu", "rate100", "cpu100"))
    lines = [
        "| store | one batch: events/s (rounds) | CPU ms / 1,000 events | batches of 100: events/s (rounds) "
        "| CPU ms / 1,000 events | vs sqlite (one batch, batches of 100) |",
        "|---|---|---|---|---|---|",
    ]
    for name in rate.figures:
        versus = (
            f"{rate.median(name) / rate.median('sqlite'):.2f}x, {rate100.median(name) / rate100.median('sqlite'):.2f}x"
        )
        lines.append(
            f"| {name} | {rate.median(name):,.0f} ({rate.spread(name)}) | {cpu.median(name):.1f} "
            f"| {rate100.median(name):,.0f} ({rate100.spread(name)}) | {cpu100.median(name):.1f} | {versus} |"
        )
    return lines


def echo_table(echo: dict[str, Series]) -> list[str]:
    lines = [
        "| backend | p50 ms | p90 ms | p99 ms | added to memory's p50, p99 | p99 per round "
        "| server CPU µs per turn | added to memory's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in echo["p50"].figures:
        added = [
            statistics.median(a - b for a, b in zip(echo[k].figures[name], echo[k].figures["memory"], strict=True))
            for k in ("p50", "p99", "cpu")
        ]
        rounds = ", ".join(f"{v:.2f}" for v in echo["p99"].figures[name])
        lines.append(
            f"| {name} | {echo['p50'].median(name):.2f} | {echo['p90'].median(name):.2f} "
            f"| {echo['p99'].median(name):.2f} | {added[0]:+.2f} ms, {added[1]:+.2f} ms | {rounds} "
            f"| {echo['cpu'].median(name):.0f} | {added[2]:+.0f} |"
        )
    return lines


def busy_table(busy: dict[str, Series]) -> list[str]:
    rate = busy["rate"]
    lines = [
        "| backend | round trips/s (rounds) | against memory | most writes waiting (rounds) |"
        " waiting at the load's end |"
        " writes dropped (all rounds) | caught up after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in rate.figures:
        ratio = statistics.median(a / b for a, b in zip(rate.figures[name], rate.figures["memory"], strict=True))
        peaks = ", ".join(f"{value:,.0f}" for value in busy["peak"].figures[name])
        lines.append(
            f"| {name} | {rate.median(name):,.0f} ({rate.spread(name)}) | {ratio:.2f}x | {peaks} |"
            f" {busy['end'].median(name):,.0f} | {sum(busy['dropped'].figures[name]):,.0f} |"
            f" {busy['behind'].median(name):.2f} s |"
        )
    return lines


def round_ratios(big: Series, small: Series) -> list[float]:
    """Each round's big-database figure over the small one's (the two measured one after the other)."""
    return [b / a for b, a in zip(big.figures[""], small.figures[""], strict=True)]


def read_table(reads: dict[tuple[str, int, str], tuple[Series, Series]], big: int) -> list[str]:
    lines = [
        f"| request | backend | p50 / p99 ms at {SMALL_EVENTS:,} events | p50 / p99 ms at {big:,} events "
        "| ratio p50 (rounds), p99: big / small |",
        "|---|---|---|---|---|",
    ]
    labels = dict.fromkeys(label for _, _, label in reads)
    for label in labels:
        for backend in ("sqlite", "postgres"):
            small50, small99 = reads[backend, SMALL_EVENTS, label]
            big50, big99 = reads[backend, big, label]
            p50s, p99s = round_ratios(big50, small50), round_ratios(big99, small99)
            lines.append(
                f"| {label} | {backend} | {small50.median(''):.2f} / {small99.median(''):.2f} "
                f"| {big50.median(''):.2f} / {big99.median(''):.2f} | {statistics.median(p50s):.2f}x "
                f"({min(p50s):.2f}–{max(p50s):.2f}x), {statistics.median(p99s):.2f}x |"
            )
    return lines


#: What a py-spy profile of the served runtime showed; kept with the code, revise it when the store changes.
PROFILE_NOTE = (
    "What a profile showed (py-spy on the server answering the first list page from PostgreSQL, 2026-12-06): "
    "the largest single cost was asyncpg's `Connection.reset()`, which the pool ran on every release (a "
    "sixth of the samples), so each store read made a second round trip; a list page is 1 + 2 reads per "
    "transaction listed (its first 40 and last 200 events). Replacing `reset` by a no-op took a 40-event "
    "read from about 170 to 130 µs (in-process, 3 runs): about 0.3 ms per list page of seven reads. The "
    "store now passes such a no-op (`create_pool(reset=...)`: it changes no session state); the rest of "
    "PostgreSQL's time over SQLite is the queries' own round trips to another process. Parsing the events read "
    "(`event_from_json`, `fastjson.loads`) is the next largest cost, on both backends."
)


def summary(
    writes: dict[str, Series],
    echo: dict[str, Series],
    reads: dict[tuple[str, int, str], tuple[Series, Series]],
    big: int,
) -> list[str]:
    """What this run's tables say, in three lines (computed, so it stays true of the run that wrote it)."""
    rate, rate100 = writes["rate"], writes["rate100"]
    stores = [name for name in rate.figures if name != "sqlite"]
    stored = "; ".join(f"{name} {rate.median(name):,.0f} ({rate100.median(name):,.0f})" for name in stores)

    def added(name: str, measure: str) -> float:
        figures = echo[measure].figures
        return statistics.median(a - b for a, b in zip(figures[name], figures["memory"], strict=True))

    others = [name for name in echo["p99"].figures if name != "memory"]
    turns = ", ".join(f"{name} {added(name, 'p50'):+.2f} / {added(name, 'p99'):+.2f} ms" for name in others)
    ratios = [
        statistics.median(round_ratios(big50, reads[backend, SMALL_EVENTS, label][0]))
        for (backend, events, label), (big50, _) in reads.items()
        if events == big
    ]
    return [
        f"- Events stored per second, one batch (batches of 100): sqlite {rate.median('sqlite'):,.0f} "
        f"({rate100.median('sqlite'):,.0f}); {stored}.",
        f"- Added to the echo round trip's p50 / p99 over the memory store: {turns} (medians of per-round "
        "differences; other processes on this machine move a round's p99 by milliseconds: see the rounds).",
        f"- REST reads at {big:,} events against {SMALL_EVENTS:,}: p50 ratios (medians of per-round ratios) "
        f"{min(ratios):.2f}x to {max(ratios):.2f}x, over both backends and the three requests.",
    ]


def busy_summary(busy: dict[str, Series]) -> list[str]:
    stored = [name for name in busy["rate"].figures if name != "memory"]
    kept = "; ".join(
        f"{name} {busy['rate'].median(name):,.0f}/s, at most {max(busy['peak'].figures[name]):,.0f} writes waiting, "
        f"{sum(busy['dropped'].figures[name]):,.0f} dropped"
        for name in stored
    )
    return [f"- Under full echo load (memory: {busy['rate'].median('memory'):,.0f} round trips/s): {kept}."]


def report(scale: Scale, short: bool, started: float, found: Clusters, sections: dict[str, list[str]]) -> str:
    settings = [f"- {name}: {text}" for name, text in found.settings.items()]
    lines = [
        "# The PostgreSQL store against SQLite",
        "",
        f"Written by `bench/store.py{' --short' if short else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {(time.monotonic() - started) / 60:.1f} minutes. {machine(PACKAGES)}, SQLite {sqlite3.sqlite_version}. "
        f"Servers pinned to core(s) {sorted(SERVER)}, "
        f"this process (the client, and the store in part 1) to {sorted(LOAD)}; PostgreSQL unpinned. "
        f"{scale.rounds} rounds, interleaved (A, B, A, B); each figure is the median of the per-round figures. "
        "The machine is shared with other engineers' test runs at the same time: compare the columns of one run, "
        "not runs with each other.",
        "",
    ]
    if short:
        lines += [
            f"**Short mode** (`--short`): it proves the bench runs; its numbers are too small to judge "
            f"({scale.write_events:,} events written, {scale.echo_trips} echo turns, {scale.big_events:,} "
            "events in place of 1,000,000).",
            "",
        ]
    lines += ["## In short", "", *sections["summary"], ""]
    lines += ["PostgreSQL servers measured:", "", *settings, *[f"- {note}" for note in found.notes], ""]
    lines += [
        f"## 1. Events stored per second ({scale.write_events:,} events, the store alone)",
        "",
        *sections["writes"],
        "",
        f"{scale.write_events:,} MESSAGE_PART events (about 60 characters of text, {len(body_template())} bytes "
        'stored) over 4 transactions, `store.append` each, then `await store.flush()`: "one batch" is what '
        'the writer takes at once (one database transaction); "batches of 100" flushes every 100 appends (a '
        "commit each, as a runtime writing a few turns per `flush_interval` does). A fresh file or database "
        "every round. CPU is this process's (`time.process_time`): the SQLite store writes in a worker thread "
        "of the process, so it counts the database's own work too; PostgreSQL's work is in its own processes "
        "and not counted. The test cluster runs with `fsync=off` and `full_page_writes=off` (a crash of the "
        "machine, not of the server, could lose commits); the `fsync=on` cluster has PostgreSQL's defaults "
        "(`fsync`, `full_page_writes` and `synchronous_commit` on), as in production. SQLite runs as the "
        "store sets it: WAL, `synchronous=NORMAL` (no fsync per commit either; only at checkpoints).",
        "",
        f"## 2. The echo round trip per backend ({scale.echo_trips} sequential turns per round)",
        "",
        *sections["echo"],
        "",
        "A HaipClient sends MESSAGE to the echo agent and waits for RUN_FINISHED; each backend is its own "
        "`haip-runtime serve` (bench/common.py's config plus `[storage]`), all up throughout. The store "
        "never delays a turn directly (writes are queued, batched each `flush_interval`, 50 ms): what it adds "
        "is the CPU of queueing and, for PostgreSQL, the writer's asyncpg work in the same event loop; "
        "for SQLite, a worker thread taking the GIL. So the p50 stays, and the tail is where a store shows: "
        "a turn that arrives while the writer handles a batch (every 50 ms here, some 300 events, on the "
        "order of a millisecond of CPU at part 1's rate) waits for it. The server's CPU per turn (its "
        "`/proc/<pid>/stat` user and system time over the timed turns) is the steadier measure on a shared "
        "machine; PostgreSQL's "
        "own processes are not in it. A turn stores six events (the user's MESSAGE, RUN_STARTED, "
        "MESSAGE_START, MESSAGE_PART, MESSAGE_END, RUN_FINISHED).",
        "",
        "## 3. REST reads as the store grows",
        "",
        *sections["reads"],
        "",
        f"The databases are filled directly (PostgreSQL: `INSERT ... SELECT generate_series` then `ANALYZE`; "
        f"SQLite: one `executemany` transaction) in transactions of {PER_TX:,} MESSAGE_PART events, "
        f"{TX_PER_USER} transactions per user, so the dev user's share is the same at every size and only the "
        f"rest of the database grows. The list asks for {PAGE} per page (each listed transaction also reads its "
        "first 40 and last 200 events for its title and preview); the third page is reached through "
        "`next_cursor` once and then requested repeatedly. Events: `after=500&limit=100` in one of the dev "
        f"user's transactions. {scale.reads} requests per request kind per round, on a kept-alive connection, "
        "after 5 unmeasured ones; every answer is checked (a full page of the dev user's, tseq 501-600). "
        "Warm caches: the databases fit in this machine's memory. The ratio is the median of the per-round "
        "ratios (each round reads the small database, then the big one); PostgreSQL's processes are not "
        "pinned and compete with the machine's other load, so its absolute figures move more between runs.",
        "",
        PROFILE_NOTE,
        "",
        f"## 4. The writer under full load ({scale.busy_seconds:g} s of echo load per round)",
        "",
        *sections["busy"],
        "",
        f"A load process pinned to core(s) {sorted(LOAD)} (bench/load.py `echo`: {BUSY_LOAD['conns']} "
        f"connections, each in a transaction of its own with the echo agent, {BUSY_LOAD['inflight']} messages "
        "in flight on each) drives each server as fast as it answers, after "
        f"{BUSY_LOAD['warmup']} s of warm-up; the server's core is full. Meanwhile the bench reads the store's "
        f"`pending_writes` from `/health` every {BUSY_POLL} s. The store must write what the load makes "
        "(six events and a record save a round trip) while its event loop is busy: a writer that falls "
        "behind shows as writes waiting that grow through the load, then as writes dropped past "
        "`storage.max_pending_writes` (the default, 100,000, here) and a long catch-up after. "
        '"Caught up after": seconds from the load\'s end until nothing waits (`/health` polled).',
        "",
        BUSY_NOTE,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="well under a minute, to prove the bench runs")
    parser.add_argument("--output", type=Path, help="default: bench/STORE-RESULTS.md (--short: STORE-RESULTS-short.md)")
    args = parser.parse_args()
    scale = SHORT if args.short else FULL
    output = args.output or ROOT / "bench" / ("STORE-RESULTS-short.md" if args.short else "STORE-RESULTS.md")
    started = time.monotonic()
    pin(os.getpid(), LOAD)
    logging.getLogger("haip_runtime.store.migrations").setLevel(logging.ERROR)  # "migrated": every new database
    sections: dict[str, list[str]] = {}
    with clusters() as found, tempfile.TemporaryDirectory(prefix="haip-bench-store-") as tmp:
        log("1: events stored per second")
        writes = write_rates(scale, found, Path(tmp))
        log("2: echo round trips")
        echo = echo_latency(scale, found)
        log("3: REST reads")
        reads = rest_reads(scale, found, Path(tmp))
        log("4: the writer under full load")
        busy = busy_writers(scale, found)
    sections["writes"], sections["echo"] = write_table(writes), echo_table(echo)
    sections["busy"] = busy_table(busy)
    sections["reads"] = read_table(reads, scale.big_events)
    sections["summary"] = summary(writes, echo, reads, scale.big_events) + busy_summary(busy)
    text = report(scale, args.short, started, found, sections)
    output.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
