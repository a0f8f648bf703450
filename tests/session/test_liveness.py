"""A session's deadlines: owned by the session, handed from one connection to the next on a resume."""

from __future__ import annotations

import json
import time

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.session.timers import Timers
from haip_runtime.session.window import Outbox
from haip_runtime.transports.base import Link


def sent_types(session: Session) -> list[str]:
    frames = (session.window.get(seq) for seq in range(1, session.last_seq + 1))
    return [json.loads(frame)["type"] for frame in frames if frame is not None]


def test_a_resume_on_a_second_connection_stops_the_first_ones_deadlines_and_keeps_its_own() -> None:
    timers = Timers()
    config = SessionConfig(heartbeat_interval_seconds=30, heartbeat_timeout_seconds=10)
    session = Session(Principal("ann", expires_at=time.time() + 3600), negotiate(ALL_EVENTS), config)
    first, second = Outbox(100), Outbox(100)
    session.attach(first)
    session.watch(timers, Link("memory"))
    assert len(timers) == 2  # the next PING and the token's expiry
    session.attach(second, session.last_seq)  # the client resumed elsewhere; the first connection is told to close
    session.watch(timers, Link("memory"))
    assert len(timers) == 2 and session.liveness is not None and session.liveness.outbox is second
    session.detach(first)  # the first connection's own ending leaves the second's deadlines alone
    assert len(timers) == 2 and session.liveness is not None
    session.detach(second)
    assert len(timers) == 0 and session.liveness is None
    assert first.close_code == 1000 and first.close_reason == "session resumed on another connection"


def test_a_silent_peer_is_pinged_then_dropped_and_a_transport_that_watches_is_trusted() -> None:
    timers = Timers()
    config = SessionConfig(heartbeat_interval_seconds=30, heartbeat_timeout_seconds=10)
    silent = Session(Principal("ann"), negotiate(ALL_EVENTS), config)
    trusted = Session(Principal("bob"), negotiate(ALL_EVENTS), config)
    silent_outbox, trusted_outbox = Outbox(100), Outbox(100)
    silent.attach(silent_outbox)
    trusted.attach(trusted_outbox)
    silent.watch(timers, Link("memory", watches_liveness=False))
    trusted.watch(timers, Link("websocket", watches_liveness=True))
    for liveness in (silent.liveness, trusted.liveness):
        assert liveness is not None
        liveness._heartbeat()  # the interval is over: PING
        liveness._check_heard(0, time.monotonic())  # the timeout after it: nothing was heard
    assert sent_types(silent) == sent_types(trusted) == ["PING"]
    assert silent_outbox.close_code == 1013 and silent_outbox.close_reason == "heartbeat timeout"
    assert trusted_outbox.close_code is None
