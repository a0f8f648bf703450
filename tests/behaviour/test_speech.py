"""Agents that listen and answer aloud (``agents.<name>.speech``), over a real uvicorn with the offline
engines (whisper tiny.en hears, espeak-ng speaks) and a stand-in for the LLM at the wire.

Speech made by espeak-ng ("what is two plus three") goes in as AUDIO_CHUNKs (WebSocket two-frame and
inline, SSE inline); the member's transcript comes back as a spoken MESSAGE, the assistant's answer as
text and as WAV audio sentence by sentence; new audio interrupts an answer being spoken; a client
that accepts no audio gets the text only; undecodable audio is an error that costs nothing else.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.peers import open_peer
from tests.support.raw import RawPeer
from tests.support.serving import LiveServer, live_server, make_config
from tests.support.speech import SpeechVendor, espeak, speech_vendor, wav_seconds, words
from tests.support.vendor import Reply, VendorServer, openai_text, vendor_server

pytestmark = pytest.mark.anyio

EVERYTHING = sorted(ALL_EVENTS)
NO_AUDIO = sorted(set(ALL_EVENTS) - {"AUDIO", "AUDIO_CHUNK"})
ANSWER = ("Two plus three", " is five. Anything", " else?")


@pytest.fixture(scope="module")
def question() -> bytes:
    return espeak("what is two plus three")


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


@pytest.fixture(scope="module")
def cloud() -> Iterator[SpeechVendor]:
    with speech_vendor() as server:
        yield server


@pytest.fixture(scope="module")
def live(vendor: VendorServer, cloud: SpeechVendor) -> Iterator[LiveServer]:
    gpt = {"kind": "openai", "base_url": vendor.url + "/v1", "model": "gpt-test", "max_retries": 0}
    config = {
        "llm": {"gpt": gpt},
        "speech": {"local": {"kind": "local"}, "cloud": {"kind": "openai", "base_url": cloud.url, "api_key": "sk-a"}},
        "agents": {
            "assistant": {"plugin": "assistant", "llm": "gpt", "speech": "local"},
            "echo": {"plugin": "echo", "speech": "local", "reply_audio": True},
            "parrot": {"plugin": "echo", "speech": "cloud"},
        },
    }
    with live_server(make_config(config)) as server:
        yield server


class Listener:
    """Reads a peer's envelopes (and the binary frames of two-frame audio) into one list, in order."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.seen: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        if isinstance(self.peer, RawPeer):
            frame = await self.peer.ws.recv()
            assert isinstance(frame, str), "a binary frame without its envelope"
            envelope: dict[str, Any] = json.loads(frame)
            if "bin_len" in envelope:
                data = await self.peer.ws.recv()
                assert isinstance(data, bytes) and len(data) == envelope["bin_len"]
                envelope["binary"] = data
        else:
            envelope = await self.peer.receive(20)
        self.seen.append(envelope)
        return envelope

    async def until(self, done: Any, timeout: float = 30) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                envelope = await self.next()
                if done(envelope):
                    return envelope

    def of(self, type: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == type]


def audio_bytes(envelope: dict[str, Any]) -> bytes:
    return envelope.get("binary") or base64.b64decode(envelope["payload"]["data"])


def is_final_audio(message_id: str | None = None) -> Any:
    def check(e: dict[str, Any]) -> bool:
        payload = e["payload"] if isinstance(e.get("payload"), dict) else {}
        return (
            e["type"] == "AUDIO_CHUNK"
            and e.get("channel") == "AUDIO_OUT"
            and bool(payload.get("final"))
            and (message_id is None or payload.get("message_id") == message_id)
        )

    return check


def is_info(event: str) -> Any:
    return lambda e: e["type"] == "INFO" and isinstance(e["payload"], dict) and e["payload"].get("event") == event


async def start(peer: Any, live: LiveServer, agent: str, accept: list[str], **hai: Any) -> tuple[Listener, str]:
    listener = Listener(peer)
    await listener.until(lambda e: e["type"] == "HAI")
    await peer.hai(live.token("alice"), accept_events=accept, **hai)
    await listener.until(lambda e: e["type"] == "INFO")
    await peer.send("TRANSACTION_START", {"toolName": agent}, transaction="ref")
    started = await listener.until(lambda e: e["type"] == "TRANSACTION_START")
    return listener, str(started["transaction"])


async def joined(peer: Any, live: LiveServer, tx: str, accept: list[str] = EVERYTHING) -> Listener:
    """``peer`` as alice, in ``tx`` (another of her connections, on this node or another), read by a listener."""
    listener = Listener(peer)
    await listener.until(lambda e: e["type"] == "HAI")
    await peer.hai(live.token("alice"), accept_events=accept)
    await listener.until(lambda e: e["type"] == "INFO")
    await peer.send("TRANSACTION_JOIN", {"since": "0"}, transaction=tx)
    await listener.until(lambda e: e["type"] == "TRANSACTION_JOIN")
    return listener


async def speak(peer: Any, tx: str, clip: bytes, message_id: str, *, binary: bool, pieces: int = 3) -> None:
    """``clip`` as ``pieces`` AUDIO_CHUNKs of one message, the last one final."""
    size = -(-len(clip) // pieces)
    for seq in range(pieces):
        part = clip[seq * size : (seq + 1) * size]
        payload: dict[str, Any] = {"message_id": message_id, "mime": "audio/wav", "seq_in_message": seq}
        if seq == pieces - 1:
            payload["final"] = True
        if binary:
            await peer.send("AUDIO_CHUNK", payload, transaction=tx, bin_len=len(part), bin_mime="audio/wav")
            await peer.send_frame(part)
        else:
            await peer.send("AUDIO_CHUNK", {**payload, "data": base64.b64encode(part).decode()}, transaction=tx)


def check_spoken_answer(listener: Listener, audio_message_id: str, vendor: VendorServer) -> None:
    """The transcript, the answer's text and its audio, as the member who spoke saw them."""
    (transcript,) = [e for e in listener.of("MESSAGE") if isinstance(e["payload"], dict) and e["payload"].get("spoken")]
    said = transcript["payload"]
    assert said["author"] == "alice" and said["audio_message_id"] == audio_message_id
    assert words(said["text"]) == ["what", "is", "two", "plus", "three"]
    assert vendor.requests[-1].body["messages"][-1] == {"role": "user", "content": said["text"]}
    end = listener.of("MESSAGE_END")[0]  # the first answer (a typed message may follow; it is not spoken)
    answer_id = end["payload"]["message_id"]
    text = "".join(e["payload"]["text"] for e in listener.of("MESSAGE_PART") if e["payload"]["message_id"] == answer_id)
    assert text == "".join(ANSWER)
    chunks = [e for e in listener.of("AUDIO_CHUNK") if e["channel"] == "AUDIO_OUT"]
    assert [c["payload"]["message_id"] for c in chunks] == [answer_id, answer_id]
    assert [c["payload"]["seq_in_message"] for c in chunks] == [0, 1]
    assert [c["payload"]["final"] for c in chunks] == [False, True]
    assert [c["payload"]["text"] for c in chunks] == ["Two plus three is five.", "Anything else?"]
    seconds = [wav_seconds(audio_bytes(c)) for c in chunks]
    assert 1.0 < seconds[0] < 4.0 and 0.5 < seconds[1] < 3.0, seconds
    assert [c["payload"]["duration_ms"] for c in chunks] == [round(s * 1000) for s in seconds]
    assert all(c["payload"]["author"] == "assistant" and c["payload"]["mime"] == "audio/wav" for c in chunks)


@pytest.mark.parametrize(("kind", "binary"), [("websocket", True), ("websocket", False), ("sse", False)])
async def test_spoken_question_is_transcribed_answered_in_text_and_spoken_back(
    live: LiveServer, vendor: VendorServer, question: bytes, kind: str, binary: bool
) -> None:
    vendor.script(Reply(openai_text(*ANSWER)))
    hai: dict[str, Any] = {"capabilities": {"binary_frames": True}} if binary else {}
    token = live.token("alice")
    async with open_peer(kind, live, token) as peer:
        listener, tx = await start(peer, live, "assistant", EVERYTHING, **hai)
        await speak(peer, tx, question, f"q-{kind}-{binary}", binary=binary)
        await listener.until(is_final_audio())
    check_spoken_answer(listener, f"q-{kind}-{binary}", vendor)
    assert all(("binary" in c) == binary for c in listener.of("AUDIO_CHUNK") if c["channel"] == "AUDIO_OUT")


async def test_a_member_without_audio_gets_the_transcript_and_the_text_only(
    live: LiveServer, vendor: VendorServer, question: bytes
) -> None:
    vendor.script(Reply(openai_text(*ANSWER)), Reply(openai_text("Pong.")))
    token = live.token("alice")
    async with open_peer("websocket", live, token) as speaker, open_peer("websocket", live, token) as quiet:
        talking, tx = await start(speaker, live, "assistant", EVERYTHING)
        reading = Listener(quiet)
        await reading.until(lambda e: e["type"] == "HAI")
        await quiet.hai(token, accept_events=NO_AUDIO)
        await reading.until(lambda e: e["type"] == "INFO")
        await quiet.send("TRANSACTION_JOIN", {}, transaction=tx)
        await reading.until(lambda e: e["type"] == "TRANSACTION_JOIN")
        await speak(speaker, tx, question, "q-quiet", binary=False)
        await talking.until(is_final_audio())
        await speaker.send("MESSAGE", {"text": "ping"}, transaction=tx)  # after all the audio, in the log's order
        await reading.until(lambda e: e["type"] == "MESSAGE" and e["payload"].get("text") == "ping")
        await talking.until(lambda e: e["type"] == "RUN_FINISHED")
        vendor.requests.pop()
    check_spoken_answer(talking, "q-quiet", vendor)
    transcripts = [e for e in reading.of("MESSAGE") if e["payload"].get("spoken")]
    assert [words(t["payload"]["text"]) for t in transcripts] == [["what", "is", "two", "plus", "three"]]
    assert "".join(e["payload"]["text"] for e in reading.of("MESSAGE_PART")).startswith("".join(ANSWER))
    assert not reading.of("AUDIO_CHUNK") and not reading.of("AUDIO")


async def test_speaking_while_the_agent_speaks_interrupts_its_audio(
    live: LiveServer, vendor: VendorServer, question: bytes
) -> None:
    stream = openai_text("Two plus three is five. ", "I could go on. ", "And on.")
    first = Reply(stream[:2], stall=True, then=stream[2:])
    vendor.script(first, Reply(openai_text("Yes?")))
    token = live.token("alice")
    try:
        async with open_peer("websocket", live, token) as peer:
            listener, tx = await start(peer, live, "assistant", EVERYTHING)
            await speak(peer, tx, question, "q-1", binary=False, pieces=1)
            spoken = await listener.until(lambda e: e["type"] == "AUDIO_CHUNK")
            answer_id = spoken["payload"]["message_id"]
            assert spoken["payload"]["text"] == "Two plus three is five." and not spoken["payload"]["final"]
            await speak(peer, tx, question, "q-2", binary=False, pieces=2)
            info = await listener.until(
                lambda e: e["type"] == "INFO" and e["payload"].get("event") == "speech.interrupted"
            )
            vendor.release()  # the first answer's text goes on; its audio does not
            await listener.until(lambda e: e["type"] == "MESSAGE_END" and e["payload"]["message_id"] == answer_id)
            second = await listener.until(is_final_audio())
    finally:
        vendor.release()
    assert info["payload"]["message_id"] == answer_id and info["payload"]["by"] == "alice"
    assert second["payload"]["message_id"] != answer_id and second["payload"]["text"] == "Yes?"
    first_text = "".join(
        e["payload"]["text"] for e in listener.of("MESSAGE_PART") if e["payload"]["message_id"] == answer_id
    )
    assert first_text == "Two plus three is five. I could go on. And on."
    first_audio = [e for e in listener.of("AUDIO_CHUNK") if e["payload"]["message_id"] == answer_id]
    assert len(first_audio) == 1


async def test_reply_audio_speaks_answers_to_typed_messages_too(live: LiveServer) -> None:
    token = live.token("alice")
    async with open_peer("websocket", live, token) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("MESSAGE", {"text": "hello there"}, transaction=tx)
        spoken = await listener.until(is_final_audio())
    assert spoken["payload"]["author"] == "echo" and wav_seconds(audio_bytes(spoken)) > 0.3
    assert words(spoken["payload"]["text"])[-2:] == ["hello", "there"]


async def test_a_spoken_sentence_comes_in_whole_wavs_that_each_fit_the_frame_size_the_hai_gives() -> None:
    """A voice tester's find: a long sentence's audio went as one frame of 129 KB where the HAI said
    65,536 bytes, which a client sizing its buffer by it refuses (at the default 1 MiB, a slow voice
    passes it too). Now it comes as whole WAVs in turn, each in a frame that fits, its text on the first."""
    config = {
        "server": {"max_frame_bytes": 65536},
        "speech": {"local": {"kind": "local"}},
        "agents": {"echo": {"plugin": "echo", "speech": "local", "reply_audio": True}},
    }
    sentence = "This sentence goes on " + "and on " * 28 + "until it is long"
    with live_server(make_config(config)) as small:
        async with open_peer("websocket", small, small.token("alice")) as peer:
            listener, tx = await start(peer, small, "echo", EVERYTHING)
            await peer.send("MESSAGE", {"text": sentence}, transaction=tx)
            await listener.until(is_final_audio())
    chunks = [e for e in listener.of("AUDIO_CHUNK") if e.get("channel") == "AUDIO_OUT"]
    sizes = [len(json.dumps(e, separators=(",", ":"))) for e in chunks]
    assert len(chunks) > 2 and max(sizes) <= 65536
    assert [e["payload"]["seq_in_message"] for e in chunks] == list(range(len(chunks)))
    assert [e["payload"]["final"] for e in chunks] == [False] * (len(chunks) - 1) + [True]
    texts = [e["payload"]["text"] for e in chunks]  # each sentence's on its first piece, the others ""
    assert words(" ".join(texts))[-3:] == ["it", "is", "long"] and texts.count("") >= len(chunks) - 2
    assert sum(wav_seconds(audio_bytes(e)) for e in chunks) > 5  # the whole sentence, spoken


async def test_audio_that_is_no_speech_gets_an_error_and_the_session_goes_on(live: LiveServer) -> None:
    token = live.token("alice")
    async with open_peer("websocket", live, token) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        noise = base64.b64encode(b"RIFF this is not audio at all" * 10).decode()
        await peer.send("AUDIO", {"message_id": "junk", "mime": "audio/wav", "data": noise}, transaction=tx)
        error = await listener.until(lambda e: e["type"] == "ERROR")
        await peer.send("MESSAGE", {"text": "still here"}, transaction=tx)
        echoed = await listener.until(lambda e: e["type"] == "MESSAGE_PART")
    assert error["payload"]["code"] == "SPEECH_NOT_UNDERSTOOD" and error["payload"]["related_id"] == "junk"
    assert "still here" in echoed["payload"]["text"]


async def test_cancelling_a_half_sent_audio_message_drops_it_and_the_rest_of_it(
    live: LiveServer, question: bytes
) -> None:
    """A voice tester's find: the chunks still on their way after the cancel began a new message, whose
    tail was refused (SPEECH_NOT_UNDERSTOOD, naming the cancelled message) or would have been heard."""
    token = live.token("alice")
    third = len(question) // 3
    async with open_peer("websocket", live, token) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        for seq in range(2):  # two chunks of three: no final one
            data = base64.b64encode(question[seq * third : (seq + 1) * third]).decode()
            payload = {"message_id": "half", "mime": "audio/wav", "seq_in_message": seq, "data": data}
            await peer.send("AUDIO_CHUNK", payload, transaction=tx)
        await peer.send("RUN_CANCEL", {"run_id": "half"}, transaction=tx)
        again = await peer.send("RUN_CANCEL", {"run_id": "half"}, transaction=tx)
        error = await listener.until(lambda e: e["type"] == "ERROR")
        rest = base64.b64encode(question[2 * third :]).decode()
        last = {"message_id": "half", "mime": "audio/wav", "seq_in_message": 2, "final": True, "data": rest}
        await peer.send("AUDIO_CHUNK", last, transaction=tx)  # on its way as the cancel went: let go
        await speak(peer, tx, question, "after", binary=False)
        heard = await listener.until(
            lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
        )
    assert error["payload"]["code"] == "INVALID_PAYLOAD" and error["payload"]["related_id"] == again
    assert [e["payload"]["code"] for e in listener.of("ERROR")] == ["INVALID_PAYLOAD"]  # nothing of the tail
    assert heard["payload"]["audio_message_id"] == "after"
    spoken = [e for e in listener.of("MESSAGE") if isinstance(e["payload"], dict) and e["payload"].get("spoken")]
    assert [e["payload"]["audio_message_id"] for e in spoken] == ["after"]


async def test_a_last_chunk_may_only_end_its_message_with_no_data(live: LiveServer, question: bytes) -> None:
    """``data?``, as documented: a final AUDIO_CHUNK with none ends the message (a voice tester's find: it
    was refused, INVALID_PAYLOAD, and the message stayed open)."""
    half = len(question) // 2
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        for seq in range(2):
            data = base64.b64encode(question[seq * half : (seq + 1) * half]).decode()
            payload = {"message_id": "ended", "mime": "audio/wav", "seq_in_message": seq, "data": data}
            await peer.send("AUDIO_CHUNK", payload, transaction=tx)
        await peer.send("AUDIO_CHUNK", {"message_id": "ended", "mime": "audio/wav", "final": True}, transaction=tx)
        heard = await listener.until(
            lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
        )
    assert heard["payload"]["audio_message_id"] == "ended" and not listener.of("ERROR")
    assert words(heard["payload"]["text"]) == ["what", "is", "two", "plus", "three"]


async def test_the_rest_of_an_audio_message_dropped_as_too_long_is_not_heard(question: bytes) -> None:
    """A tester's find: past the limit (16 frames) the message was dropped, but its next chunk began a new
    one, and the tail was transcribed as the member's words (or, a WAV without its header, "no words")."""
    config = {
        "server": {"max_frame_bytes": 65536},  # a message of at most 1 MiB
        "speech": {"local": {"kind": "local"}},
        "agents": {"echo": {"plugin": "echo", "speech": "local"}},
    }
    with live_server(make_config(config)) as small:
        async with open_peer("websocket", small, small.token("alice")) as peer:
            listener, tx = await start(peer, small, "echo", EVERYTHING)
            piece = base64.b64encode(bytes(40_000)).decode()
            for seq in range(30):  # 1.2 MB: dropped at the 27th chunk; the 3 after it must not start a new one
                payload = {"message_id": "long", "mime": "audio/wav", "seq_in_message": seq, "data": piece}
                await peer.send("AUDIO_CHUNK", {**payload, **({"final": True} if seq == 29 else {})}, transaction=tx)
            await speak(peer, tx, question, "short", binary=False)
            heard = await listener.until(
                lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
            )
    errors = [e["payload"]["code"] for e in listener.of("ERROR")]
    assert errors == ["MESSAGE_TOO_LARGE"]  # once; no SPEECH_NOT_UNDERSTOOD of a tail
    assert heard["payload"]["audio_message_id"] == "short"
    assert words(heard["payload"]["text"]) == ["what", "is", "two", "plus", "three"]


async def test_a_recording_that_must_wait_for_the_engine_is_told_so(live: LiveServer, question: bytes) -> None:
    """A tester's find: the local engine hears one recording at a time, and one sent behind long ones got
    nothing back for minutes, with no sign it was waiting."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await speak(peer, tx, question, "first", binary=False)
        await speak(peer, tx, question, "second", binary=False)  # sent while the first is being heard
        waiting = await listener.until(is_info("speech.waiting"))
        heard = await listener.until(
            lambda e: (
                e["type"] == "MESSAGE"
                and isinstance(e["payload"], dict)
                and e["payload"].get("audio_message_id") == "second"
            )
        )
    assert waiting["payload"] == {"event": "speech.waiting", "message_id": "second", "ahead": 1}
    assert words(heard["payload"]["text"]) == ["what", "is", "two", "plus", "three"]


async def test_a_hosted_speech_service_hears_and_speaks_and_its_failure_is_told(
    live: LiveServer, cloud: SpeechVendor, question: bytes
) -> None:
    cloud.requests.clear()
    cloud.transcripts[:] = ["Hello parrot.", "Again."]
    token = live.token("alice")
    try:
        async with open_peer("websocket", live, token) as peer:
            listener, tx = await start(peer, live, "parrot", EVERYTHING)
            await speak(peer, tx, question, "cloud-1", binary=False, pieces=2)
            spoken = await listener.until(is_final_audio())
            cloud.speech_status = 503
            await speak(peer, tx, question, "cloud-2", binary=False, pieces=1)
            failed = await listener.until(is_info("speech.failed"))
    finally:
        cloud.speech_status = 200
    heard, said, _, _ = cloud.requests
    assert heard["path"] == "/v1/audio/transcriptions" and heard["bytes"] == question
    assert heard["authorization"] == "Bearer sk-a" and heard["content_type"] == "audio/wav"
    assert said["path"] == "/v1/audio/speech" and said["input"] == "you said: Hello parrot."
    assert spoken["payload"]["text"] == "you said: Hello parrot." and spoken["payload"]["final"]
    assert spoken["payload"]["duration_ms"] == round(0.06 * len("you said: Hello parrot.") * 1000)
    assert failed["payload"]["code"] == "SPEECH_FAILED" and "503" in failed["payload"]["message"]
    assert "sk-a" not in failed["payload"]["message"]
    texts = [e["payload"]["text"] for e in listener.of("MESSAGE") if e["payload"].get("spoken")]
    assert texts == ["Hello parrot.", "Again."]


async def test_when_no_member_accepts_audio_the_answer_is_not_synthesized(
    live: LiveServer, cloud: SpeechVendor, question: bytes
) -> None:
    cloud.requests.clear()
    cloud.transcripts[:] = ["Quietly now."]
    token = live.token("alice")
    async with open_peer("websocket", live, token) as peer:
        listener, tx = await start(peer, live, "parrot", NO_AUDIO)
        await speak(peer, tx, question, "quiet-1", binary=False, pieces=1)
        await listener.until(lambda e: e["type"] == "RUN_FINISHED")
        await peer.send("MESSAGE", {"text": "fence"}, transaction=tx)
        await listener.until(lambda e: e["type"] == "RUN_FINISHED")
    assert [r["path"] for r in cloud.requests] == ["/v1/audio/transcriptions"]
    assert "you said: Quietly now." in [e["payload"]["text"] for e in listener.of("MESSAGE_PART")]


async def test_a_whole_audio_under_the_id_of_a_cancelled_recording_is_heard(question: bytes) -> None:
    """A reviewer's find: a cancelled half-sent recording's id stayed marked for its rest, so a later
    AUDIO (a whole message) under the same id was let go without a word."""
    config = {"speech": {"local": {"kind": "local"}}, "agents": {"echo": {"plugin": "echo", "speech": "local"}}}
    with live_server(make_config(config)) as small:
        async with open_peer("websocket", small, small.token("alice")) as peer:
            listener, tx = await start(peer, small, "echo", EVERYTHING)
            half = base64.b64encode(question[: len(question) // 2]).decode()
            await peer.send("AUDIO_CHUNK", {"message_id": "mic", "mime": "audio/wav", "data": half}, transaction=tx)
            await peer.send("RUN_CANCEL", {"run_id": "mic"}, transaction=tx)
            whole = base64.b64encode(question).decode()
            await peer.send("AUDIO", {"message_id": "mic", "mime": "audio/wav", "data": whole}, transaction=tx)
            heard = await listener.until(
                lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
            )
    assert heard["payload"]["audio_message_id"] == "mic"
    assert words(heard["payload"]["text"]) == ["what", "is", "two", "plus", "three"]


def chunk(message_id: str, clip: bytes, seq: int, *, final: bool = False) -> dict[str, Any]:
    data = base64.b64encode(clip).decode()
    payload = {"message_id": message_id, "mime": "audio/wav", "seq_in_message": seq, "data": data}
    return {**payload, "final": True} if final else payload


def spoken_ids(listener: Listener) -> list[str]:
    return spoken_ids_of(listener.of("MESSAGE"))


async def test_a_fifth_open_audio_message_is_refused_whole(live: LiveServer, question: bytes) -> None:
    """A voice tester's find: the refused message's later chunks began it anew, and its tail was heard as the
    member's words (or, a WAV's, "no words" about audio the member had been told was refused)."""
    third = len(question) // 3
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        for open_ in "abcd":
            await peer.send("AUDIO_CHUNK", chunk(open_, question[:third], 0), transaction=tx)
        await peer.send("AUDIO_CHUNK", chunk("e", question[:third], 0), transaction=tx)
        refused = await listener.until(lambda e: e["type"] == "ERROR")
        for open_ in "abcd":
            await peer.send("RUN_CANCEL", {"run_id": open_}, transaction=tx)
        await peer.send("AUDIO_CHUNK", chunk("e", question[third : 2 * third], 1), transaction=tx)
        await peer.send("AUDIO_CHUNK", chunk("e", question[2 * third :], 2, final=True), transaction=tx)
        await speak(peer, tx, question, "after", binary=False)
        await listener.until(
            lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
        )
    assert refused["payload"]["code"] == "RATE_LIMITED" and refused["payload"]["detail"] == {
        "limit": "open_audio_messages"
    }
    assert [e["payload"]["code"] for e in listener.of("ERROR")] == ["RATE_LIMITED"]  # nothing of the tail
    assert spoken_ids(listener) == ["after"]


async def test_audio_left_half_sent_in_an_ended_conversation_blocks_no_other(live: LiveServer, question: bytes) -> None:
    """A voice tester's find: it stayed counted against the session's open messages, with no way left to end
    it (its conversation was gone), and chunked audio was refused in every other conversation."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, first = await start(peer, live, "echo", EVERYTHING)
        for open_ in "abcd":
            await peer.send("AUDIO_CHUNK", chunk(open_, question[:1000], 0), transaction=first)
        await peer.send("TRANSACTION_END", {}, transaction=first)
        await listener.until(lambda e: e["type"] == "TRANSACTION_END")
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="again")
        second = str((await listener.until(lambda e: e["type"] == "TRANSACTION_START"))["transaction"])
        await speak(peer, second, question, "next", binary=False)
        await listener.until(
            lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
        )
    assert not listener.of("ERROR") and spoken_ids(listener) == ["next"]


async def test_an_audio_with_no_bytes_is_refused_saying_so(live: LiveServer) -> None:
    """A voice tester's find: it was dropped without a word."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        sent = await peer.send("AUDIO", {"message_id": "empty", "mime": "audio/wav", "data": ""}, transaction=tx)
        error = await listener.until(lambda e: e["type"] == "ERROR")
    assert error["payload"]["code"] == "INVALID_PAYLOAD" and error["payload"]["related_id"] == sent
    assert error["payload"]["detail"] == {"where": "/payload/data"}


async def test_cancelling_an_audio_message_heard_already_cancels_the_turn_answering_it(
    live: LiveServer, vendor: VendorServer, question: bytes
) -> None:
    """A voice tester's find: once the transcript existed, ``RUN_CANCEL`` naming the audio was refused
    (INVALID_PAYLOAD), though a voice client knows only that id until the transcript reaches it."""
    stream = openai_text("Two plus three", " is five.")
    vendor.script(Reply(stream[:2], stall=True, then=stream[2:]))  # (the role, the first part; then it waits)
    try:
        async with open_peer("websocket", live, live.token("alice")) as peer:
            listener, tx = await start(peer, live, "assistant", EVERYTHING)
            await speak(peer, tx, question, "asked", binary=False, pieces=1)
            await listener.until(lambda e: e["type"] == "MESSAGE_PART")  # heard, and being answered
            await peer.send("RUN_CANCEL", {"run_id": "asked"}, transaction=tx)
            ended = await listener.until(lambda e: e["type"] in ("RUN_FINISHED", "ERROR"))
    finally:
        vendor.release()
    assert ended["type"] == "RUN_FINISHED" and ended["payload"]["status"] == "CANCELLED", ended["payload"]


async def test_an_audio_message_id_heard_already_is_refused_not_heard_again(live: LiveServer, question: bytes) -> None:
    """A voice tester's find: the same AUDIO sent twice (two envelopes) was heard, and answered, twice."""
    clip = {"message_id": "once", "mime": "audio/wav", "data": base64.b64encode(question).decode()}
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("AUDIO", clip, transaction=tx)
        await listener.until(
            lambda e: e["type"] == "MESSAGE" and isinstance(e["payload"], dict) and e["payload"].get("spoken")
        )
        again = await peer.send("AUDIO", clip, transaction=tx)
        refused = await listener.until(lambda e: e["type"] == "ERROR")
        await peer.send("MESSAGE", {"text": "and then"}, transaction=tx)
        await listener.until(lambda e: e["type"] == "MESSAGE_PART" and "and then" in e["payload"]["text"])
    assert refused["payload"]["code"] == "INVALID_PAYLOAD" and refused["payload"]["related_id"] == again
    assert refused["payload"]["detail"] == {"where": "/payload/message_id"}
    assert spoken_ids(listener) == ["once"]


async def test_a_typed_message_under_an_audio_messages_id_is_refused(live: LiveServer, question: bytes) -> None:
    """A voice tester's find: it was taken, and a cancel naming the id was then ambiguous."""
    clip = {"message_id": "spoken-first", "mime": "audio/wav", "data": base64.b64encode(question).decode()}
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("AUDIO", clip, transaction=tx)
        await listener.until(lambda e: e["type"] == "MESSAGE" and spoken_ids_of([e]) == ["spoken-first"])
        typed = await peer.send("MESSAGE", {"text": "hi", "message_id": "spoken-first"}, transaction=tx)
        refused = await listener.until(lambda e: e["type"] == "ERROR")
    assert refused["payload"]["code"] == "INVALID_PAYLOAD" and refused["payload"]["related_id"] == typed
    assert refused["payload"]["detail"] == {"where": "/payload/message_id"}


async def test_a_long_answer_is_spoken_at_most_a_little_ahead_of_its_listener(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A voice tester's find: the engine speaks far faster than real time, and a long answer sent whole at
    once filled the session's replay window with audio in seconds (a 3 s drop could not be resumed). Each
    sentence now waits while what was sent is more than ``SPEAK_AHEAD_SECONDS`` ahead of a listener."""
    from haip_runtime.hub import voice

    monkeypatch.setattr(voice, "SPEAK_AHEAD_SECONDS", 1.0)
    text = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 4))
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("MESSAGE", {"text": text}, transaction=tx)
        arrived: list[tuple[float, int]] = []
        while not arrived or not listener.seen[-1]["payload"].get("final"):
            chunk = await listener.until(lambda e: e["type"] == "AUDIO_CHUNK")
            arrived.append((anyio.current_time(), int(chunk["payload"]["duration_ms"])))
    spoken = sum(ms for _, ms in arrived) / 1000
    took = arrived[-1][0] - arrived[0][0]
    # The last waited until all before it, less the lead, had played (less a little for the network).
    assert spoken > 4 and took >= spoken - arrived[-1][1] / 1000 - 1.0 - 0.3, (spoken, took)


async def test_an_audio_message_refused_for_room_may_be_sent_again_under_its_id(question: bytes) -> None:
    """A reviewer's find: its id was taken as heard before the message was refused RUN_LIMIT_EXCEEDED,
    so sending it again once there was room was refused as a duplicate (a typed message is taken)."""
    config = make_config(
        {
            "speech": {"local": {"kind": "local"}},
            "agents": {
                "teller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": 2},
                    "speech": "local",
                }
            },
            "session": {"max_concurrent_runs": 1, "max_queued_messages": 0},
        }
    )
    clip = {"message_id": "q1", "mime": "audio/wav", "data": base64.b64encode(question).decode()}
    with live_server(config) as server:
        async with open_peer("websocket", server, server.token("alice")) as peer:
            listener, tx = await start(peer, server, "teller", EVERYTHING)
            await peer.send("MESSAGE", {"text": "tell me a story"}, transaction=tx)
            story = await listener.until(lambda e: e["type"] == "RUN_STARTED")
            await peer.send("AUDIO", clip, transaction=tx)
            refused = await listener.until(lambda e: e["type"] == "ERROR")
            await peer.send("RUN_CANCEL", {"run_id": story["payload"]["run_id"]}, transaction=tx)
            await listener.until(lambda e: e["type"] == "RUN_FINISHED")
            await peer.send("AUDIO", clip, transaction=tx)
            heard = await listener.until(
                lambda e: e["type"] == "ERROR" or (e["type"] == "MESSAGE" and spoken_ids_of([e]) == ["q1"])
            )
    assert refused["payload"]["code"] == "RUN_LIMIT_EXCEEDED"
    assert heard["type"] == "MESSAGE", heard["payload"]


def spoken_ids_of(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["payload"]["audio_message_id"]
        for e in events
        if isinstance(e["payload"], dict) and e["payload"].get("spoken")
    ]


async def test_on_another_node_a_heard_audio_message_is_cancelled_by_its_id_and_not_heard_again(
    question: bytes, redis_url: str, postgres_url: str, prefix: str
) -> None:
    """A reviewer's find: the transcript of an audio message was known only to the node that heard it, so a
    cancel naming the audio, or the same audio again, through another node found nothing (PROTOCOL.md section
    15: a client may resume on any node)."""
    cluster = {"redis_url": redis_url, "key_prefix": prefix, "heartbeat_seconds": 0.2, "node_ttl_seconds": 2}
    teller = {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 2}}
    config = make_config(
        {
            "cluster": {**cluster, "connect_timeout_seconds": 5, "lease_seconds": 1.5},
            "storage": {"backend": "postgres", "url": postgres_url, "flush_interval_seconds": 0.01},
            "speech": {"local": {"kind": "local"}},
            "agents": {"teller": {**teller, "speech": "local"}},
        }
    )
    clip = {"message_id": "a1", "mime": "audio/wav", "data": base64.b64encode(question).decode()}
    with live_server(config) as a, live_server(config) as b:
        async with (
            open_peer("websocket", a, a.token("alice")) as here,
            open_peer("websocket", b, b.token("alice")) as there,
        ):
            _, tx = await start(here, a, "teller", EVERYTHING)
            other = await joined(there, b, tx)
            await here.send("AUDIO", clip, transaction=tx)
            await other.until(lambda e: e["type"] == "MESSAGE_PART")  # heard on a, answered, seen on b
            await there.send("RUN_CANCEL", {"run_id": "a1"}, transaction=tx)
            ended = await other.until(lambda e: e["type"] in ("RUN_FINISHED", "ERROR"))
            again = await there.send("AUDIO", clip, transaction=tx)
            refused = await other.until(lambda e: e["type"] == "ERROR")
    assert ended["type"] == "RUN_FINISHED" and ended["payload"]["status"] == "CANCELLED", ended["payload"]
    assert refused["payload"]["code"] == "INVALID_PAYLOAD" and refused["payload"]["related_id"] == again
    assert spoken_ids(other) == ["a1"]  # heard once


@pytest.mark.parametrize("named", ["run", "message"])
async def test_an_answer_written_already_and_still_being_spoken_is_stopped_by_a_cancel(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """A voice tester's find: once its text was complete (``RUN_FINISHED OK``), a paced answer went on being
    spoken for a minute, and ``RUN_CANCEL`` naming its run was refused: nothing could stop it."""
    from haip_runtime.hub import voice

    monkeypatch.setattr(voice, "SPEAK_AHEAD_SECONDS", 1.0)
    text = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 9))
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("MESSAGE", {"text": text, "message_id": "long"}, transaction=tx)
        finished = await listener.until(lambda e: e["type"] == "RUN_FINISHED")
        ref = finished["payload"]["run_id"] if named == "run" else "long"
        await peer.send("RUN_CANCEL", {"run_id": ref}, transaction=tx)
        stopped = await listener.until(
            lambda e: (
                e["type"] == "ERROR" or (e["type"] == "INFO" and e["payload"].get("event") == "speech.interrupted")
            )
        )
    assert finished["payload"]["status"] == "OK"
    assert stopped["type"] == "INFO" and stopped["payload"]["run_id"] == finished["payload"]["run_id"]
    assert not any(e["payload"].get("final") for e in listener.of("AUDIO_CHUNK"))  # (not spoken to its end)


async def test_a_refused_audio_message_reaches_no_one_and_may_be_sent_again_from_its_first_chunk(
    live: LiveServer, question: bytes
) -> None:
    """A voice tester's finds: the tail of a fifth message refused RATE_LIMITED still reached the other members
    (and on_audio agents); and sending it again under its id, once there was room, was swallowed whole as its
    rest. A chunk numbered 0 starts it anew."""
    third = len(question) // 3
    async with (
        open_peer("websocket", live, live.token("alice")) as peer,
        open_peer("websocket", live, live.token("alice")) as watcher,
    ):
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        other = await joined(watcher, live, tx)
        for open_ in "abcd":
            await peer.send("AUDIO_CHUNK", chunk(open_, question[:third], 0), transaction=tx)
        await peer.send("AUDIO_CHUNK", chunk("e", question[:third], 0), transaction=tx)
        refused = await listener.until(lambda e: e["type"] == "ERROR")
        await peer.send("AUDIO_CHUNK", chunk("e", question[third : 2 * third], 1), transaction=tx)  # its rest
        for open_ in "abcd":
            await peer.send("RUN_CANCEL", {"run_id": open_}, transaction=tx)
        for seq in range(3):  # sent again, whole, from its first chunk
            part = question[seq * third : (seq + 1) * third] if seq < 2 else question[2 * third :]
            await peer.send("AUDIO_CHUNK", chunk("e", part, seq, final=seq == 2), transaction=tx)
        heard = await other.until(lambda e: e["type"] == "MESSAGE" and spoken_ids_of([e]) == ["e"])
    assert refused["payload"]["code"] == "RATE_LIMITED"
    passed_on = [
        e["payload"].get("seq_in_message") for e in other.of("AUDIO_CHUNK") if e["payload"]["message_id"] == "e"
    ]
    assert passed_on == [0, 1, 2]  # the retry's three: nothing of the refused one
    assert words(heard["payload"]["text"]) == ["what", "is", "two", "plus", "three"]


async def test_an_audio_message_of_no_audio_is_refused_saying_so(live: LiveServer) -> None:
    """A voice tester's and a reviewer's finds: a final chunk with nothing before it, or only empty chunks,
    was dropped without a word (and an empty chunk started on_audio turns of nothing)."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        lone = await peer.send(
            "AUDIO_CHUNK", {"message_id": "e3", "mime": "audio/wav", "data": "", "final": True}, transaction=tx
        )
        first = await listener.until(lambda e: e["type"] == "ERROR")
        await peer.send("AUDIO_CHUNK", {"message_id": "e4", "mime": "audio/wav", "data": ""}, transaction=tx)
        last = await peer.send("AUDIO_CHUNK", {"message_id": "e4", "mime": "audio/wav", "final": True}, transaction=tx)
        second = await listener.until(lambda e: e["type"] == "ERROR")
    for error, sent in ((first, lone), (second, last)):
        assert error["payload"]["code"] == "INVALID_PAYLOAD" and error["payload"]["related_id"] == sent
        assert error["payload"]["detail"] == {"where": "/payload/data"}


async def test_an_answer_sent_whole_and_still_playing_is_stopped_by_a_cancel(live: LiveServer) -> None:
    """A reviewer's find: once all its audio was sent (the last 10 s of every answer, a short one whole),
    a cancel naming its run was refused, and no listener was told to stop."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("MESSAGE", {"text": "a short answer, spoken whole"}, transaction=tx)
        finished = await listener.until(lambda e: e["type"] == "RUN_FINISHED")
        await listener.until(is_final_audio())  # all sent: the listener plays it for a second or two yet
        await peer.send("RUN_CANCEL", {"run_id": finished["payload"]["run_id"]}, transaction=tx)
        stopped = await listener.until(
            lambda e: (
                e["type"] == "ERROR" or (e["type"] == "INFO" and e["payload"].get("event") == "speech.interrupted")
            )
        )
    assert stopped["type"] == "INFO" and stopped["payload"]["run_id"] == finished["payload"]["run_id"]


async def test_a_typed_message_under_the_id_of_an_audio_message_still_being_sent_is_refused(
    live: LiveServer, question: bytes
) -> None:
    """A reviewer's find: only a heard audio message's id was refused to a typed message; one still open was
    taken, and the audio was then heard under the same id."""
    half = len(question) // 2
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("AUDIO_CHUNK", chunk("m1", question[:half], 0), transaction=tx)
        typed = await peer.send("MESSAGE", {"text": "hi", "message_id": "m1"}, transaction=tx)
        refused = await listener.until(lambda e: e["type"] == "ERROR")
    assert refused["payload"]["code"] == "INVALID_PAYLOAD" and refused["payload"]["related_id"] == typed


@pytest.mark.parametrize("b_hears", [True, False], ids=["both-hear", "only-a-hears"])
async def test_in_a_cluster_an_answer_is_spoken_once_and_stopped_through_any_node(
    redis_url: str, postgres_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, b_hears: bool
) -> None:
    """A second reviewer's finds: every node with a member taking audio spoke the same answer (each chunk came
    twice); and a cancel through another node of an answer written already was refused, its speech going on."""
    from haip_runtime.hub import voice

    monkeypatch.setattr(voice, "SPEAK_AHEAD_SECONDS", 1.0)
    cluster = {"redis_url": redis_url, "key_prefix": prefix, "heartbeat_seconds": 0.2, "node_ttl_seconds": 2}
    config = make_config(
        {
            "cluster": {**cluster, "connect_timeout_seconds": 5, "lease_seconds": 1.5},
            "storage": {"backend": "postgres", "url": postgres_url, "flush_interval_seconds": 0.01},
            "speech": {"local": {"kind": "local"}},
            "agents": {"echo": {"plugin": "echo", "speech": "local", "reply_audio": True}},
        }
    )
    text = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 9))
    with live_server(config) as a, live_server(config) as b:
        async with (
            open_peer("websocket", a, a.token("alice")) as here,
            open_peer("websocket", b, b.token("alice")) as there,
        ):
            mine, tx = await start(here, a, "echo", EVERYTHING)
            other = await joined(there, b, tx, EVERYTHING if b_hears else NO_AUDIO)
            await here.send("MESSAGE", {"text": text, "message_id": "long"}, transaction=tx)
            finished = await other.until(lambda e: e["type"] == "RUN_FINISHED")
            await mine.until(lambda e: e["type"] == "AUDIO_CHUNK")
            await there.send("RUN_CANCEL", {"run_id": finished["payload"]["run_id"]}, transaction=tx)
            stopped = await mine.until(
                lambda e: (
                    (e["type"] == "AUDIO_CHUNK" and bool(e["payload"].get("final")))
                    or (e["type"] == "INFO" and e["payload"].get("event") == "speech.interrupted")
                )
            )
    assert stopped["type"] == "INFO", stopped["payload"]  # not spoken to its end
    chunks = [(e["payload"]["message_id"], e["payload"]["seq_in_message"]) for e in mine.of("AUDIO_CHUNK")]
    assert chunks and len(chunks) == len(set(chunks))  # each once
    assert not other.of("ERROR")


async def test_an_ended_conversation_keeps_nothing_of_the_answers_it_was_playing(live: LiveServer) -> None:
    """What the desk keeps of an answer sent whole, to stop it while it plays, goes with its conversation."""
    async with open_peer("websocket", live, live.token("alice")) as peer:
        listener, tx = await start(peer, live, "echo", EVERYTHING)
        await peer.send("MESSAGE", {"text": "a short answer, spoken whole"}, transaction=tx)
        await listener.until(is_final_audio())  # (its run finished before: the text is written first)
        await peer.send("TRANSACTION_END", {}, transaction=tx)
        await listener.until(lambda e: e["type"] == "TRANSACTION_END")
    desk = live.runtime.hub.speech
    assert desk is not None and tx not in desk._playing
