"""Stores: where conversations outlive memory. The only code that touches SQLite and PostgreSQL."""

from __future__ import annotations

from haip_runtime.config.models import StorageConfig
from haip_runtime.store.base import (
    Cursor,
    SessionRecord,
    Store,
    TransactionRecord,
    TransactionState,
    event_from_json,
    event_to_json,
)
from haip_runtime.store.memory import MemoryStore
from haip_runtime.store.postgres import PostgresStore
from haip_runtime.store.sqlite import SqliteStore

__all__ = [
    "Cursor",
    "MemoryStore",
    "PostgresStore",
    "SessionRecord",
    "SqliteStore",
    "Store",
    "TransactionRecord",
    "TransactionState",
    "event_from_json",
    "event_to_json",
    "open_store",
]


def open_store(config: StorageConfig, *, clustered: bool = False, cluster_prefix: str | None = None) -> Store:
    """The store ``[storage]`` describes (not yet entered: use it with ``async with``).

    ``clustered``: the nodes of a cluster share it, and the bus numbers the events (PostgreSQL only:
    ``[cluster]`` needs it, which the config check says); ``cluster_prefix``: that cluster's key prefix
    (a database is one cluster's log)."""
    if config.backend == "sqlite":
        return SqliteStore(
            config.path, flush_interval=config.flush_interval_seconds, max_pending=config.max_pending_writes
        )
    if config.backend == "postgres":
        store = PostgresStore(config)
        store.numbered_by_caller = clustered
        store.cluster_prefix = cluster_prefix if clustered else None
        return store
    return MemoryStore()
