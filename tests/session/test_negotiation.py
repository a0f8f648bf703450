"""accept_events downgrades (PROTOCOL.md section 12)."""

from __future__ import annotations

from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS, TRANSACTION_ERA_EVENTS
from haip_runtime.session.negotiation import Downgrader, negotiate

LEGACY = Downgrader(negotiate(TRANSACTION_ERA_EVENTS))


def kinds(events: list[Event]) -> list[tuple[str, object]]:
    return [(e.type, e.payload) for e in events]


def test_unknown_names_are_ignored_and_errors_always_pass() -> None:
    assert negotiate(["MESSAGE", "BOGUS"]) == {"MESSAGE", "HAI", "ERROR", "PING", "PONG"}
    assert negotiate(None) == TRANSACTION_ERA_EVENTS


def test_stream_becomes_one_message_at_the_end() -> None:
    down = Downgrader(negotiate(TRANSACTION_ERA_EVENTS))
    out = []
    for event in [
        Event("MESSAGE_START", {"message_id": "m", "author": "a"}),
        Event("MESSAGE_PART", {"message_id": "m", "text": "Hel"}),
        Event("MESSAGE_PART", {"message_id": "m", "text": "lo"}),
        Event("MESSAGE_END", {"message_id": "m"}),
    ]:
        out += down.adapt(event)
    assert kinds(out) == [("MESSAGE", "Hello")] and out[0].channel == "AGENT"


def test_interleaved_streams_stay_apart() -> None:
    down = Downgrader(negotiate(TRANSACTION_ERA_EVENTS))
    for mid in "ab":
        down.adapt(Event("MESSAGE_START", {"message_id": mid, "author": "x"}))
    down.adapt(Event("MESSAGE_PART", {"message_id": "a", "text": "A"}))
    down.adapt(Event("MESSAGE_PART", {"message_id": "b", "text": "B"}))
    assert kinds(down.adapt(Event("MESSAGE_END", {"message_id": "b"}))) == [("MESSAGE", "B")]
    assert kinds(down.adapt(Event("MESSAGE_END", {"message_id": "a"}))) == [("MESSAGE", "A")]


def test_tool_events_become_info_and_runs_are_not_sent_but_a_run_error_is_an_error() -> None:
    call = LEGACY.adapt(Event("TOOL_CALL", {"call_id": "c", "tool": "demo.add"}))
    assert kinds(call) == [("INFO", {"event": "tool", "action": "call", "call_id": "c", "tool": "demo.add"})]
    assert LEGACY.adapt(Event("RUN_STARTED", {"run_id": "r", "agent": "echo"})) == []
    assert LEGACY.adapt(Event("RUN_FINISHED", {"run_id": "r", "status": "OK"})) == []
    run_error = Event("RUN_ERROR", {"run_id": "r", "code": "INTERNAL_ERROR", "message": "boom"})
    error = LEGACY.adapt(run_error)
    assert [e.type for e in error] == ["ERROR"] and error[0].id != run_error.id
    assert error[0].payload == {"code": "INTERNAL_ERROR", "message": "boom", "related_id": "r"}


def test_audio_chunk_becomes_audio_and_pause_is_never_sent() -> None:
    assert [e.type for e in LEGACY.adapt(Event("AUDIO_CHUNK", {"mime": "audio/opus"}))] == ["AUDIO"]
    assert LEGACY.adapt(Event("PAUSE_CHANNEL", {"channel": "AGENT"})) == []


def test_object_message_reaches_legacy_clients_as_text_and_rich_clients_as_object() -> None:
    message = Event("MESSAGE", {"text": "hi", "author": "bob", "message_id": "m"})
    assert LEGACY.adapt(message)[0].payload == "hi"
    assert Downgrader(negotiate(ALL_EVENTS)).adapt(message)[0].payload == message.payload


def test_client_without_info_gets_nothing_for_tool_events() -> None:
    assert Downgrader(negotiate(["MESSAGE"])).adapt(Event("TOOL_DONE", {"call_id": "c"})) == []


def test_a_long_stream_is_buffered_in_linear_time() -> None:
    # 16,000 parts used to re-sum every buffered part on each new one (quadratic: seconds of blocked loop).
    down = Downgrader(negotiate(TRANSACTION_ERA_EVENTS))
    down.adapt(Event("MESSAGE_START", {"message_id": "m", "author": "a"}))
    buffered = down._streams["m"]
    for _ in range(16_000):
        down.adapt(Event("MESSAGE_PART", {"message_id": "m", "text": "tok "}))
    assert buffered.chars == 64_000 and len(buffered.parts) == 16_000
    assert kinds(down.adapt(Event("MESSAGE_END", {"message_id": "m"}))) == [("MESSAGE", "tok " * 16_000)]
    assert "m" not in down._streams


def test_a_runaway_stream_stops_growing_at_the_bound() -> None:
    down = Downgrader(negotiate(TRANSACTION_ERA_EVENTS))
    big = "x" * (1024 * 1024)
    for _ in range(6):
        down.adapt(Event("MESSAGE_PART", {"message_id": "m", "text": big}))
    assert down._streams["m"].chars == 4 * 1024 * 1024
