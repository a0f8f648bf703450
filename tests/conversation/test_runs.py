"""The conversation layer's quotas: a member's runs across transactions (``RunLimit``) and a user's
open transactions (``TransactionRegistry.room_for``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import cast

import pytest

from haip_runtime.config.models import LimitsConfig, TransactionsConfig
from haip_runtime.conversation.members import Member
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.runs import RunLimit
from haip_runtime.exceptions import ProtocolError
from haip_runtime.store.base import TransactionRecord, TransactionState
from haip_runtime.store.memory import MemoryStore


@dataclass(eq=False)
class FakeMember:
    user: str
    id: str = "s"
    transactions: set[str] = field(default_factory=set)


@pytest.mark.anyio
async def test_transactions_per_user_count_only_open_ones_of_that_owner() -> None:
    registry = TransactionRegistry(
        TransactionsConfig(), {}, MemoryStore(), lambda *a: None, limits=LimitsConfig(transactions_per_user=2)
    )
    for number, (owner, ended) in enumerate((("u", False), ("u", True), ("v", False))):
        transaction = registry.new(owner, None)
        transaction.ended = ended
        registry.live[transaction.id] = transaction
        transaction.add_member(cast(Member, FakeMember(owner, id=f"m{number}")))
    assert await registry.room_for("u", "e") is None
    extra = registry.new("u", None)
    registry.live[extra.id] = extra
    extra.add_member(cast(Member, FakeMember("u", id="m3")))
    with pytest.raises(ProtocolError) as caught:  # both open ones have someone in them
        await registry.room_for("u", "e")
    assert caught.value.detail == {"limit": "limits.transactions_per_user"}
    assert "none can end to make room" in caught.value.message
    extra.remove_member(extra.members["m3"], quietly=True)
    assert await registry.room_for("u", "e") == extra.id  # nobody in it any more: it may end for a new one


@pytest.mark.anyio
async def test_at_the_limit_the_least_recently_saved_transaction_nobody_is_in_is_the_one_to_end() -> None:
    store = MemoryStore()
    registry = TransactionRegistry(
        TransactionsConfig(), {}, store, lambda *a: None, limits=LimitsConfig(transactions_per_user=3)
    )
    now = time.time()
    gone = TransactionRecord("gone", "u", ("echo",), ("u",), TransactionState.OPEN, now - 60, now - 10)
    store.save_transaction(gone)  # left memory (or the process restarted): only the store has it
    in_use, vacant = registry.new("u", None), registry.new("u", None)
    for transaction, updated in ((in_use, now - 30), (vacant, now - 20)):
        registry.live[transaction.id] = transaction
        store.save_transaction(replace(transaction.record(), updated_at=updated))
    in_use.add_member(cast(Member, FakeMember("u", id="m")))
    assert await registry.room_for("u", "e") == vacant.id  # saved before "gone", but in use: skipped
    assert await registry.room_for("u", "e", passed={vacant.id}) == "gone"  # (found in use since)
    vacant.ended = True
    assert await registry.room_for("u", "e") is None  # ended: it no longer counts
    vacant.ended = False
    store.lag = 0.5  # a store other processes share, without a bus: they may hold "gone", unseen here
    with pytest.raises(ProtocolError):
        await registry.room_for("u", "e", passed={vacant.id})


def test_a_members_runs_are_counted_across_transactions_and_refused_past_the_limit() -> None:
    limit = RunLimit(2)
    member, other = cast(Member, FakeMember("u", id="m")), cast(Member, FakeMember("u", id="o"))
    limit.check(member, 2, "e1")
    limit.claim(member)
    limit.claim(member)
    with pytest.raises(ProtocolError) as caught:
        limit.check(member, 1, "e2")
    limit.check(other, 2, "e3")  # its own count
    limit.release(member)
    limit.check(member, 1, "e4")
    limit.check(member, 0, "e5")  # nothing wanted: never refused
    assert caught.value.code == "RUN_LIMIT_EXCEEDED" and caught.value.related_id == "e2"
    assert limit.running(member) == 1
