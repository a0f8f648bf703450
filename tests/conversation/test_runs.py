"""The conversation layer's quotas: a member's runs across transactions (``RunLimit``) and a user's
open transactions (``TransactionRegistry.check_room``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pytest

from haip_runtime.config.models import LimitsConfig, TransactionsConfig
from haip_runtime.conversation.members import Member
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.runs import RunLimit
from haip_runtime.exceptions import ProtocolError
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
    for owner, ended in (("u", False), ("u", True), ("v", False)):
        transaction = registry.new(owner, None)
        transaction.ended = ended
        registry.live[transaction.id] = transaction
    await registry.check_room("u", "e")
    extra = registry.new("u", None)
    registry.live[extra.id] = extra
    with pytest.raises(ProtocolError) as caught:
        await registry.check_room("u", "e")
    assert caught.value.detail == {"limit": "limits.transactions_per_user"}


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
