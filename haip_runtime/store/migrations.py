"""The PostgreSQL schema, as forward-only migrations applied at start under an advisory lock.

``haip_schema`` records each migration applied (its number, when, what). At start a runtime takes
a transaction-level advisory lock, reads the highest number applied, and applies the ones after
it, each in the same transaction as its row in ``haip_schema``: several processes starting at once
migrate once (the others wait for the lock, then find nothing to do), and a migration that fails
leaves the database as it was. A database migrated by a newer haip-runtime (a number this one does
not know) is refused in one line: this runtime would misread it.

Every table is prefixed ``haip_`` so the database (or schema) can be shared with other programs.
Migrations are never edited once released; a change is a new migration.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from haip_runtime.exceptions import ConfigError

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)

#: A connection, on its own or lent by a pool.
Db: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

#: An arbitrary constant naming "haip-runtime's schema" among the database's advisory locks.
LOCK_KEY = 0x4841_4950_0001

#: (number, what it does, SQL). Append only.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "transactions, members, events, sessions",
        """
        CREATE TABLE haip_transactions (
            id text PRIMARY KEY,
            owner text NOT NULL,
            agents text[] NOT NULL,
            state text NOT NULL,
            thread_id text,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            -- the last tseq allocated: the database hands out every event's tseq (several writers)
            last_tseq bigint NOT NULL,
            end_reason text
        );
        -- open_owned: a user's open transactions (quotas), without reading the ended ones
        CREATE INDEX haip_transactions_open_by_owner ON haip_transactions (owner) WHERE state = 'open';
        CREATE TABLE haip_members (
            user_id text NOT NULL,
            tx text NOT NULL,
            -- the transaction's updated_at, kept here so a user's list is read in order from an index
            updated_at double precision NOT NULL,
            PRIMARY KEY (user_id, tx)
        );
        -- a transaction's members, for its record
        CREATE INDEX haip_members_by_tx ON haip_members (tx);
        -- a user's transactions, most recently updated first, a page at a time however many they have
        CREATE INDEX haip_members_by_recent ON haip_members (user_id, updated_at DESC, tx DESC);
        CREATE TABLE haip_events (
            tx text NOT NULL,
            tseq bigint NOT NULL,
            id text NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (tx, tseq)
        );
        -- one event (envelope id) is stored once, even when a batch is retried after a lost commit
        CREATE UNIQUE INDEX haip_events_once ON haip_events (tx, id);
        CREATE TABLE haip_sessions (
            id text PRIMARY KEY,
            user_id text NOT NULL,
            epoch text NOT NULL,
            transactions text[] NOT NULL,
            updated_at double precision NOT NULL
        );
        CREATE INDEX haip_sessions_by_age ON haip_sessions (updated_at);
        """,
    ),
    (
        2,
        "who numbers the events",
        """
        -- writer: 'single' (servers without [cluster]: the database numbers the events), or
        -- 'cluster:<key_prefix>' (one cluster's Redis numbers them): two numberings of one log corrupt it
        CREATE TABLE haip_meta (key text PRIMARY KEY, value text NOT NULL);
        """,
    ),
    (
        3,
        "numbers kept out of use after a crash",
        """
        -- a live transaction's tseqs up to this may have reached members before they were stored: a
        -- runtime that brings it back after a crash numbers on after it (its last_tseq once put away)
        ALTER TABLE haip_transactions ADD COLUMN reserved_tseq bigint NOT NULL DEFAULT 0;
        """,
    ),
]

#: The schema this runtime reads and writes.
LATEST = MIGRATIONS[-1][0]

#: ``haip_meta``'s ``writer`` of servers without ``[cluster]``.
SINGLE = "single"

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS haip_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    note text NOT NULL
)
"""


async def current_version(db: Db) -> int:
    """The highest migration applied (0 for a database haip-runtime never used). Asks the catalog
    with an ordinary query (its snapshot sees what another process committed while this one waited
    for the lock; ``to_regclass`` may answer from a catalog cache taken before)."""
    exists = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables"
        " WHERE tablename = 'haip_schema' AND schemaname = ANY (current_schemas(false)))"
    )
    if not exists:
        return 0
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM haip_schema"))


def refuse_newer(version: int, where: str) -> None:
    if version > LATEST:
        raise ConfigError(
            f"storage.url: {where} has haip-runtime schema version {version}; this haip-runtime knows up to"
            f" {LATEST}: run a newer haip-runtime (schemas only move forward)"
        )


async def migrate(db: Db, where: str, *, lock_timeout: float) -> int:
    """Bring the database to ``LATEST`` (under the advisory lock, waited for at most ``lock_timeout``
    seconds: then ``ConfigError``); the version it had before."""
    before = await current_version(db)  # current (every start but the first after an upgrade): no lock
    refuse_newer(before, where)
    if before == LATEST:
        return before
    async with db.transaction():
        await db.execute(f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}")
        try:
            await db.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        except asyncpg.exceptions.LockNotAvailableError as exc:
            raise ConfigError(
                f"storage.url: {where}: another process has held haip-runtime's migration lock for over"
                f" {lock_timeout:g} s (a migration still running, or a stuck session: see pg_locks)"
            ) from exc
        before = await current_version(db)
        refuse_newer(before, where)
        if before == LATEST:
            return before
        await db.execute(_VERSION_TABLE)
        for number, note, sql in MIGRATIONS:
            if number > before:
                await db.execute(sql)
                await db.execute("INSERT INTO haip_schema (version, note) VALUES ($1, $2)", number, note)
                logger.info("store: migrated %s to schema version %d (%s)", where, number, note)
    return before


def writer(cluster_prefix: str | None) -> str:
    """``haip_meta``'s ``writer`` of a server: ``single``, or ``cluster:<key_prefix>``."""
    return SINGLE if cluster_prefix is None else f"cluster:{cluster_prefix}"


def writer_conflict(where: str, found: str | None, mine: str) -> str | None:
    """Why a server whose ``writer`` is ``mine`` may not write the log whose ``haip_meta`` says ``found``
    (``None``: it may). Servers without ``[cluster]`` becoming a cluster is the upgrade path: allowed
    (stop them first); the other way, or to another cluster, is refused."""
    if found is None or found == mine or (found == SINGLE and mine.startswith("cluster:")):
        return None
    theirs = f"the cluster with {_numbering(found)}"
    if mine == SINGLE:  # (a cluster's database: only its nodes may write it)
        return (
            f"storage.url: {where} is the durable log of {theirs}; a server without [cluster] would number"
            " the same conversations apart, and each would drop the other's events. Give this server a"
            " database of its own, or make it a node of that cluster ([cluster] with its Redis and key_prefix)."
        )
    yours = f"a cluster with {_numbering(mine)}"
    return (
        f"storage.url: {where} is the durable log of {theirs}; {yours} would number the same conversations"
        " apart, and each would drop the other's events. Give this cluster a database of its own, or the"
        " same key_prefix, Redis and Redis database as that one. (If that cluster is this one, recorded before"
        " its Redis database was, or it moved here: stop its old nodes, then UPDATE haip_meta SET value ="
        f" '{mine}' WHERE key = 'writer'.)"
    )


def _numbering(writer: str) -> str:
    """``cluster:<key_prefix>[@<database>]`` in words."""
    prefix, _, database = writer.removeprefix("cluster:").partition("@")
    return f"key_prefix {prefix!r}" + (f" on Redis database {database}" if database else "")


async def read_writer(db: Db) -> str | None:
    """``haip_meta``'s ``writer`` (``None``: none yet, or a schema before it)."""
    if await current_version(db) < 2:
        return None
    value = await db.fetchval("SELECT value FROM haip_meta WHERE key = 'writer'")
    return None if value is None else str(value)


async def claim_writer(db: Db, where: str, mine: str) -> None:
    """Write this log as ``mine``, or refuse (``ConfigError``) if another numbering writes it: found by a
    tester, two clusters (their ``key_prefix`` differed) on one database each skipped the other's
    rows, and both logs lost events, silently."""
    async with db.transaction():
        await db.execute("INSERT INTO haip_meta (key, value) VALUES ('writer', $1) ON CONFLICT DO NOTHING", mine)
        found = str(await db.fetchval("SELECT value FROM haip_meta WHERE key = 'writer' FOR UPDATE"))
        refusal = writer_conflict(where, found, mine)
        if refusal is None and found != mine:
            await db.execute("UPDATE haip_meta SET value = $1 WHERE key = 'writer'", mine)
            logger.warning(
                "store: %s is the log of the cluster with %s from now on: a server without"
                " [cluster] may no longer use it (stop any that still does)",
                where,
                _numbering(mine),
            )
    if refusal is not None:
        raise ConfigError(refusal)
