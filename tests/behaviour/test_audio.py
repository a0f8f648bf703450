"""Audio (PROTOCOL.md section 9) over a real uvicorn: inline and two-frame, to the agent's ``on_audio``
hook (the tone plugin) and to other members, the AUDIO/AUDIO_CHUNK downgrade, limits and errors."""

from __future__ import annotations

import base64
import io
import json
import os
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from plugins.tone import tone_wav
from tests.support.peers import open_peer
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024
EVERYTHING: dict[str, Any] = {"accept_events": list(ALL_EVENTS)}
BINARY: dict[str, Any] = {"capabilities": {"binary_frames": True}}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    agents = {"tone": {"plugin": "plugins/tone.py:ToneAgent"}}
    with live_server(make_config({"agents": agents, "server": {"max_frame_bytes": LIMIT}})) as server:
        yield server


@asynccontextmanager
async def member(live: LiveServer, tx: str | None = None, **hai: Any) -> AsyncIterator[tuple[RawPeer, str]]:
    """A connected client of alice's; it starts a transaction with the tone agent, or joins ``tx``."""
    async with raw_peer(live.ws_url) as peer:
        await peer.receive()
        await peer.hai(live.token("alice"), **hai)
        await peer.receive_type("INFO")
        if tx is None:
            await peer.send("TRANSACTION_START", {"toolName": "tone"}, transaction="ref")
            tx = str((await peer.receive_type("TRANSACTION_START"))["transaction"])
        else:
            await peer.send("TRANSACTION_JOIN", {}, transaction=tx)
            await peer.receive_type("TRANSACTION_JOIN")
        yield peer, tx


async def next_audio(peer: RawPeer, type: str) -> tuple[dict[str, Any], bytes]:
    """The next audio envelope of ``type`` and its bytes (its binary frame, or its base64 data)."""
    with anyio.fail_after(10):
        while True:
            frame = await peer.ws.recv()
            if isinstance(frame, bytes):
                continue
            envelope = json.loads(frame)
            if envelope["type"] == type:
                if "bin_len" in envelope:
                    data = await peer.ws.recv()
                    assert isinstance(data, bytes)
                    return envelope, data
                return envelope, base64.b64decode(envelope["payload"].get("data", ""))


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


async def test_inline_audio_reaches_the_agent_and_the_other_members_and_a_tone_comes_back(live: LiveServer) -> None:
    clip = tone_wav(1000, 0.5, amplitude=0.5)
    async with member(live, **EVERYTHING) as (speaker, tx), member(live, tx) as (legacy, _):
        await speaker.send(
            "AUDIO_CHUNK", {"mime": "audio/wav", "data": base64.b64encode(clip).decode()}, transaction=tx
        )
        heard, heard_bytes = await next_audio(legacy, "AUDIO")  # a transaction-era client gets AUDIO
        said = await speaker.receive_type("MESSAGE_PART")
        tone, tone_bytes = await next_audio(speaker, "AUDIO_CHUNK")
    assert heard_bytes == clip and heard["payload"]["author"] == "alice" and heard["channel"] == "AUDIO_IN"
    assert said["payload"]["text"].startswith("heard 0.50 s at -9.0 dBFS RMS (peak -6.0 dBFS)")
    assert tone["channel"] == "AUDIO_OUT" and tone["payload"]["mime"] == "audio/wav"
    assert wav_seconds(tone_bytes) == 0.5 and tone["payload"]["duration_ms"] == 500


async def test_two_frame_audio_round_trips_byte_exactly(live: LiveServer) -> None:
    data = os.urandom(40_000)
    async with member(live, **EVERYTHING, **BINARY) as (speaker, tx), member(live, tx, **BINARY) as (other, _):
        await speaker.send(
            "AUDIO",
            {"mime": "audio/opus", "message_id": "clip-1"},
            transaction=tx,
            bin_len=len(data),
            bin_mime="audio/opus",
        )
        await speaker.send_frame(data)
        envelope, received = await next_audio(other, "AUDIO")
        answer = await speaker.receive_type("MESSAGE_PART")
    assert received == data
    assert (envelope["bin_len"], envelope["bin_mime"], envelope["payload"]["message_id"]) == (
        len(data),
        "audio/opus",
        "clip-1",
    )
    assert "data" not in envelope["payload"]
    assert answer["payload"]["text"] == "got 40000 bytes of audio/opus; I can only measure 16-bit PCM WAV"


async def test_a_mismatched_bin_len_gets_binary_frame_error_and_the_session_lives(live: LiveServer) -> None:
    async with member(live, **BINARY) as (peer, tx):
        sent = await peer.send("AUDIO", {"mime": "audio/opus"}, transaction=tx, bin_len=10, bin_mime="audio/opus")
        await peer.send_frame(b"12345")
        mismatch = await peer.receive_type("ERROR")
        await peer.send_frame(b"no envelope announced me")
        unannounced = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "alive"})
        pong = await peer.receive_type("PONG")
    assert mismatch["payload"]["code"] == "BINARY_FRAME_ERROR" and mismatch["payload"]["related_id"] == sent
    assert unannounced["payload"]["code"] == "BINARY_FRAME_ERROR"
    assert pong["payload"] == {"nonce": "alive"}
    assert mismatch["ack"] == str(peer.seq - 1) and pong["ack"] == str(peer.seq)  # the pair took its seq: no gap


async def test_audio_past_the_size_limit_is_refused(live: LiveServer) -> None:
    async with member(live, **BINARY) as (peer, tx):
        too_big = LIMIT + 10  # within the WebSocket frame limit, past the audio limit
        await peer.send("AUDIO", {"mime": "audio/opus"}, transaction=tx, bin_len=too_big, bin_mime="audio/opus")
        await peer.send_frame(bytes(too_big))
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "MESSAGE_TOO_LARGE"


@pytest.mark.parametrize("kind", ["sse", "stream"])
async def test_http_transports_carry_audio_inline_and_refuse_binary_frames(kind: str, live: LiveServer) -> None:
    clip = tone_wav(500, 0.1)
    async with open_peer(kind, live, live.token("alice")) as peer:
        await peer.receive()
        await peer.hai(live.token("alice"), **EVERYTHING, **BINARY)
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"toolName": "tone"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        await peer.send("AUDIO", {"mime": "audio/opus"}, transaction=tx, bin_len=4, bin_mime="audio/opus")
        error = await peer.receive_type("ERROR")
        await peer.send("AUDIO", {"mime": "audio/wav", "data": base64.b64encode(clip).decode()}, transaction=tx)
        tone = await peer.receive_type("AUDIO_CHUNK")
    assert error["payload"]["code"] == "BINARY_FRAME_ERROR"
    assert "bin_len" not in tone and wav_seconds(base64.b64decode(tone["payload"]["data"])) == 0.1


def test_a_two_frame_envelope_is_inlined_for_a_text_only_transport() -> None:
    session = Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig())
    session.binary_frames = True  # it was on WebSocket; it resumes on SSE, say
    data = os.urandom(300)
    payload = {"message_id": "m", "mime": "audio/wav", "data": base64.b64encode(data).decode()}
    session.deliver(Event("AUDIO_CHUNK", payload, channel="AUDIO_OUT"))
    frame = session.window.get(1)
    assert frame is not None and frame.data == data and frame.size == len(frame) + 300
    assert json.loads(frame)["bin_len"] == 300 and "data" not in json.loads(frame)["payload"]
    inline = json.loads(frame.inline())
    assert "bin_len" not in inline and base64.b64decode(inline["payload"]["data"]) == data


async def test_audio_no_agent_hears_reaches_the_members_and_its_sender_is_told() -> None:
    """A tester's find: /say to an agent with no speech and no on_audio got no word at all (a piped chat
    waited for ever). The other members still get the audio; the sender gets INFO audio.unheard."""
    clip = base64.b64encode(tone_wav(440, 0.2)).decode()
    with live_server(make_config({"agents": {"echo": {"plugin": "echo"}}})) as deaf:
        async with raw_peer(deaf.ws_url) as speaker, raw_peer(deaf.ws_url) as other:
            for peer in (speaker, other):
                await peer.receive()
                await peer.hai(deaf.token("alice"), **EVERYTHING)
                await peer.receive_type("INFO")
            await speaker.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
            tx = str((await speaker.receive_type("TRANSACTION_START"))["transaction"])
            await other.send("TRANSACTION_JOIN", {}, transaction=tx)
            await other.receive_type("TRANSACTION_JOIN")
            for chunk in ({"message_id": "a1", "data": clip}, {"message_id": "a1", "data": clip, "final": True}):
                await speaker.send("AUDIO_CHUNK", {"mime": "audio/wav", **chunk}, transaction=tx)
            unheard = await speaker.receive_type("INFO")
            while unheard["payload"].get("event") != "audio.unheard":
                unheard = await speaker.receive_type("INFO")
            heard = [(await next_audio(other, "AUDIO_CHUNK"))[0] for _ in range(2)]
            await speaker.send("PING", {"nonce": "after"})
            later = [await speaker.receive() for _ in range(1)]
    assert unheard["transaction"] == tx and unheard["payload"]["message_id"] == "a1"
    assert unheard["payload"]["agents"] == ["echo"] and "none has a speech provider" in unheard["payload"]["reason"]
    assert [envelope["payload"].get("final", False) for envelope in heard] == [False, True]
    assert [envelope["type"] for envelope in later] == ["PONG"]  # one INFO for the message, not one per chunk


async def test_audio_that_names_no_transaction_is_told_so_in_words(live: LiveServer) -> None:
    """A voice tester's find: the refusal read "no transaction None for this session"."""
    async with member(live) as (peer, _tx):
        data = base64.b64encode(b"RIFF").decode()
        await peer.send("AUDIO", {"mime": "audio/wav", "data": data}, transaction=None)
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "TRANSACTION_NOT_FOUND"
    assert error["payload"]["message"] == "AUDIO names no transaction"


async def test_a_last_chunk_with_no_data_ends_the_message_and_starts_no_turn(live: LiveServer) -> None:
    """A reviewer's find: a last chunk that only ends its message (``data?``) reached ``on_audio`` agents
    as a clip of 0 bytes, a turn counted against the run limit ("got 0 bytes of audio/wav"). Now it
    starts none, and the other members learn the message ended (``final``, no data)."""
    clip = base64.b64encode(tone_wav(1000, 0.25, amplitude=0.5)).decode()
    async with member(live, **EVERYTHING) as (speaker, tx), member(live, tx, **EVERYTHING) as (other, _):
        await speaker.send("AUDIO_CHUNK", {"message_id": "rec", "mime": "audio/wav", "data": clip}, transaction=tx)
        await speaker.send("AUDIO_CHUNK", {"message_id": "rec", "mime": "audio/wav", "final": True}, transaction=tx)
        await speaker.send("AUDIO_CHUNK", {"message_id": "next", "mime": "audio/wav", "data": clip}, transaction=tx)
        said = [(await speaker.receive_type("MESSAGE_PART"))["payload"]["text"] for _ in range(2)]
        chunks: list[dict[str, Any]] = []
        while len(chunks) < 3:  # what the speaker sent (AUDIO_IN), not the agent's tones (AUDIO_OUT)
            envelope, _ = await next_audio(other, "AUDIO_CHUNK")
            if envelope["channel"] == "AUDIO_IN":
                chunks.append(envelope["payload"])
    assert all(text.startswith("heard 0.25 s") for text in said)  # one turn per chunk with audio, no more
    assert [(c["message_id"], c.get("final", False), "data" in c) for c in chunks] == [
        ("rec", False, True),
        ("rec", True, False),
        ("next", False, True),
    ]


async def test_what_a_member_sends_fits_every_others_frame_limit_once_forwarded(live: LiveServer) -> None:
    """The prober's AG-UI find, over HAIP: a MESSAGE at the frame limit, or a binary audio chunk whose
    base64 is larger than the limit, was forwarded to the other members in frames past the limit their
    clients take (and closed them on it, at every join and resume, the event being in the log)."""
    async with member(live, **BINARY) as (speaker, tx), member(live, tx) as (listener, _):
        big = LIMIT - 600  # fits one frame (with its envelope), not with the one it is forwarded in
        await speaker.send("MESSAGE", {"text": "x" * big}, transaction=tx, channel="USER")
        too_long = await speaker.receive_type("ERROR")
        chunk = LIMIT - 2048  # fits as binary, not as base64 in a frame of LIMIT
        await speaker.send("AUDIO", {"mime": "audio/opus"}, transaction=tx, bin_len=chunk, bin_mime="audio/opus")
        await speaker.send_frame(bytes(chunk))
        too_big = await speaker.receive_type("ERROR")
        await speaker.send("MESSAGE", {"text": "still here"}, transaction=tx, channel="USER")
        heard = await listener.receive_type("MESSAGE")
    assert too_long["payload"]["code"] == "MESSAGE_TOO_LARGE" and too_long["payload"]["detail"]["limit"] == LIMIT - 1024
    assert too_big["payload"]["code"] == "MESSAGE_TOO_LARGE"
    assert heard["payload"] == "still here"  # (a transaction-era client's text form): nothing of either reached it


async def test_an_edit_an_end_and_a_tool_call_past_the_room_are_refused_too(live: LiveServer) -> None:
    """A prober's find: an edit's text, an end's reason and a tool call's arguments, each in a frame at the
    limit, were forwarded (and the edit stored) in frames past it: members whose clients hold the limit
    were closed 1009, and again at every join while the edit was in the history."""
    big = "x" * (LIMIT - 600)
    async with member(live) as (speaker, tx), member(live, tx) as (listener, _):
        await speaker.send("MESSAGE", {"text": "short", "message_id": "m1"}, transaction=tx, channel="USER")
        await listener.receive_type("MESSAGE")
        refused = []
        for kind, payload in [
            ("MESSAGE_UPDATE", {"message_id": "m1", "text": big}),
            ("TOOL_CALL", {"tool": "nothing.here", "params": {"text": big}}),
            ("TRANSACTION_END", {"reason": big}),
        ]:
            await speaker.send(kind, payload, transaction=tx, channel="USER")
            refused.append((await speaker.receive_type("ERROR"))["payload"])
        await speaker.send("MESSAGE", {"text": "still here"}, transaction=tx, channel="USER")
        heard: list[Any] = []
        while "still here" not in heard:  # (bounded: the receive times out)
            heard.append((await listener.receive_type("MESSAGE"))["payload"])
    assert [(r["code"], r["detail"]["limit"]) for r in refused] == [("MESSAGE_TOO_LARGE", LIMIT - 1024)] * 3
    assert not any("xxxx" in str(payload) for payload in heard)  # nothing of the three reached it; it goes on
