"""What only a store several processes share must get right, against a real PostgreSQL: migrations
run once under a lock, a newer schema refused, several writers that never overwrite or reorder,
metadata that merges, an outage that waits and recovers, and reads that stay on their indexes."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest

from haip_runtime.config.base import masked_url
from haip_runtime.config.models import StorageConfig
from haip_runtime.exceptions import ConfigError, StorageError
from haip_runtime.protocol.envelope import Event
from haip_runtime.store import PostgresStore, SessionRecord, TransactionState, postgres
from haip_runtime.store.base import StorageState
from haip_runtime.store.migrations import LATEST
from haip_runtime.store.postgres import READS
from tests.store.test_store import event, record

pytestmark = pytest.mark.anyio


def config(url: str, **options: object) -> StorageConfig:
    return StorageConfig.model_validate({"backend": "postgres", "url": url, **options})


@asynccontextmanager
async def opened(url: str, **options: object) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(config(url, **options)) as store:
        yield store


def text_of(stored: Event) -> str:
    return str(stored.payload["text"] if isinstance(stored.payload, dict) else stored.payload)


async def sql(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    db = await asyncpg.connect(url)
    try:
        if not args and ";" in query:  # a script: several statements, nothing to return
            await db.execute(query)
            return []
        return await db.fetch(query, *args)
    finally:
        await db.close()


async def test_several_processes_starting_at_once_migrate_once(postgres_url: str) -> None:
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(lambda: _open_and_close(postgres_url))
    rows = await sql(postgres_url, "SELECT version FROM haip_schema")
    assert [row["version"] for row in rows] == list(range(1, LATEST + 1))


async def _open_and_close(url: str) -> None:
    async with opened(url):
        pass


async def test_a_database_of_a_newer_schema_is_refused_in_one_line(postgres_url: str) -> None:
    async with opened(postgres_url):
        pass
    await sql(postgres_url, "INSERT INTO haip_schema (version, note) VALUES ($1, 'from the future')", LATEST + 1)
    with pytest.raises(ConfigError) as refused:
        async with opened(postgres_url):
            pass
    message = str(refused.value)
    assert f"schema version {LATEST + 1}" in message and "\n" not in message


@asynccontextmanager
async def written_by(url: str, prefix: str | None) -> AsyncIterator[PostgresStore]:
    """The store as a server with ``[cluster] key_prefix = prefix`` opens it (``None``: no ``[cluster]``)."""
    store = PostgresStore(config(url))
    store.numbered_by_caller, store.cluster_prefix = prefix is not None, prefix
    async with store:
        yield store


async def test_one_database_is_the_log_of_one_numbering(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A tester pointed two clusters (their key_prefix differed) at one database: both answered, each
    skipped the other's rows, and the durable log lost events of both, silently. Now a database keeps
    who numbers its events; servers without [cluster] becoming a cluster is allowed, nothing else."""
    async with written_by(postgres_url, None):  # one process first
        pass
    async with written_by(postgres_url, None):  # (several processes without [cluster] share one too)
        pass
    assert "serve makes it this cluster's log (stop them first)" in await postgres.inspect(config(postgres_url), "x")
    async with written_by(postgres_url, "haip"):  # then it grows into a cluster
        pass
    assert "is the log of the cluster with key_prefix 'haip' from now on" in caplog.text
    for prefix, theirs, advice in (
        (None, "a server without [cluster]", "Give this server a database of its own, or make it a node"),
        ("other", "a cluster with key_prefix 'other'", "UPDATE haip_meta SET value = 'cluster:other'"),
        # an operator's find: a node on Redis database 1 (same prefix) was taken, and split the log
        ("haip@1", "a cluster with key_prefix 'haip' on Redis database 1", "same key_prefix, Redis and Redis"),
    ):
        with pytest.raises(ConfigError) as refused:
            async with written_by(postgres_url, prefix):
                pass
        message = str(refused.value)
        assert f"is the durable log of the cluster with key_prefix 'haip'; {theirs} would number" in message
        assert advice in message and "\n" not in message
        with pytest.raises(ConfigError) as told:  # check --connect says the same, changing nothing
            await postgres.inspect(config(postgres_url), prefix)
        assert str(told.value) == message
    assert "reached, schema version current" in await postgres.inspect(config(postgres_url), "haip")
    rows = await sql(postgres_url, "SELECT value FROM haip_meta WHERE key = 'writer'")
    assert [row["value"] for row in rows] == ["cluster:haip"]


async def test_an_unreachable_database_is_refused_in_one_line_without_its_password() -> None:
    with socket_that_refuses() as port:
        url = f"postgresql://haip:hunter2@127.0.0.1:{port}/haip"
        with pytest.raises(ConfigError) as refused:
            async with opened(url, connect_timeout_seconds=2):
                pass
    message = str(refused.value)
    assert message.startswith("storage.url: cannot open PostgreSQL database postgresql://haip:**********@127.0.0.1:")
    assert "hunter2" not in message and "\n" not in message


def socket_that_refuses() -> _RefusingPort:
    return _RefusingPort()


class _RefusingPort:
    """A port nothing listens on (bound, never listened: connecting is refused at once)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


async def test_everything_is_kept_across_a_reopen(postgres_url: str) -> None:
    async with opened(postgres_url) as first:
        first.save_transaction(record("t1", state=TransactionState.ENDED, end_reason="done"))
        first.append(event("t1", 1))
        first.append(event("t1", 2, "ünïcode ✓"))
    async with opened(postgres_url) as second:
        assert [e.payload for e in await second.events("t1")] == [{"text": "m1"}, {"text": "ünïcode ✓"}]
        again = await second.transaction("t1")
    assert again is not None and again.state is TransactionState.ENDED and again.end_reason == "done"
    assert again.last_tseq == 2 and again.agents == ("echo",) and again.owner == "ann"


async def test_two_writers_on_one_transaction_never_overwrite_or_reorder(postgres_url: str) -> None:
    """Each numbers from 1 as if alone; the database hands out the real numbers: all 400 stored once,
    contiguous, each writer's own in its order, and each writer told where its events went."""
    told: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    async with opened(postgres_url, flush_interval_seconds=0.001) as a, opened(postgres_url) as b:
        a.on_sequenced = lambda tx, published, stored: told["a"].append((published, stored))
        b.on_sequenced = lambda tx, published, stored: told["b"].append((published, stored))
        a.save_transaction(record("t", members=("ann",)))
        b.save_transaction(record("t", members=("bob",)))

        async def write(store: PostgresStore, who: str) -> None:
            for tseq in range(1, 201):
                store.append(event("t", tseq, f"{who}{tseq}"))
                if tseq % 20 == 0:
                    await store.flush()  # interleave the two writers' batches

        async with anyio.create_task_group() as group:
            group.start_soon(write, a, "a")
            group.start_soon(write, b, "b")
        stored = await a.events("t", limit=1000)
        kept = await b.transaction("t")
    assert [e.tseq for e in stored] == list(range(1, 401))
    texts = [text_of(e) for e in stored]
    assert [t for t in texts if t.startswith("a")] == [f"a{n}" for n in range(1, 201)]
    assert [t for t in texts if t.startswith("b")] == [f"b{n}" for n in range(1, 201)]
    assert kept is not None and kept.last_tseq == 400 and set(kept.members) == {"ann", "bob"}
    for who in ("a", "b"):  # every event numbered elsewhere was told, with where it went
        where = dict(enumerate(texts, start=1))
        assert all(where[stored_as] == f"{who}{published}" for published, stored_as in told[who])
    assert told["a"] or told["b"]


async def test_metadata_saved_by_two_writers_merges(postgres_url: str) -> None:
    async with opened(postgres_url) as a, opened(postgres_url) as b:
        a.save_transaction(record("t", agents=("echo",), members=("ann",), updated_at=10.0))
        await a.flush()
        b.save_transaction(record("t", agents=("echo", "storyteller"), members=("bob",), updated_at=20.0))
        await b.flush()
        a.save_transaction(record("t", state=TransactionState.ENDED, end_reason="closed", updated_at=15.0))
        await a.flush()
        b.save_transaction(record("t", agents=("echo", "storyteller"), updated_at=12.0))  # stale: was open
        kept = await b.transaction("t")
    assert kept is not None
    assert kept.agents == ("echo", "storyteller") and set(kept.members) == {"ann", "bob"}
    assert kept.state is TransactionState.ENDED and kept.end_reason == "closed" and kept.updated_at == 20.0


async def test_a_batch_retried_after_a_lost_commit_stores_nothing_twice(postgres_url: str) -> None:
    async with opened(postgres_url) as store:
        first = event("t", 1)
        store.append(first)
        await store.flush()
        store._retrying = True  # as after a failure: the last commit may have happened unheard
        store.append(first)
        store.append(event("t", 2))
        await store.flush()
        stored = await store.events("t")
    assert [(e.id, e.tseq) for e in stored][0] == (first.id, 1) and [e.tseq for e in stored] == [1, 2]


async def test_a_row_postgres_cannot_take_costs_itself_only(postgres_url: str) -> None:
    async with opened(postgres_url) as store:
        for tseq in range(1, 6):
            bad = event("t", tseq)
            if tseq == 3:
                bad.id = "nul\x00byte"  # PostgreSQL text cannot hold a NUL
            store.append(bad)
        await store.flush()
        stored = await store.events("t")
    assert [text_of(e) for e in stored] == ["m1", "m2", "m4", "m5"]
    assert store.health.state is StorageState.OK and store.health.writes_lost == 1


async def test_a_database_that_refuses_writes_is_waited_out_and_members_told(postgres_url: str) -> None:
    """Connections refused (the database closed to new ones, ours cut): health degrades, each
    transaction is told once, reads answer STORAGE_ERROR, and it all recovers by itself."""
    told: list[tuple[str, str | None]] = []
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"
    name = postgres_url.rsplit("/", 1)[1]
    async with opened(postgres_url, flush_interval_seconds=0.01, connect_timeout_seconds=2) as store:
        store.on_storage = lambda tx, error: told.append((tx, error))
        store.append(event("t1", 1))
        await store.flush()
        await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        for tseq in range(2, 12):
            store.append(event("t1", tseq))
        store.append(event("t2", 1))
        with anyio.fail_after(10):
            while store.health.state is StorageState.OK:
                await store._batch_done.wait()
        with pytest.raises(StorageError):
            await store.events("t1")
        assert {tx for tx, error in told if error} == {"t1", "t2"}
        await sql(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await wait_until_written(store)
        stored = await store.events("t1", limit=100)
    assert [e.tseq for e in stored] == list(range(1, 12))
    assert sorted(tx for tx, error in told if error is None) == ["t1", "t2"]
    assert store.health.write_failures >= 1 and store.health.writes_lost == 0


async def test_a_statement_stuck_behind_a_lock_times_out_and_is_retried(postgres_url: str) -> None:
    async with opened(postgres_url, flush_interval_seconds=0.01, statement_timeout_seconds=0.3) as store:
        store.save_transaction(record("t"))
        await store.flush()
        blocker = await asyncpg.connect(postgres_url)
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT * FROM haip_transactions WHERE id = 't' FOR UPDATE")
        store.append(event("t", 1))
        with anyio.fail_after(10):
            while store.health.state is StorageState.OK:
                await store._batch_done.wait()
        assert "statement timeout" in (store.health.error or "")
        await holding.rollback()
        await blocker.close()
        with anyio.fail_after(15):
            while store.pending:
                await store._batch_done.wait()
        assert [e.tseq for e in await store.events("t")] == [1]


async def test_reads_use_their_indexes_on_a_large_log(postgres_url: str) -> None:
    """EXPLAIN of every read the store makes (its own SQL, planned as the generic plan a prepared
    statement gets) on 200,000 events in 20,000 transactions of 1,000 users: index scans, no
    sequential scan, no sort of a user's whole list (what keeps reads flat as the log grows; the
    benchmark measures 1 M events)."""
    async with opened(postgres_url):
        pass
    await sql(
        postgres_url,
        """
        INSERT INTO haip_transactions SELECT 't' || n, 'u' || (n % 1000), '{echo}',
            CASE WHEN n % 10 = 0 THEN 'open' ELSE 'ended' END, NULL, n, n, 10, NULL
            FROM generate_series(1, 20000) n;
        INSERT INTO haip_members SELECT 'u' || (n % 1000), 't' || n, n FROM generate_series(1, 20000) n;
        INSERT INTO haip_events SELECT 't' || (n % 20000 + 1), n / 20000 + 1, 'e' || n, '{}'
            FROM generate_series(0, 199999) n;
        INSERT INTO haip_sessions SELECT 's' || n, 'u' || n, 'e', '{}', n FROM generate_series(1, 20000) n;
        ANALYZE;
        """,
    )
    arguments = {
        "transaction": "('t7')",
        "transactions_of": "('u7', 20)",
        "transactions_of_before": "('u7', 20, 5007.0, 't5007')",
        "events": "('t7', 5, 1000)",
        "tail": "('t7', 20)",
        "count_events": "('t7', 2, 8)",
        "open_owned": "('u7', 10)",
        "session": "('s7')",
    }
    assert arguments.keys() == READS.keys()
    db = await asyncpg.connect(postgres_url)
    try:
        await db.execute("SET plan_cache_mode = force_generic_plan")
        for read, query in READS.items():
            await db.execute(f"PREPARE {read} AS {query}")
            plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN EXECUTE {read}{arguments[read]}"))
            assert "Index" in plan and "Seq Scan" not in plan, (read, plan)
            if read.startswith("transactions_of"):
                assert "haip_members_by_recent" in plan and "Sort Key: m." not in plan, (read, plan)  # in order, a page
    finally:
        await db.close()


async def test_session_records_written_late_do_not_overwrite_newer_ones(postgres_url: str) -> None:
    now = time.time()
    async with opened(postgres_url) as a, opened(postgres_url) as b:
        a.save_session(SessionRecord("s", "ann", "epoch-2", ("t2",), now))
        await a.flush()
        b.save_session(SessionRecord("s", "ann", "epoch-1", ("t1",), now - 60))  # older, arriving later
        kept = await b.session("s")
    assert kept is not None and (kept.epoch, kept.transactions) == ("epoch-2", ("t2",))


async def wait_until_written(store: PostgresStore) -> None:
    """Until the writer has written everything and the store is ``ok`` again (its own backoff decides when)."""
    with anyio.fail_after(15):
        while store.health.state is not StorageState.OK or store.pending:
            await store._batch_done.wait()


def with_user(url: str, user: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}:{password}@{rest.rpartition('@')[2]}"


async def test_a_least_privilege_role_runs_a_migrated_database_and_cannot_migrate_one(postgres_url: str) -> None:
    """docs/postgres.md's grants: the owner migrates, the app role only reads and writes."""
    name = postgres_url.rsplit("/", 1)[1]
    owner, app = f"{name}_owner", f"{name}_app"
    await sql(
        postgres_url,
        f"""
        CREATE ROLE {owner} LOGIN PASSWORD 'owner-pw';
        CREATE ROLE {app} LOGIN PASSWORD 'app-pw';
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
        GRANT CREATE, USAGE ON SCHEMA public TO {owner};
        GRANT USAGE ON SCHEMA public TO {app};
        ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app};
        """,
    )
    app_url = with_user(postgres_url, app, "app-pw")
    with pytest.raises(ConfigError) as refused:
        async with opened(app_url):
            pass
    assert "permission denied for schema public" in str(refused.value) and "app-pw" not in str(refused.value)
    async with opened(with_user(postgres_url, owner, "owner-pw")):
        pass
    async with opened(app_url) as store:
        store.save_transaction(record("t"))
        store.append(event("t", 1))
        store.save_session(SessionRecord("s", "ann", "e", ("t",), time.time()))
        store.forget_session("s")
        assert [e.tseq for e in await store.events("t")] == [1] and store.health.writes_lost == 0
        assert store.health.state is StorageState.OK


def test_serve_refuses_a_newer_schema_in_one_line(postgres_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    anyio.run(_open_and_close, postgres_url)
    anyio.run(sql, postgres_url, "INSERT INTO haip_schema (version, note) VALUES (999, 'future')")
    (tmp_path / "haip.toml").write_text(f'[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "serve", "--config", str(tmp_path / "haip.toml"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema version 999" in lines[0], done.stderr


async def test_one_writer_keeps_its_numbers_even_around_a_lost_event(postgres_url: str) -> None:
    """Live numbers and stored numbers agree for a single writer: an event that could not be stored
    leaves a gap (as in SQLite), it does not shift the ones after it."""
    told: list[tuple[int, int]] = []
    async with opened(postgres_url) as store:
        store.on_sequenced = lambda tx, published, stored: told.append((published, stored))
        for tseq in range(1, 6):
            one = event("t", tseq)
            if tseq == 2:
                one.id = "nul\x00byte"
            store.append(one)
        await store.flush()
        store.append(event("t", 6))
        stored = await store.events("t")
        kept = await store.transaction("t")
    assert [e.tseq for e in stored] == [1, 3, 4, 5, 6] and told == []
    assert kept is not None and kept.last_tseq == 6


async def test_a_row_too_big_for_an_index_costs_itself_only(postgres_url: str) -> None:
    """SQLSTATE 54000 (an index row past PostgreSQL's limit) is that row's fault, not the store's:
    it was once retried for ever, every later write waiting behind it."""
    async with opened(postgres_url) as store:
        store.save_transaction(record("t-bad", members=("alice", secrets.token_hex(2000))))  # 4,000 random bytes
        store.save_transaction(record("t-good", members=("bob",)))
        await store.flush()
        good = await store.transaction("t-good")
    assert good is not None and store.pending == 0
    assert store.health.state is StorageState.OK and store.health.writes_lost == 1


async def test_a_backlog_is_written_in_batches_that_fit_the_statement_timeout(postgres_url: str) -> None:
    """What an outage leaves behind: 30,000 events of 3 kB at once, with a 1 s statement timeout.
    Written as one batch it timed out and was retried for ever; in batches it drains."""
    async with opened(postgres_url, statement_timeout_seconds=1) as store:
        body = "x" * 3000
        for tseq in range(1, 30_001):
            store.append(event("t", tseq, body))
        await wait_until_written(store)
        kept = await store.transaction("t")
    assert kept is not None and kept.last_tseq == 30_000 and store.health.write_failures == 0


async def test_two_writers_saving_the_same_sessions_in_opposite_orders_do_not_deadlock(postgres_url: str) -> None:
    async with opened(postgres_url, flush_interval_seconds=0.001) as a, opened(postgres_url) as b:

        async def save(store: PostgresStore, ids: list[str]) -> None:
            for n in range(30):
                for session_id in ids:
                    store.save_session(SessionRecord(session_id, "u", "e", ("t",), float(n)))
                store.prune_sessions(-1.0)
                await store.flush()

        ids = [f"s{k}" for k in range(50)]
        async with anyio.create_task_group() as group:
            group.start_soon(save, a, ids)
            group.start_soon(save, b, ids[::-1])
    assert a.health.write_failures == 0 and b.health.write_failures == 0


async def test_a_migration_lock_held_elsewhere_is_refused_in_one_line_not_waited_on(postgres_url: str) -> None:
    from haip_runtime.store import postgres
    from haip_runtime.store.migrations import LOCK_KEY

    holder = await asyncpg.connect(postgres_url)
    held = holder.transaction()
    await held.start()
    await holder.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    try:
        with anyio.fail_after(10), pytest.raises(ConfigError) as refused:
            await postgres.preflight(config(postgres_url, connect_timeout_seconds=1))
    finally:
        await held.rollback()
        await holder.close()
    assert "migration lock for over 1 s" in str(refused.value) and "\n" not in str(refused.value)


async def test_live_numbers_never_stored_are_not_handed_out_again(postgres_url: str) -> None:
    """A record says numbers up to 10 were handed out (their events lost in an outage): the store
    keeps last_tseq at 10, as SQLite and memory do, so a transaction brought back goes on at 11."""
    async with opened(postgres_url) as store:
        store.save_transaction(record("t", last_tseq=10))
        await store.flush()
        kept = await store.transaction("t")
        store.append(event("t", 11))
        stored = await store.events("t")
    assert kept is not None and kept.last_tseq == 10 and [e.tseq for e in stored] == [11]


async def test_a_retried_batch_reports_where_its_already_stored_events_went(postgres_url: str) -> None:
    told: list[tuple[int, int]] = []
    async with opened(postgres_url) as a, opened(postgres_url) as b:
        shared = event("t", 1)
        a.append(shared)
        await a.flush()
        b.on_sequenced = lambda tx, published, stored: told.append((published, stored))
        b._retrying = True  # as if b's own commit of this event had happened unheard
        b.append(_renumbered(shared, 5))
        await b.flush()
        stored = await b.events("t")
    assert [e.tseq for e in stored] == [1] and told == [(5, 1)]


def _renumbered(original: Event, tseq: int) -> Event:
    copy = event("t", tseq)
    copy.id = original.id
    return copy


def test_a_url_with_unencoded_url_characters_in_its_password_is_refused_by_check_without_echoing_it() -> None:
    from pydantic import ValidationError

    for password in ("ab/cd", "ab#cd", "ab?cd", "ab@cd"):
        with pytest.raises(ValidationError) as refused:
            config(f"postgresql://haip:{password}@127.0.0.1:5432/haip")
        assert "percent-encode" in str(refused.value) and password not in str(refused.value)
    assert config("postgresql://haip:ab%2Fcd@127.0.0.1:5432/haip").url is not None


async def test_a_current_schema_starts_without_the_migration_lock(postgres_url: str) -> None:
    """Only a start that must migrate waits for the lock: a held lock does not stop a current database."""
    from haip_runtime.store import postgres
    from haip_runtime.store.migrations import LOCK_KEY

    async with opened(postgres_url):
        pass
    holder = await asyncpg.connect(postgres_url)
    held = holder.transaction()
    await held.start()
    await holder.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    try:
        with anyio.fail_after(10):
            await postgres.preflight(config(postgres_url, connect_timeout_seconds=1))
    finally:
        await held.rollback()
        await holder.close()


def test_migrate_brings_the_schema_up_to_date_in_one_line_and_refuses_other_stores(
    postgres_url: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    def migrate(config: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "haip.toml").write_text(config)
        command = [sys.executable, "-m", "haip_runtime", "migrate", "--config", str(tmp_path / "haip.toml")]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    first = migrate(f'[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n')
    again = migrate(f'[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n')
    sqlite = migrate('[storage]\nbackend = "sqlite"\n')
    assert first.returncode == 0 and first.stdout.strip().endswith(f"schema version {LATEST} (migrated from 0)")
    assert again.returncode == 0 and again.stdout.strip().endswith(f"schema version {LATEST} (already current)")
    assert sqlite.returncode == 1 and "only a PostgreSQL store is migrated" in sqlite.stderr


def test_check_connect_reaches_the_database_and_says_its_schema_without_changing_it(
    postgres_url: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    def check(url: str) -> list[str]:
        (tmp_path / "haip.toml").write_text(f'[storage]\nbackend = "postgres"\nurl = "{url}"\n')
        command = [sys.executable, "-m", "haip_runtime", "check", "--config", str(tmp_path / "haip.toml"), "--connect"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return [line for line in done.stderr.splitlines() if line.startswith(("reached:", "failed:"))]

    before = check(postgres_url)
    with socket_that_refuses() as port:
        away = check(f"postgresql://haip:hunter2@127.0.0.1:{port}/haip")
    shown = masked_url(postgres_url)
    assert before == [
        f"reached: storage.url: {shown} reached, schema version 0: serve or migrate brings it to {LATEST}"
    ]
    assert anyio.run(sql, postgres_url, "SELECT to_regclass('haip_schema') IS NULL AS untouched")[0]["untouched"]
    assert len(away) == 1 and away[0].startswith("failed: storage.url: cannot open PostgreSQL database")
    assert "hunter2" not in away[0]


async def test_a_batch_of_many_transactions_takes_a_few_statements_not_a_few_per_transaction(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load each statement waits for the event loop's turn: at several statements a transaction,
    a busy process's writer fell further behind every second (bench/workers.py). 200 transactions,
    each new with a record and events, some with only events, go in one batch of a few statements."""
    statements: list[str] = []
    for method in ("execute", "fetch", "fetchval"):
        original = getattr(asyncpg.Connection, method)

        async def counted(self: asyncpg.Connection, query: str, *args: object, _original=original, **kw: object):  # type: ignore[no-untyped-def]
            statements.append(query)
            return await _original(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.Connection, method, counted)
    async with opened(postgres_url, flush_interval_seconds=5) as store:
        await store.flush()
        statements.clear()
        for n in range(200):
            if n % 4:
                store.save_transaction(record(f"t{n}", members=("ann", f"u{n}"), last_tseq=3))
            for tseq in (1, 2):
                store.append(event(f"t{n}", tseq))
        await store.flush()
        written = len(statements)
        kept = [await store.transaction(f"t{n}") for n in (0, 1)]
        stored = await store.events("t7")
    assert written <= 8, statements
    assert kept[0] is not None and kept[0].owner == "" and kept[0].last_tseq == 2  # its record not written yet
    assert kept[1] is not None and kept[1].members == ("ann", "u1") and kept[1].last_tseq == 3
    assert [e.tseq for e in stored] == [1, 2]


async def test_two_writers_splitting_records_and_events_oppositely_do_not_deadlock(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each writer writes one half of the transactions' records and the other half's events, new rows
    each round: both lock rows (and wait for rows the other is making) in one order, so neither waits
    for the other in a circle (PostgreSQL would break it after deadlock_timeout, and log a retry)."""
    async with opened(postgres_url, flush_interval_seconds=0.001) as a, opened(postgres_url) as b:

        async def write(store: PostgresStore, mine: int) -> None:
            for round_ in range(20):
                for n in range(40):
                    tx = f"r{round_}-{n:02d}"
                    if n % 2 == mine:
                        store.save_transaction(record(tx, members=(f"u{mine}",)))
                    else:
                        store.append(event(tx, 1, f"w{mine}"))
                await store.flush()

        async with anyio.create_task_group() as group:
            group.start_soon(write, a, 0)
            group.start_soon(write, b, 1)
        kept = await a.transaction("r19-01")
    assert a.health.write_failures == 0 and b.health.write_failures == 0
    assert "writing the batch again" not in caplog.text
    assert kept is not None and kept.members == ("u1",)


@asynccontextmanager
async def clustered(url: str, **options: object) -> AsyncIterator[PostgresStore]:
    """A store as a node of a cluster has it: the bus numbers the events, every hosting node writes them."""
    store = PostgresStore(config(url, **options))
    store.numbered_by_caller = True
    async with store:
        yield store


async def test_clustered_writers_copy_new_events_and_skip_those_another_node_wrote(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes hosting one transaction write the same events, numbered by the bus, in interleaved
    batches: each event is stored once at its number, and what was new to the store went by COPY."""
    copied: list[int] = []
    original = asyncpg.Connection.copy_records_to_table

    async def counted(self: asyncpg.Connection, table: str, *, records: list[object], **kw: object) -> str:
        copied.append(len(records))
        return await original(self, table, records=records, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counted)
    events = [event("t", tseq) for tseq in range(1, 201)]
    async with clustered(postgres_url, flush_interval_seconds=0.001) as a, clustered(postgres_url) as b:

        async def write(store: PostgresStore, step: int) -> None:
            for start in range(0, 200, step):
                for one in events[start : start + step]:
                    store.append(one)
                await store.flush()

        async with anyio.create_task_group() as group:
            group.start_soon(write, a, 20)
            group.start_soon(write, b, 30)
        stored = await a.events("t", limit=1000)
        kept = await b.transaction("t")
    assert [(e.id, e.tseq) for e in stored] == [(e.id, e.tseq) for e in events]
    assert kept is not None and kept.last_tseq == 200
    assert a.health.writes_lost == b.health.writes_lost == a.health.write_failures == b.health.write_failures == 0
    assert 200 <= sum(copied) < 400  # every event copied by the first node to write it, none twice


async def test_an_event_appended_twice_under_two_numbers_is_stored_once_in_a_clustered_batch(
    postgres_url: str,
) -> None:
    """A retried append that landed twice: the bus delivers one event at 3 and again at 5 to a node that
    missed the first. Its COPY of 5 meets the stored id, and the batch goes again by INSERT: 4 and 6
    are stored, 5 skipped, nothing given up."""
    async with clustered(postgres_url) as first, clustered(postgres_url) as second:
        twice = event("t", 3)
        for tseq in (1, 2):
            first.append(event("t", tseq))
        first.append(twice)
        await first.flush()
        second.append(event("t", 4))
        second.append(_renumbered(twice, 5))
        second.append(event("t", 6))
        await second.flush()
        stored = await second.events("t")
    assert [e.tseq for e in stored] == [1, 2, 3, 4, 6] and stored[2].id == twice.id
    assert second.health.writes_lost == 0 and second.health.write_failures == 0


@pytest.mark.parametrize(
    ("before", "batch", "kept"),
    [
        # numbers up to 5 handed out (none stored); the same event delivered at 3, then again at 7
        (5, [("x", 3), ("x", 7)], [3]),
        # one delivered out of order (a replay): 4, then the event at 3, then again at 7
        (0, [("y", 4), ("x", 3), ("x", 7)], [3, 4]),
    ],
)
async def test_an_event_twice_in_one_clustered_batch_is_kept_at_its_first_number(
    postgres_url: str, before: int, batch: list[tuple[str, int]], kept: list[int]
) -> None:
    """As when every event went by INSERT in the batch's order: the first copy of an event is the one
    stored, even when the later copy is past the stored rows (found by review: it was kept instead)."""
    async with clustered(postgres_url) as node:
        if before:
            node.save_transaction(record("t", last_tseq=before))
            await node.flush()
        x = event("t", 3)
        for name, tseq in batch:
            node.append(_renumbered(x, tseq) if name == "x" else event("t", tseq))
        await node.flush()
        stored = await node.events("t")
    assert [e.tseq for e in stored] == kept and stored[kept.index(3)].id == x.id
