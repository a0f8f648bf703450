"""The codec: tolerant decoding of what real clients send, and precise errors for the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import decode, parse_payload
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ErrorCode


def frame(**changes: Any) -> str:
    base: dict[str, Any] = {
        "id": "e1",
        "session": "s",
        "transaction": None,
        "seq": "1",
        "ts": "1",
        "channel": "USER",
        "type": "MESSAGE",
        "payload": "hi",
    }
    return json.dumps({**base, **changes})


def test_string_null_transaction_is_null() -> None:
    assert decode(frame(transaction="null")).transaction is None


def test_timestamp_seq_is_opaque_text_and_numbers_are_accepted() -> None:
    envelope = decode(frame(seq=1795608079581, ts=1795608079581))
    assert envelope.seq == "1795608079581" and envelope.ts == "1795608079581"
    assert decode(frame(seq="abc")).numeric_seq is None
    assert decode(frame(seq=str(2**64))).numeric_seq is None


def test_bare_string_message_payload_reads_as_text() -> None:
    envelope = decode(frame(payload="hello pirate"))
    assert parse_payload(envelope, p.Message) == p.Message(text="hello pirate")


def test_bare_string_payload_for_other_types_is_invalid_payload() -> None:
    with pytest.raises(DecodeError) as caught:
        parse_payload(decode(frame(type="TRANSACTION_START", payload="echo")))
    assert caught.value.code is ErrorCode.INVALID_PAYLOAD and caught.value.detail == {"where": "/payload"}


def test_payload_error_names_a_json_pointer() -> None:
    envelope = decode(frame(type="REPLAY_REQUEST", payload={"from_seq": {"x": 1}}))
    with pytest.raises(DecodeError) as caught:
        parse_payload(envelope)
    assert caught.value.detail == {"where": "/payload/from_seq"} and caught.value.related_id == "e1"


def test_unknown_fields_are_ignored_unless_critical() -> None:
    assert decode(frame(extra_field=1)).unknown_fields == ["extra_field"]
    with pytest.raises(DecodeError) as caught:
        decode(frame(extra_field=1, crit=True))
    assert caught.value.code is ErrorCode.UNSUPPORTED_TYPE


@pytest.mark.parametrize(
    ("raw", "where"),
    [("nope", "frame"), ('"a string"', "/"), (frame(thread_id="t" * 129), "/thread_id"), (frame(id=None), "/id")],
)
def test_invalid_envelopes_say_where(raw: str, where: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(raw)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE and caught.value.detail == {"where": where}


def test_frame_size_limit_is_in_bytes() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(frame(payload="é" * 600), max_bytes=1024)
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(id="big", seq="7", payload="x" * 2000), ErrorCode.MESSAGE_TOO_LARGE),
        (frame(id="bad", seq="7", channel="not a channel"), ErrorCode.INVALID_MESSAGE),
        (frame(id="crit", seq="7", crit=True, extra=1), ErrorCode.UNSUPPORTED_TYPE),
    ],
)
def test_a_refused_frame_says_its_id_and_seq_where_it_has_them(raw: str, code: ErrorCode) -> None:
    """So the client learns which of its envelopes failed, and the session counts its seq (no gap)."""
    with pytest.raises(DecodeError) as caught:
        decode(raw, max_bytes=1024)
    assert caught.value.code is code
    assert (caught.value.related_id, caught.value.seq) == (json.loads(raw)["id"], "7")


def test_a_refused_frames_seq_is_taken_as_an_envelopes_would_be() -> None:
    for seq, kept in ((7, "7"), ("8" * 32, "8" * 32), ("9" * 33, None), (True, None)):
        with pytest.raises(DecodeError) as caught:
            decode(json.dumps({"id": "i", "seq": seq, "type": "PING"}))
        assert caught.value.seq == kept, seq


def test_a_frame_far_over_the_limit_is_not_parsed_for_its_seq() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(frame(seq="7", payload="x" * 5000), max_bytes=1024)
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE
    assert (caught.value.related_id, caught.value.seq) == (None, None)


def test_event_encodes_its_payload_once_for_every_session() -> None:
    event = Event(type="MESSAGE_PART", payload={"message_id": "m", "text": "ü"}, transaction="t", run_id="r")
    first = json.loads(event.to_wire(session="a", seq=1, ack=None))
    second = json.loads(event.to_wire(session="b", seq=7, ack=3))
    assert first["payload"] == second["payload"] == {"message_id": "m", "text": "ü"}
    assert (first["session"], first["seq"], "ack" in first) == ("a", "1", False)
    assert (second["session"], second["seq"], second["ack"], second["run_id"]) == ("b", "7", "3", "r")
    assert decode(event.to_wire(session="a", seq=1, ack=None)).type == "MESSAGE_PART"


def test_transaction_start_accepts_agent_as_alias_of_tool_name() -> None:
    assert p.TransactionStart(agent="echo").agent_name == "echo"
    assert p.TransactionStart(toolName="echo", agent="other").agent_name == "echo"


@pytest.mark.parametrize("depth", [63, 1000, 100_000])
def test_json_nested_past_the_cap_is_invalid_message(depth: int) -> None:
    deep = frame(payload={"a": 0}).replace('{"a": 0}', '{"a": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(DecodeError) as caught:
        decode(deep)
    assert caught.value.code == ErrorCode.INVALID_MESSAGE and caught.value.detail == {"where": "frame", "limit": 64}


def test_json_nested_up_to_the_cap_decodes_and_many_flat_brackets_are_fine() -> None:
    at_cap = frame(payload={"a": 0}).replace('{"a": 0}', '{"a": ' + "[" * 62 + "]" * 62 + "}")
    assert decode(at_cap).type == "MESSAGE"
    wide = decode(frame(payload={"rows": [[i] for i in range(500)]}))
    assert len(wide.payload["rows"]) == 500  # type: ignore[index]


HEAD = '{"id":"1","session":"","seq":"1","ts":"1","channel":"USER","type":"MESSAGE",'


@pytest.mark.parametrize(
    "value",
    [
        '"\\ud800"',
        '"a\\uDFFFb"',
        '{"\\udc00": 1}',
        "9" * 5000,
        "-" + "1" * 400,
        "1e400",
        "[NaN, 1" + "0" * 320 + "]",
        "NaN",  # (a prober's find: NaN and the infinities were taken, and forwarded and stored as null)
        "[1, Infinity]",
        '{"x": -Infinity}',
    ],
)
def test_values_nothing_could_encode_or_store_are_invalid_message(value: str) -> None:
    frame = HEAD + '"payload":{"v":' + value + "}}"
    with pytest.raises(DecodeError) as caught:
        decode(frame)
    assert caught.value.code is ErrorCode.INVALID_MESSAGE and caught.value.detail == {"where": "frame"}


def test_a_surrogate_pair_and_a_long_but_finite_integer_are_kept() -> None:
    envelope = decode(HEAD + '"payload":{"t":"\\ud83d\\ude00","n":' + "1" * 30 + "}}")
    assert envelope.payload == {"t": "\U0001f600", "n": 1.111111111111111e29}
    assert Event(type="MESSAGE", payload=envelope.payload).payload_json  # and it encodes


def test_a_lone_surrogate_from_the_runtimes_own_side_is_sent_as_a_replacement_character() -> None:
    event = Event(type="MESSAGE", payload={"text": "a\ud800b", "n": 2**70})
    assert event.payload_json == '{"text":"a\ufffdb","n":' + str(2**70) + "}"
    assert event.payload_json.encode()  # valid UTF-8: it can be sent and stored


def test_what_the_runtime_writes_with_nan_reads_back() -> None:
    """A reviewer's find: a value orjson refuses (a non-string key, an integer past 64 bits) went through the
    standard library, which wrote NaN; the loader refuses NaN, so such an event, stored or on a cluster's
    bus, could not be read back."""
    import math

    from haip_runtime.protocol import fastjson

    for payload in ({"by_hour": {9: 1.5, 10: math.nan}}, {"id": 2**70, "scores": [math.inf, -math.inf, 1.0]}):
        text = fastjson.dumps(payload)
        assert "NaN" not in text and "Infinity" not in text
        assert fastjson.loads(text) in ({"by_hour": {"9": 1.5, "10": None}}, {"id": 2**70, "scores": [None, None, 1.0]})
    # a key NaN or infinite (a reviewer's find: the fallback raised, and the event could not be written)
    assert fastjson.loads(fastjson.dumps({math.nan: 1, math.inf: 2, 10**30: 3})) == {"nan": 1, "inf": 2, str(10**30): 3}
