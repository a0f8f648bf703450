"""Stores: the same behaviour from memory, a real SQLite file and a real PostgreSQL; SQLite across a reopen."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from haip_runtime.config.models import StorageConfig
from haip_runtime.protocol.envelope import Event
from haip_runtime.store import (
    MemoryStore,
    PostgresStore,
    SessionRecord,
    SqliteStore,
    Store,
    TransactionRecord,
    TransactionState,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        backend = PostgresStore(StorageConfig(backend="postgres", url=url))
    else:
        backend = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "haip.db")
    async with backend:
        yield backend


def record(id: str, owner: str = "ann", updated_at: float = 1000.0, **changes: object) -> TransactionRecord:
    fields: dict[str, object] = {
        "id": id,
        "owner": owner,
        "agents": ("echo",),
        "members": (owner,),
        "state": TransactionState.OPEN,
        "created_at": 900.0,
        "updated_at": updated_at,
        **changes,
    }
    return TransactionRecord(**fields)  # type: ignore[arg-type]


def event(tx: str, tseq: int, text: str = "") -> Event:
    return Event("MESSAGE", {"text": text or f"m{tseq}"}, channel="USER", transaction=tx, tseq=tseq, run_id="r")


async def test_events_come_back_in_tseq_order_with_their_fields_and_paged(store: Store) -> None:
    originals = [event("t1", tseq) for tseq in range(1, 8)]
    for original in originals:
        store.append(original)
    store.append(event("t2", 1))
    first = await store.events("t1", after=0, limit=3)
    rest = await store.events("t1", after=3, limit=100)
    assert [e.tseq for e in first] == [1, 2, 3] and [e.tseq for e in rest] == [4, 5, 6, 7]
    back = first[0]
    assert (back.id, back.type, back.payload, back.channel, back.run_id, back.transaction, back.ts) == (
        originals[0].id,
        "MESSAGE",
        {"text": "m1"},
        "USER",
        "r",
        "t1",
        originals[0].ts,
    )
    assert await store.events("nope") == []


async def test_the_tail_is_the_last_events_in_order(store: Store) -> None:
    for tseq in range(1, 8):
        store.append(event("t1", tseq))
    store.append(event("t2", 1))
    assert [e.tseq for e in await store.tail("t1", limit=3)] == [5, 6, 7]
    assert [e.payload for e in await store.tail("t1", limit=100)][0] == {"text": "m1"}
    assert await store.tail("t1", limit=0) == [] and await store.tail("nope", limit=5) == []


async def test_events_are_counted_between_two_numbers_across_gaps(store: Store) -> None:
    for tseq in [1, 2, 3, 4100, 4101]:  # (a crash's reserved numbers between 3 and 4100)
        store.append(event("t1", tseq))
    assert await store.count_events("t1", after=0, upto=4101) == 5
    assert await store.count_events("t1", after=2, upto=4100) == 2
    assert await store.count_events("t1", after=4101, upto=9000) == 0
    assert await store.count_events("no", after=0, upto=9) == 0


async def test_a_records_reservation_is_its_latest_saves(store: Store) -> None:
    """A live transaction reserves numbers ahead; put away, it saves its last as the reservation: the
    later save wins (given back), unlike ``last_tseq``."""
    store.save_transaction(record("t1", last_tseq=3, reserved_tseq=4099))
    reserved = await store.transaction("t1")
    store.save_transaction(record("t1", last_tseq=5, reserved_tseq=5))
    await store.flush()
    put_away = await store.transaction("t1")
    assert reserved is not None and reserved.reserved_tseq == 4099
    assert put_away is not None and (put_away.last_tseq, put_away.reserved_tseq) == (5, 5)


async def test_a_user_lists_what_they_started_or_joined_newest_first_in_pages(store: Store) -> None:
    store.save_transaction(record("a", updated_at=1.0))
    store.save_transaction(record("b", updated_at=3.0))
    store.save_transaction(record("c", owner="bob", updated_at=2.0))
    store.save_transaction(record("c", owner="bob", updated_at=2.0, members=("ann",)))  # ann joined c
    store.save_transaction(record("d", owner="bob", updated_at=4.0))
    page = await store.transactions_of("ann", limit=2)
    assert [r.id for r in page] == ["b", "c"]
    assert set((await store.transaction("c")).members) == {"ann", "bob"}  # type: ignore[union-attr]
    rest = await store.transactions_of("ann", limit=2, before=(page[-1].updated_at, page[-1].id))
    assert [r.id for r in rest] == ["a"]
    assert [r.id for r in await store.transactions_of("bob", limit=10)] == ["d", "c"]
    assert await store.transaction("zzz") is None


async def test_session_records_are_kept_forgotten_and_pruned(store: Store) -> None:
    store.save_session(SessionRecord("s1", "ann", "epoch-1", ("t1",), time.time()))
    store.save_session(SessionRecord("s2", "ann", "epoch-1", (), time.time() - 7200))
    store.save_session(SessionRecord("s3", "ann", "epoch-1", (), time.time()))
    store.forget_session("s3")
    store.prune_sessions(time.time() - 3600)
    kept = await store.session("s1")
    assert kept is not None and (kept.id, kept.user, kept.epoch, kept.transactions) == ("s1", "ann", "epoch-1", ("t1",))
    assert await store.session("s2") is None and await store.session("s3") is None


async def test_sqlite_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "haip.db"
    async with SqliteStore(path) as first:
        first.save_transaction(record("t1", state=TransactionState.ENDED, end_reason="done", last_tseq=2))
        first.append(event("t1", 1))
        first.append(event("t1", 2, "ünïcode ✓"))
    async with SqliteStore(path) as second:
        assert [e.payload for e in await second.events("t1")] == [{"text": "m1"}, {"text": "ünïcode ✓"}]
        again = await second.transaction("t1")
    assert again is not None and again.state is TransactionState.ENDED and again.end_reason == "done"
    assert again.last_tseq == 2 and again.agents == ("echo",)


async def test_a_sqlite_file_from_before_reservations_gets_the_column(tmp_path: Path) -> None:
    """Files of schema version 1 (before 2026-12-07) have no ``reserved_tseq``: it is added, 0 (nothing
    reserved), and the file is version 2 from then on."""
    import sqlite3

    path = tmp_path / "haip.db"
    async with SqliteStore(path) as first:
        first.save_transaction(record("t1", last_tseq=2))
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE transactions DROP COLUMN reserved_tseq")
    old.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    old.commit()
    old.close()
    async with SqliteStore(path) as second:
        kept = await second.transaction("t1")
        second.save_transaction(record("t1", last_tseq=3, reserved_tseq=4099))
    async with SqliteStore(path) as third:
        again = await third.transaction("t1")
    assert kept is not None and (kept.last_tseq, kept.reserved_tseq) == (2, 0)
    assert again is not None and again.reserved_tseq == 4099
    with sqlite3.connect(path) as db:  # a runtime of version 1 refuses it now, rather than write short rows
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)


async def test_sqlite_reads_records_and_a_users_list_on_indexes_in_one_query(tmp_path: Path) -> None:
    """A record's members come with it, on ``members_by_tx``: before it, each record read scanned every
    member row (a list of 50 took 120 ms at 20,000 transactions). A file made before the index gets it."""
    import sqlite3

    from haip_runtime.store.sqlite import _RECORD

    path = tmp_path / "haip.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX members_by_tx")
    async with SqliteStore(path) as store:
        store.save_transaction(record("t1", members=("zoë", "ann", "b\x00ob")))
        store.save_transaction(record("t2", members=("ann",), updated_at=2000.0))
        kept = await store.transaction("t1")
        listed = await store.transactions_of("ann", limit=10)
    with sqlite3.connect(path) as db:
        plans = [
            [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", args)]
            for query, args in [
                (f"{_RECORD} WHERE t.id = ?", ("t1",)),
                (f"{_RECORD} JOIN members m ON t.id = m.tx WHERE m.user = ? LIMIT ?", ("ann", 10)),
            ]
        ]
    assert kept is not None and kept.members == ("ann", "b\x00ob", "zoë")
    assert [(r.id, r.members) for r in listed] == [("t2", ("ann",)), ("t1", ("ann", "b\x00ob", "zoë"))]
    for plan in plans:
        assert any("members_by_tx" in step for step in plan), plan
        assert not any(step.startswith("SCAN") for step in plan), plan


async def test_reads_see_writes_queued_just_before_them(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "haip.db", flush_interval=5) as store:  # the timer alone would wait 5 s
        for tseq in range(1, 2001):
            store.append(event("t", tseq))
        assert len(await store.events("t", limit=5000)) == 2000


async def test_a_database_of_another_schema_version_is_refused_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    from haip_runtime.exceptions import ConfigError

    path = tmp_path / "old.db"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        db.execute("DROP INDEX members_by_tx")  # as if version 99 had none: refused, it must not be made
    with pytest.raises(ConfigError) as caught:
        async with SqliteStore(path):
            pass
    assert "schema version 99" in str(caught.value) and "\n" not in str(caught.value)
    with sqlite3.connect(path) as db:  # refused before anything in it changed
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'members_by_tx'").fetchone() == (0,)


async def test_the_memory_store_forgets_the_least_recent_transactions_past_its_bound() -> None:
    store = MemoryStore(max_events=10)
    for tx in ("old", "mid", "new"):
        store.save_transaction(record(tx))
        for tseq in range(1, 5):
            store.append(event(tx, tseq))
    assert await store.events("old") == [] and await store.transaction("old") is None
    assert len(await store.events("mid")) == 4 and len(await store.events("new")) == 4


def test_the_agents_history_is_rebuilt_from_the_log_with_tool_calls_and_edits() -> None:
    from haip_runtime.conversation.history import history_from_events

    def e(type: str, payload: dict[str, object], channel: str = "AGENT", run_id: str | None = "r") -> Event:
        return Event(type, payload, channel=channel, run_id=run_id)

    log = [
        e("MESSAGE", {"text": "hi", "author": "ann", "message_id": "u1"}, channel="USER", run_id=None),
        e("MESSAGE_UPDATE", {"text": "hello", "message_id": "u1"}, channel="USER", run_id=None),
        e("TOOL_CALL", {"call_id": "c1", "tool": "demo.add", "params": {"a": 1}, "caller": "bot"}),
        e("TOOL_DONE", {"call_id": "c1", "status": "OK", "result": {"content": [{"type": "text", "text": "2"}]}}),
        e("TOOL_CALL", {"call_id": "c2", "tool": "demo.add", "params": {}, "caller": "ann"}, run_id=None),  # a member's
        e("TOOL_DONE", {"call_id": "c2", "status": "OK", "result": {"content": []}}, run_id=None),
        e("MESSAGE_START", {"message_id": "a1", "author": "bot"}),
        e("MESSAGE_PART", {"message_id": "a1", "text": "it is "}),
        e("MESSAGE_PART", {"message_id": "a1", "text": "2"}),
        e("MESSAGE_END", {"message_id": "a1"}),
    ]
    entries = [(h.role, h.author, h.text, h.call_id) for h in history_from_events(log)]
    assert entries == [
        ("user", "ann", "hello", None),
        ("tool_call", "bot", "", "c1"),
        ("tool_result", "demo.add", "2", "c1"),
        ("agent", "bot", "it is 2", None),
    ]


def test_the_agents_history_keeps_its_bounds_by_count_and_by_bytes() -> None:
    from haip_runtime.conversation.history import History
    from haip_runtime.llm.provider import HistoryEntry

    def entry(text: str) -> HistoryEntry:
        return HistoryEntry("user", "ann", text, text[:8])

    history = History([entry("a" * 10)] * 3, maxlen=4, max_bytes=100)
    history.append(entry("b" * 10))
    history.append(entry("c" * 10))  # past 4 entries: the oldest goes
    assert [e.text[0] for e in history] == ["a", "a", "b", "c"] and history.bytes == 40
    history[0] = entry("e" * 30)  # an edit
    assert history.bytes == 60
    history.append(entry("d" * 90))  # the deque drops the edited one; past 100 bytes, the oldest go until it fits
    assert [e.text[0] for e in history] == ["c", "d"] and history.bytes == 100
    history.append(entry("x" * 500))  # the newest always stays, whatever its size
    assert [e.text[0] for e in history] == ["x"] and history.bytes == 500


async def test_open_owned_lists_the_open_transactions_a_user_started_least_recently_saved_first(
    store: Store,
) -> None:
    store.save_transaction(record("a1", owner="ann", updated_at=1003.0))
    store.save_transaction(record("a2", owner="ann", state=TransactionState.ENDED, updated_at=1000.0))
    store.save_transaction(record("b1", owner="bob", members=("bob", "ann")))
    store.save_transaction(record("a3", owner="ann", updated_at=1001.0))
    store.save_transaction(record("a4", owner="ann", updated_at=1002.0))
    assert await store.open_owned("ann", limit=10) == ["a3", "a4", "a1"]
    assert await store.open_owned("ann", limit=1) == ["a3"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_read_does_not_wait_out_the_batching_interval(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Reads see what was queued before them (they flush first); the batch then gathering goes at once
    rather than at the end of ``flush_interval_seconds`` (every TRANSACTION_START reads the user's open
    transactions: it waited 50 ms on the defaults)."""
    interval = 5.0  # (the most the config allows)
    if backend == "postgres":
        config = StorageConfig(backend="postgres", url=request.getfixturevalue("postgres_url"))
        store: Store = PostgresStore(config.model_copy(update={"flush_interval_seconds": interval}))
    else:
        store = SqliteStore(tmp_path / "haip.db", flush_interval=interval)
    async with store:
        await store.open_owned("ann", limit=1)  # the writer's first wake-up is behind it
        store.save_transaction(record("t1"))
        for _ in range(3):  # the writer wakes up for it and starts gathering a batch
            await anyio.lowlevel.checkpoint()
        with anyio.fail_after(interval / 2):
            owned = await store.open_owned("ann", limit=10)
    assert owned == ["t1"]
