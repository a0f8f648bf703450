"""Quotas (`[limits]`) on their own: the token bucket, sessions per user, members, tool calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

import haip_runtime.session.limits as limits_module
from haip_runtime.config.models import LimitsConfig
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import HandshakeError, ProtocolError
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.session.limits import Limits, TokenBucket
from haip_runtime.session.session import Session


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeSession:
    user: str
    detached_at: float | None = None


@dataclass(eq=False)
class FakeTransaction:
    owner: str
    id: str = "t1"
    ended: bool = False
    members: dict[str, Any] = field(default_factory=dict)

    def is_member(self, session: Any) -> bool:
        return session in self.members.values()


def envelope(id: str = "e1") -> Envelope:
    return Envelope.model_validate(
        {"id": id, "session": "", "seq": "1", "ts": "1", "channel": "USER", "type": "PING", "payload": {}}
    )


def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert [bucket.take(100) for _ in range(4)] == [True, True, True, False]  # never more than the burst


def test_message_rate_is_per_session_and_names_the_limit() -> None:
    clock = Clock()
    limits = Limits(LimitsConfig(messages_per_second=1, message_burst=1), clock)
    first, second = FakeSession("a"), FakeSession("a")
    limits.check_message(cast(Session, first), envelope())
    with pytest.raises(ProtocolError) as caught:
        limits.check_message(cast(Session, first), envelope("e2"))
    limits.check_message(cast(Session, second), envelope())  # its own bucket
    clock.now += 1
    limits.check_message(cast(Session, first), envelope())
    assert caught.value.code == "RATE_LIMITED" and caught.value.related_id == "e2"
    assert caught.value.detail == {"limit": "limits.messages_per_second"}


def test_a_new_session_replaces_the_oldest_disconnected_ones_or_is_refused() -> None:
    limits = Limits(LimitsConfig(sessions_per_user=3))
    old, older, live = FakeSession("u", detached_at=20), FakeSession("u", detached_at=10), FakeSession("u")
    others = [FakeSession("v"), FakeSession("v"), FakeSession("v")]
    sessions = cast(list[Session], [old, older, live, *others])
    assert limits.admit_session(sessions, "u") == [cast(Session, older)]
    with pytest.raises(HandshakeError) as caught:
        limits.admit_session(sessions, "v")
    assert limits.admit_session(sessions, "w") == []
    assert caught.value.code == "RATE_LIMITED" and caught.value.close_code == 1008


def test_transactions_per_user_count_only_open_ones_of_that_owner() -> None:
    limits = Limits(LimitsConfig(transactions_per_user=2))
    open_ones = [FakeTransaction("u"), FakeTransaction("u", ended=True), FakeTransaction("v")]
    limits.check_transactions(cast(list[Transaction], open_ones), "u", "e")
    with pytest.raises(ProtocolError) as caught:
        limits.check_transactions(cast(list[Transaction], [*open_ones, FakeTransaction("u")]), "u", "e")
    assert caught.value.detail == {"limit": "limits.transactions_per_user"}


def test_members_per_transaction_let_members_rejoin() -> None:
    limits = Limits(LimitsConfig(members_per_transaction=1))
    member, stranger = FakeSession("u"), FakeSession("u")
    transaction = FakeTransaction("u", members={"m": member})
    limits.check_members(cast(Transaction, transaction), cast(Session, member), "e")
    with pytest.raises(ProtocolError):
        limits.check_members(cast(Transaction, transaction), cast(Session, stranger), "e")


def test_tool_calls_in_flight_are_claimed_and_released() -> None:
    limits = Limits(LimitsConfig(tool_calls_per_session=2))
    session = cast(Session, FakeSession("u"))
    limits.claim_tool_call(session, "a")
    limits.claim_tool_call(session, "b")
    with pytest.raises(ProtocolError) as caught:
        limits.claim_tool_call(session, "c")
    limits.release_tool_call(session)
    limits.claim_tool_call(session, "d")
    assert caught.value.related_id == "c" and limits.tool_calls_in_flight(session) == 2


def test_a_users_sessions_share_the_user_rate_and_idle_users_are_forgotten() -> None:
    clock = Clock()
    config = LimitsConfig(message_burst=10, user_messages_per_second=1, user_message_burst=3)
    limits = Limits(config, clock)
    first, second, other = FakeSession("a"), FakeSession("a"), FakeSession("b")
    for session in (first, second, first):
        limits.check_message(cast(Session, session), envelope())
    with pytest.raises(ProtocolError) as caught:
        limits.check_message(cast(Session, second), envelope("e9"))
    limits.check_message(cast(Session, other), envelope())
    assert caught.value.detail == {"limit": "limits.user_messages_per_second"}
    clock.now += 10
    limits._forget_idle_users(clock.now)
    assert limits._user_buckets == {}


def test_the_user_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "MAX_TRACKED_USERS", 2)
    clock = Clock()
    limits = Limits(LimitsConfig(user_messages_per_second=1, user_message_burst=1), clock)
    for number in range(2):
        limits.check_message(cast(Session, FakeSession(f"u{number}")), envelope())
    clock.now += 5
    limits.check_message(cast(Session, FakeSession("late")), envelope())
    assert list(limits._user_buckets) == ["late"]
