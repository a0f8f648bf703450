"""What the runtime does when its store fails: members are told, ``/health`` and ``/metrics`` show it.

The store (``store/sqlite.py``) never loses a write silently: while it cannot write it keeps the
writes in memory and retries, and calls ``on_storage`` once per transaction per outage. Here
that becomes an ``ERROR STORAGE_UNAVAILABLE`` to the members of that transaction, who go on talking
live but learn that their history is not being written (it waits in memory, bounded by
``storage.max_pending_writes``, and is lost if the process stops first); when the store writes
again (what waited is then stored) they get ``INFO {"event": "storage", "state": "ok"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.exceptions import ProtocolError
from haip_runtime.observability.metrics import counter, gauge
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.errors import error_payload
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.store.base import StorageState, Store

if TYPE_CHECKING:
    from prometheus_client.core import Metric


def tell_members(transactions: TransactionRegistry) -> Callable[[str, str | None], None]:
    """The store's ``on_storage``: an ERROR (or, once it writes again, an INFO) to every member of
    the transaction, not logged in it."""

    def told(transaction_id: str, error: str | None) -> None:
        transaction = transactions.live.get(transaction_id)
        if transaction is None or transaction.ended:
            return
        if error is None:
            event = Event(EventType.INFO, {"event": "storage", "state": "ok"}, transaction=transaction_id)
        else:
            message = (
                f"history is not being written: the store cannot write ({error}); the conversation goes on live,"
                " and what is said waits in memory until the store is back"
            )
            payload = error_payload(ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, message))
            event = Event(EventType.ERROR, payload, transaction=transaction_id)
        for member in list(transaction.members.values()):
            member.deliver(event)

    return told


def storage_status(backend: str, store: Store) -> dict[str, object]:
    """The ``storage`` section of ``/health``."""
    return {"backend": backend, "pending_writes": store.pending, **store.health.public()}


def storage_metrics(store: Store) -> Iterable[Metric]:
    health = store.health
    yield gauge(
        "haip_storage_up", "1 if the store can write and read, 0 while it cannot.", health.state is StorageState.OK
    )
    yield gauge("haip_storage_pending_writes", "Writes waiting for the store.", store.pending)
    yield counter(
        "haip_storage_writes_failed",
        "Failed store batches; writes lost (a row that cannot be stored) or dropped (too many waiting).",
        {
            "batch_failed": health.write_failures,
            "write_lost": health.writes_lost,
            "write_dropped": health.writes_dropped,
        },
    )
