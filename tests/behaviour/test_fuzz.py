"""Random and mutated envelopes against a real server: every answer is a valid envelope (or a close
with a documented code), and the server stays up for everyone else."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.events import ALL_EVENTS, ErrorCode
from tests.support.peers import KINDS, open_peer
from tests.support.raw import raw_peer
from tests.support.serving import LiveServer

pytestmark = pytest.mark.anyio

#: Close codes PROTOCOL.md section 14 documents for what a client can cause.
DOCUMENTED_CLOSES = {1000, 1002, 1008, 1009, 1013}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

FIELDS = ("id", "session", "transaction", "seq", "ts", "channel", "type", "payload", "run_id", "crit", "bin_len")


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible envelope, then mutated: fields dropped, retyped or replaced with noise."""
    envelope: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=12)),
        "session": "",
        "transaction": draw(st.none() | st.text(max_size=12)),
        "seq": draw(st.sampled_from(["2", "3", "0", "-1", "18446744073709551616", "x"])),
        "ts": "1",
        "channel": draw(st.sampled_from(["USER", "SYSTEM", "AGENT", "", "bad channel!"])),
        "type": draw(st.sampled_from(sorted(ALL_EVENTS)) | st.text(max_size=12)),
        "payload": draw(
            st.dictionaries(
                st.sampled_from(["toolName", "text", "tool", "call_id", "params", "reason", "nonce", "from_seq"]),
                json_values,
                max_size=4,
            )
            | json_values
        ),
    }
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            envelope.pop(field, None)
        else:
            envelope[field] = draw(json_values)
    return envelope


frames = st.one_of(
    envelopes().map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=64),
    json_values.map(json.dumps),
)


#: A PING whose PONG ends a batch; its seq is not a number, so no seq a fuzzed frame took can shadow it.
SENTINEL = json.dumps(
    {
        "id": "end",
        "session": "",
        "seq": "end",
        "ts": "1",
        "channel": "SYSTEM",
        "type": "PING",
        "payload": {"nonce": "end-of-batch"},
    }
)


def check_answer(frame: str) -> None:
    envelope = decode(frame, max_bytes=16 * 1024 * 1024)
    if envelope.type == "ERROR":
        assert isinstance(envelope.payload, dict) and envelope.payload["code"] in set(ErrorCode)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames, min_size=1, max_size=8))
async def test_random_and_mutated_envelopes_get_valid_answers(server: LiveServer, batch: list[str | bytes]) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token("fuzzer"))
        await peer.receive_type("INFO")
        try:
            for frame in batch:
                await peer.send_frame(frame)
            await peer.send_frame(SENTINEL)
            with anyio.fail_after(10):
                while True:
                    answer = await peer.ws.recv()
                    assert isinstance(answer, str)
                    check_answer(answer)
                    parsed = json.loads(answer)
                    if parsed["type"] == "PONG" and parsed["payload"].get("nonce") == "end-of-batch":
                        break
        except ConnectionClosed:
            assert peer.ws.close_code in DOCUMENTED_CLOSES


HOSTILE = st.one_of(
    st.sampled_from(["\\ud800", "\\udfff", "\\uDBFF", "\\udc00x"]).map(lambda escape: f'"{escape}"'),
    st.integers(min_value=310, max_value=6000).map(lambda digits: "9" * digits),
    st.integers(min_value=65, max_value=3000).map(lambda depth: "[" * depth + "]" * depth),
)
"""JSON the runtime must refuse: lone surrogate escapes, integers past a double, nesting past the cap."""


@st.composite
def hostile_frames(draw: st.DrawFn) -> str:
    """A well-formed envelope with one hostile value spliced in at a field or deep in its payload."""
    envelope = json.loads(SENTINEL) | {"id": "hostile", "seq": "h", "type": draw(st.sampled_from(["PING", "MESSAGE"]))}
    field = draw(st.sampled_from(["id", "seq", "payload", "nested", "key"]))
    marker = '"@@"'
    if field == "payload":
        envelope["payload"] = {"nonce": "@@", "text": "@@"}
    elif field == "nested":
        envelope["payload"] = {"text": "x", "extra": [{"a": ["@@"]}]}
    elif field == "key":
        envelope["payload"] = {"text": "x", "@@": 1}
        marker = '"@@"'
    else:
        envelope[field] = "@@"
    value = draw(HOSTILE)
    if field == "key" and not value.startswith('"'):
        value = '"\\ud800"'  # a key must be a string
    return json.dumps(envelope).replace(marker, value, 1)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=hostile_frames())
async def test_hostile_json_is_invalid_message_and_the_connection_goes_on(
    kind: str, server: LiveServer, frame: str
) -> None:
    token = server.token(f"hostile-{kind}")
    async with open_peer(kind, server, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        await peer.send_frame(frame)
        error = await peer.receive_type("ERROR")
        await peer.send_frame(SENTINEL)
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == "INVALID_MESSAGE", error
    assert pong["payload"]["nonce"] == "end-of-batch"


async def test_the_server_is_up_after_the_fuzzing(server: LiveServer) -> None:
    async with httpx2.AsyncClient() as http:
        health = (await http.get(f"{server.http_url}/health")).json()
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token("after"))
        ready = await peer.receive_type("INFO")
    assert health["status"] == "ok" and ready["payload"]["user"] == "after"
