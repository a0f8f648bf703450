"""Session bookkeeping without sockets: seq, ack, duplicates, replay window, outbox bound."""

from __future__ import annotations

import json

import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ALL_EVENTS, ErrorCode
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_session(clock: Clock | None = None) -> Session:
    return Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig(), clock=clock or Clock())


def inbound(seq: str, id: str | None = None) -> Envelope:
    envelope = {"id": id or seq, "session": "", "seq": seq, "ts": "1", "channel": "USER", "type": "PING", "payload": {}}
    return decode(json.dumps(envelope))


async def drain(outbox: Outbox) -> list[dict[str, object]]:
    outbox.close()
    return [json.loads(frame) async for frame in outbox.frames()]


def window_seqs(session: Session, start: int = 1) -> list[str]:
    frames = (session.window.get(seq) for seq in range(start, session.last_seq + 1))
    return [json.loads(frame)["seq"] for frame in frames if frame is not None]


async def test_outbound_seq_counts_from_one_and_is_recorded_while_detached() -> None:
    session = make_session()
    outbox = Outbox(16)
    session.attach(outbox)
    session.send("INFO", {"event": "a"})
    session.detach(outbox)
    session.send("INFO", {"event": "b"})
    assert [e["seq"] for e in await drain(outbox)] == ["1"]
    assert window_seqs(session) == ["1", "2"]


async def test_resume_resends_everything_after_last_rx_seq_in_order() -> None:
    session = make_session()
    for index in range(5):
        session.send("INFO", {"event": str(index)})
    outbox = Outbox(16)
    session.attach(outbox, last_rx_seq=3)
    session.send("INFO", {"event": "live"})
    assert [(e["seq"], e["payload"]) for e in await drain(outbox)] == [
        ("4", {"event": "3"}),
        ("5", {"event": "4"}),
        ("6", {"event": "live"}),
    ]


def test_window_keeps_the_larger_of_count_and_age() -> None:
    clock = Clock()
    session = make_session(clock)
    for index in range(1200):
        clock.now += 1  # 1200 s in all: older than the 300 s window
        session.send("INFO", {"event": str(index)})
    # Only the last 1000 survive (count bound), since every older one is also past 300 s.
    assert len(session.window) == 1000 and session.window.first_seq == 201
    with pytest.raises(ProtocolError) as caught:
        session.replay(200, None, "r")
    assert caught.value.code is ErrorCode.REPLAY_TOO_OLD


def test_young_envelopes_stay_beyond_the_count_bound() -> None:
    session = make_session()  # the clock stands still: everything is younger than 300 s
    for index in range(1500):
        session.send("INFO", {"event": str(index)})
    assert len(session.window) == 1500


def test_window_bytes_bound_wins_over_count_and_age() -> None:
    config = SessionConfig(replay_window_bytes=64 * 1024)
    session = Session(Principal("u"), negotiate(ALL_EVENTS), config, clock=Clock())
    for _ in range(100):
        session.send("INFO", {"event": "x" * 4000})
    assert session.window.bytes <= 64 * 1024
    assert 10 <= len(session.window) < 20 and session.window.last_seq == 100


async def test_replay_range_is_inclusive_and_keeps_original_seqs() -> None:
    session = make_session()
    outbox = Outbox(16)
    session.attach(outbox)
    for index in range(10):
        session.send("INFO", {"event": str(index)})
    session.replay(3, 5, "r")
    assert [e["seq"] for e in await drain(outbox)] == ["3", "4", "5"] + [str(n) for n in range(1, 11)]


def test_numbered_inbound_drops_duplicates_and_opaque_inbound_keeps_them() -> None:
    numbered = make_session()
    verdicts = [numbered.accept_inbound(inbound(s, id=f"n{i}")) for i, s in enumerate(("1", "2", "2", "3", "1"))]
    assert verdicts == [True, True, False, True, False]
    opaque = make_session()
    verdicts = [opaque.accept_inbound(inbound("1795608079581", id=f"o{i}")) for i in range(3)]
    assert verdicts == [True] * 3


def test_an_envelope_id_seen_lately_is_a_duplicate_whatever_its_seq() -> None:
    opaque = make_session()
    assert opaque.accept_inbound(inbound("1795608079581", id="same"))
    assert not opaque.accept_inbound(inbound("1795608079999", id="same"))


def test_an_envelope_resent_under_a_new_seq_is_dropped_and_its_seq_leaves_no_gap() -> None:
    """A prober's find: dropped as a duplicate by its id before its seq was counted, a resend under a new
    seq left a gap: the runtime asked for it (REPLAY_REQUEST), then gave up on it (SEQ_VIOLATION)."""
    numbered = make_session()
    verdicts = [numbered.accept_inbound(inbound(seq, id=id)) for seq, id in (("1", "a"), ("2", "b"), ("3", "b"))]
    assert verdicts == [True, True, False]
    assert numbered.missing_inbound() is None and numbered.inbound_state == (True, 3)
    assert numbered.accept_inbound(inbound("4", id="c")) and numbered.inbound_state == (True, 4)


async def test_an_envelope_held_past_a_gap_and_resent_under_a_new_seq_is_processed_once() -> None:
    """A reviewer's find: held (its id kept only once processed), a resend under a new seq was held too,
    and both were processed when the gap filled (a message said twice, a tool called twice)."""
    numbered = make_session()

    def message(seq: str, id: str) -> Envelope:
        envelope = {"id": id, "session": "", "seq": seq, "ts": "1", "channel": "USER", "type": "MESSAGE"}
        return decode(json.dumps({**envelope, "transaction": "t", "payload": {"text": id}}))

    assert numbered.take(message("1", "a"))
    assert not numbered.take(message("3", "c"))  # held: 2 is missing
    assert not numbered.take(message("4", "c"))  # the same envelope again, renumbered: its seq counted, itself dropped
    assert numbered.take(message("2", "b"))
    released = []
    while (held := numbered.released()) is not None:
        released.append(held.id)
    assert released == ["c"] and numbered.inbound_state == (True, 4) and numbered.missing_inbound() is None


def test_detached_session_expires_after_the_resume_timeout() -> None:
    clock = Clock()
    session = make_session(clock)
    outbox = Outbox(4)
    session.attach(outbox)
    session.detach(outbox)
    clock.now += 119
    assert not session.expired(clock.now)
    clock.now += 2
    assert session.expired(clock.now)
    outbox.discard()


def test_a_connection_that_falls_behind_is_closed_with_1013_instead_of_blocking() -> None:
    session = make_session()
    outbox = Outbox(16)
    session.attach(outbox)
    for index in range(16):
        session.send("INFO", {"event": str(index)})
    assert outbox.close_code is None
    session.send("INFO", {"event": "one too many"})
    assert outbox.close_code == 1013


async def test_resume_replays_more_than_the_outbox_bound() -> None:
    session = make_session()
    for index in range(1500):
        session.send("INFO", {"event": str(index)})
    outbox = Outbox(16)
    session.attach(outbox, last_rx_seq=0)
    for index in range(10):
        session.send("INFO", {"event": f"live {index}"})  # live frames after a big replay still fit
    assert outbox.close_code is None
    assert len(await drain(outbox)) == 1510


async def test_a_resume_from_the_front_of_a_full_window_survives_new_frames_arriving() -> None:
    clock = Clock()
    session = make_session(clock)
    for index in range(1000):
        session.send("INFO", {"event": str(index)})
    clock.now += 600  # every frame is now older than the 300 s bound, and there are 1000 of them
    outbox = Outbox(16)
    session.attach(outbox, last_rx_seq=0)  # from seq 1: the very front of the window
    for index in range(10):
        session.send("INFO", {"event": f"live {index}"})  # each would push the front out
    assert outbox.close_code is None
    frames = await drain(outbox)
    assert [int(str(e["seq"])) for e in frames] == list(range(1, 1011))
    session.send("INFO", {"event": "after"})  # once written, the old frames may go
    assert session.window.first_seq > 1


async def test_a_session_continued_from_another_node_resends_its_whole_backlog_and_numbers_on() -> None:
    """``carry_on`` keeps the frames another node sent at once: more than the count bound (they are the
    resume's backlog), the binary part of a two-frame envelope too; the session's own seqs follow them."""
    session = make_session()
    frames: list[tuple[int, str, bytes | None]] = [
        (seq, json.dumps({"seq": str(seq)}), b"pcm" if seq == 1200 else None) for seq in range(11, 1211)
    ]
    session.carry_on(frames, 1210, (True, 7), ["a", "b"])
    assert session.window.first_seq == 11 and len(session.window) == 1200
    audio = session.window.get(1200)
    assert audio is not None and audio.data == b"pcm"
    assert session.window.bytes == sum(len(text) for _, text, _ in frames) + 3
    outbox = Outbox(16)
    session.attach(outbox, last_rx_seq=10)
    session.send("INFO", {"event": "live"})
    assert [int(str(e["seq"])) for e in await drain(outbox)] == list(range(11, 1212))
    assert not session.take(inbound("7")) and not session.take(inbound("9", id="a"))  # its inbound order and dedup


def test_a_backlog_from_another_node_is_still_bound_by_bytes() -> None:
    config = SessionConfig(replay_window_bytes=64 * 1024)
    session = Session(Principal("u"), negotiate(ALL_EVENTS), config, clock=Clock())
    frames: list[tuple[int, str, bytes | None]] = [
        (seq, json.dumps({"seq": str(seq), "text": "x" * 4000}), None) for seq in range(1, 101)
    ]
    session.carry_on(frames, 100, (None, 0), [])
    assert session.window.bytes <= 64 * 1024
    assert 10 <= len(session.window) < 20 and session.window.last_seq == 100


def test_sessions_accepting_the_same_events_share_one_set() -> None:
    """Clients of one kind all send the same accept_events: their sessions keep one copy of it."""
    first, second = Session.provisional(SessionConfig()), Session.provisional(SessionConfig())
    first.authenticate(Principal("a"), negotiate(["MESSAGE", "INFO"]))
    second.authenticate(Principal("b"), negotiate(["INFO", "MESSAGE"]))
    assert first.accepted == second.accepted == {"MESSAGE", "INFO", "HAI", "ERROR", "PING", "PONG"}
    assert first.accepted is second.accepted
