"""The SQLite writer never dies and never loses a write silently: a row it cannot store costs
itself only; while the file cannot be written (here: full, via ``max_page_count``) writes wait,
are retried with backoff and are bounded; closing never waits on a store that cannot write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from haip_runtime.exceptions import ConfigError, StorageError
from haip_runtime.store import SqliteStore, batching
from haip_runtime.store.base import StorageState
from tests.store.test_postgres import text_of
from tests.store.test_store import event, record
from tests.support.damage import damage

pytestmark = pytest.mark.anyio


def fill(store: SqliteStore, pages: int | None = None) -> None:
    writer = store._writer
    assert writer is not None
    size = writer.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
    writer.execute(f"PRAGMA max_page_count = {size}")


async def test_a_row_sqlite_cannot_bind_costs_itself_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with SqliteStore(tmp_path / "haip.db") as store:
        store.save_transaction(record("t1"))
        for tseq in range(1, 11):
            store.append(event("t1", 2**64 if tseq == 4 else tseq))  # SQLite integers stop at 2**63 - 1
        await store.flush()
        stored = await store.events("t1")
        after = await store.transaction("t1")
    assert [e.tseq for e in stored] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert after is not None and store.pending == 0
    assert store.health.state is StorageState.OK and store.health.writes_lost == 1
    [line] = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert line.startswith(f"store: gave up event {2**64} of transaction t1, which cannot be stored (OverflowError:")


async def test_a_full_disk_is_reported_retried_and_told_once_per_transaction(tmp_path: Path) -> None:
    told: list[tuple[str, str | None]] = []
    async with SqliteStore(tmp_path / "haip.db", flush_interval=0.01) as store:
        store.on_storage = lambda tx, error: told.append((tx, error))
        store.save_transaction(record("t1"))
        await store.flush()
        fill(store)
        for tseq in range(1, 30):
            store.append(event("t1", tseq, "x" * 3000))
        await store.flush()  # returns: the store cannot write, nothing to wait for
        assert store.health.state is StorageState.UNAVAILABLE and store.pending == 29
        store.append(event("t2", 1))  # a transaction first written during the outage is told too
        fill(store, 1_000_000)
        with anyio.fail_after(10):
            while len(told) < 4:  # the writer's own backoff decides when it retries
                await store._batch_done.wait()
        stored = await store.events("t1", limit=100)
    assert [tx for tx, _ in told[:2]] == ["t1", "t2"] and "full" in str(told[0][1])
    assert sorted(told[2:]) == [("t1", None), ("t2", None)]  # written again
    assert len(stored) == 29 and store.health.write_failures >= 1 and store.health.writes_dropped == 0


async def test_pending_writes_are_bounded_oldest_dropped_and_closing_does_not_wait(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "haip.db", flush_interval=0.01, max_pending=5)
    with anyio.fail_after(5):  # closing gives up the writes the store cannot take, at once
        async with store:
            fill(store)
            for tseq in range(1, 21):
                store.append(event("t1", tseq, "x" * 3000))
            await store.flush()
            assert store.pending <= 5 and store.health.writes_dropped >= 15


async def test_a_second_store_on_one_file_refuses_with_one_line_naming_the_process(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "haip.db"):
        with pytest.raises(ConfigError) as refused:
            async with SqliteStore(tmp_path / "haip.db"):
                pass
    message = str(refused.value)
    assert "in use by another haip-runtime (pid " in message and "\n" not in message
    async with SqliteStore(tmp_path / "haip.db"):  # released when the first closed
        pass


async def test_damage_refuses_the_start_and_damage_met_later_is_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "haip.db"
    async with SqliteStore(path) as store:
        store.save_transaction(record("t1"))
        for tseq in range(1, 400):
            store.append(event("t1", tseq, "y" * 500))
        await store.flush()
    async with SqliteStore(path) as store:  # intact at start; damaged while it runs
        damage(path)
        with pytest.raises(StorageError) as later:
            await store.events("t1", limit=1000)
    assert later.value.code == "STORAGE_ERROR" and store.health.state is StorageState.DAMAGED
    with pytest.raises(ConfigError, match="damaged|malformed") as refused:
        async with SqliteStore(path):
            pass
    assert "damaged" in str(refused.value)


async def test_a_backlog_is_taken_in_batches_bounded_by_writes_and_by_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small events fill a batch by count, large ones by the characters of their bodies (so a batch of
    large events still fits a statement timeout); every write is written once, in order."""
    monkeypatch.setattr(batching, "MAX_BATCH", 50)
    monkeypatch.setattr(batching, "MAX_BATCH_CHARS", 10_000)
    batches: list[list[int]] = []  # the body lengths of each batch's events
    async with SqliteStore(tmp_path / "haip.db", flush_interval=5) as store:
        attempt = store._attempt

        async def counted(batch: list[batching.Write]) -> None:
            batches.append([len(args[2]) for kind, args in batch if kind == "event"])
            await attempt(batch)

        monkeypatch.setattr(store, "_attempt", counted)
        for tseq in range(1, 121):
            store.append(event("t", tseq))
        for tseq in range(121, 141):
            store.append(event("t", tseq, "x" * 3000))
        store.append(event("t", 141, "y" * 20_000))  # one write past the bound alone: taken all the same
        await store.flush()
        stored = await store.events("t", limit=1000)
    assert [e.tseq for e in stored] == list(range(1, 142))
    assert sum(map(len, batches)) == 141 and all(0 < len(batch) <= 50 for batch in batches)
    assert all(sum(batch[:-1]) < 10_000 for batch in batches)  # full once past the bound, not before
    assert len(batches[0]) == 50 and len(batches[-2]) < 5  # by count, then by characters


async def test_text_json_cannot_carry_intact_is_kept_whole_or_its_row_given_up(tmp_path: Path) -> None:
    """Rows go to SQLite as JSON; json_extract would cut a string at a NUL (two ids differing after one
    would become one), and a lone surrogate cannot be UTF-8: a NUL is kept, such a row given up alone."""
    async with SqliteStore(tmp_path / "haip.db") as store:
        store.save_transaction(record("a", members=("ann",)))
        store.save_transaction(record("a\x00b", owner="eve", members=("eve",), end_reason="done\x00 by eve"))
        store.save_transaction(record("s", end_reason="x\ud800y"))
        store.append(event("a", 1, "ann's"))
        store.append(event("a\x00b", 1, "eve's\x00"))
        await store.flush()
        first, second, lone = [await store.transaction(tx) for tx in ("a", "a\x00b", "s")]
        texts = [text_of(e) for tx in ("a", "a\x00b") for e in await store.events(tx)]
    assert first is not None and first.owner == "ann" and first.members == ("ann",)
    assert second is not None and second.owner == "eve" and second.end_reason == "done\x00 by eve"
    assert lone is None and store.health.writes_lost == 1
    assert texts == ["ann's", "eve's\x00"]


async def test_reads_longer_than_a_step_come_whole_and_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events are read READ_CHUNK at a time, each chunk one JSON text; a chunk past SQLite's longest
    text is read a row at a time instead of failing the read."""
    from haip_runtime.store import sqlite

    monkeypatch.setattr(sqlite, "READ_CHUNK", 7)
    async with SqliteStore(tmp_path / "haip.db") as store:
        for tseq in range(1, 51):
            store.append(event("t", tseq, "x" * (1500 if tseq == 30 else 10)))
        store.append(event("other", 1))
        store.append(event("edge", 2**63 - 1))  # SQLite's largest integer: still the newest
        store.append(event("edge", 2**63 - 2))
        await store.flush()
        edge = [[e.tseq for e in await store.tail("edge", limit=limit)] for limit in (1, 5)]
        pages = [await store.events("t", after=after, limit=limit) for after, limit in ((0, 100), (5, 20), (45, 10))]
        tails = [await store.tail("t", limit=limit) for limit in (1, 7, 23, 100)]
        assert store._reader is not None
        store._reader.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 2000)  # the chunk holding tseq 30 is now too long
        limited = [await store.events("t", limit=100), await store.tail("t", limit=100)]
    assert [[e.tseq for e in page] for page in pages] == [list(range(1, 51)), list(range(6, 26)), list(range(46, 51))]
    assert [[e.tseq for e in tail] for tail in tails] == [
        [50],
        list(range(44, 51)),
        list(range(28, 51)),
        list(range(1, 51)),
    ]
    assert [[e.tseq for e in page] for page in limited] == [list(range(1, 51))] * 2
    assert text_of(limited[0][29]) == "x" * 1500
    assert edge == [[2**63 - 1], [2**63 - 2, 2**63 - 1]]
