"""Quotas (`[limits]`) of the session layer: the token bucket, a session's own rate and tool calls, a
user's sessions and their rate together. A transaction's members, a user's transactions and a member's
runs are the conversation layer's (tests/conversation/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pytest

import haip_runtime.session.limits as limits_module
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import LimitsConfig, SessionConfig
from haip_runtime.exceptions import HandshakeError, ProtocolError
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.limits import TokenBucket, UserQuotas
from haip_runtime.session.negotiation import negotiate
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
    id: str = "s"
    transactions: set[str] = field(default_factory=set)


def session(user: str, limits: LimitsConfig, clock: Clock | None = None) -> Session:
    return Session(Principal(user), negotiate(ALL_EVENTS), SessionConfig(), limits=limits, clock=clock or Clock())


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
    config = LimitsConfig(messages_per_second=1, message_burst=1)
    first, second = session("a", config, clock), session("a", config, clock)
    first.check_rate(envelope())
    with pytest.raises(ProtocolError) as caught:
        first.check_rate(envelope("e2"))
    second.check_rate(envelope())  # its own bucket
    clock.now += 1
    first.check_rate(envelope())
    assert caught.value.code == "RATE_LIMITED" and caught.value.related_id == "e2"
    assert caught.value.detail == {"limit": "limits.messages_per_second"}


def test_a_new_session_replaces_the_oldest_disconnected_ones_or_is_refused() -> None:
    quotas = UserQuotas(LimitsConfig(sessions_per_user=3))
    old, older, live = FakeSession("u", detached_at=20), FakeSession("u", detached_at=10), FakeSession("u")
    others = [FakeSession("v"), FakeSession("v"), FakeSession("v")]
    sessions = cast(list[Session], [old, older, live, *others])
    assert quotas.sessions_to_drop(sessions, "u") == [cast(Session, older)]
    with pytest.raises(HandshakeError) as caught:
        quotas.sessions_to_drop(sessions, "v")
    assert quotas.sessions_to_drop(sessions, "w") == []
    assert caught.value.code == "RATE_LIMITED" and caught.value.close_code == 1008


def test_tool_calls_in_flight_are_claimed_and_released() -> None:
    own = session("u", LimitsConfig(tool_calls_per_session=2))
    own.claim_tool_call("a")
    own.claim_tool_call("b")
    with pytest.raises(ProtocolError) as caught:
        own.claim_tool_call("c")
    own.release_tool_call()
    own.claim_tool_call("d")
    assert caught.value.related_id == "c" and own.tool_calls == 2


def test_a_users_sessions_share_the_user_rate_and_idle_users_are_forgotten() -> None:
    clock = Clock()
    quotas = UserQuotas(LimitsConfig(message_burst=10, user_messages_per_second=1, user_message_burst=3), clock)
    for user in ("a", "a", "a"):
        quotas.check_message(user, "e")
    with pytest.raises(ProtocolError) as caught:
        quotas.check_message("a", "e9")
    quotas.check_message("b", "e")
    assert caught.value.detail == {"limit": "limits.user_messages_per_second"}
    assert caught.value.related_id == "e9"
    clock.now += 10
    quotas._forget_idle_users(clock.now)
    assert quotas._user_buckets == {}


def test_the_user_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "MAX_TRACKED_USERS", 2)
    clock = Clock()
    quotas = UserQuotas(LimitsConfig(user_messages_per_second=1, user_message_burst=1), clock)
    for number in range(2):
        quotas.check_message(f"u{number}", "e")
    clock.now += 5
    quotas.check_message("late", "e")
    assert list(quotas._user_buckets) == ["late"]


def accepted(quotas: UserQuotas, user: str, count: int) -> int:
    taken = 0
    for number in range(count):
        try:
            quotas.check_message(user, f"e{number}")
        except ProtocolError:
            continue
        taken += 1
    return taken


def test_in_a_cluster_each_node_allows_its_share_of_a_users_rate() -> None:
    clock = Clock()
    quotas = UserQuotas(LimitsConfig(user_messages_per_second=10, user_message_burst=8), clock)
    assert accepted(quotas, "ann", 2) == 2  # a bucket made with the whole burst...
    quotas.share(4)  # ...is cut to this node's share when a cluster of four is seen
    assert (quotas.user_rate, quotas.user_burst) == (2.5, 2.0)
    assert accepted(quotas, "ann", 10) == 2
    clock.now += 1
    assert accepted(quotas, "ann", 10) == 2  # refilled at 2.5 a second, up to the share of the burst
    assert accepted(quotas, "bob", 10) == 2  # new users get the share too
    with pytest.raises(ProtocolError) as caught:
        quotas.check_message("bob", "over")
    assert "more than 2.5 messages a second" in caught.value.message  # what was applied here, and why
    assert "on this node (10 shared by 4 nodes)" in caught.value.message
    quotas.share(0)  # never less than one node
    clock.now += 10
    assert quotas.nodes == 1 and accepted(quotas, "ann", 20) == 8


def test_a_share_of_the_burst_is_at_least_one_message() -> None:
    quotas = UserQuotas(LimitsConfig(user_messages_per_second=1, user_message_burst=1))
    quotas.share(3)
    assert quotas.user_burst == 1.0 and accepted(quotas, "ann", 3) == 1
