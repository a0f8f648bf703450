"""The speech providers on their own: local (whisper tiny.en and espeak-ng, on this CPU, offline) and openai
(against a stand-in at the wire speaking OpenAI's audio API); the sentence splitter."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pydantic import SecretStr

from haip_runtime.config.providers import LocalSpeechConfig, OpenAiSpeechConfig
from haip_runtime.exceptions import SpeechError
from haip_runtime.protocol.events import SpeechErrorCode
from haip_runtime.speech import create_speech_provider
from haip_runtime.speech.local import LocalSpeech, streamed_wav
from haip_runtime.speech.openai import OpenAiSpeech
from haip_runtime.speech.provider import pcm_wav, wav_pieces
from haip_runtime.speech.sentences import MAX_CHARS, SentenceSplitter
from tests.support.speech import SpeechVendor, espeak, speech_vendor, wav_seconds, words

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def local() -> LocalSpeech:
    provider = create_speech_provider("local", LocalSpeechConfig(kind="local"))
    assert isinstance(provider, LocalSpeech)
    return provider


@pytest.fixture(scope="module")
def vendor() -> Iterator[SpeechVendor]:
    with speech_vendor() as server:
        yield server


async def test_local_hears_an_espeak_sentence(local: LocalSpeech) -> None:
    heard = await local.transcribe(espeak("what is two plus three"), "audio/wav")
    assert words(heard) == ["what", "is", "two", "plus", "three"]


async def test_local_speaks_a_wav_that_it_can_hear_back(local: LocalSpeech) -> None:
    speech = await local.synthesize("Two plus three is five.")
    assert speech.mime == "audio/wav"
    assert 0.8 < wav_seconds(speech.data) < 4 and abs(speech.duration_ms / 1000 - wav_seconds(speech.data)) < 0.01
    assert words(await local.transcribe(speech.data, "audio/wav")) == ["two", "plus", "three", "is", "five"]


async def test_local_says_what_it_cannot_decode(local: LocalSpeech) -> None:
    with pytest.raises(SpeechError) as caught:
        await local.transcribe(b"RIFF not really a wave file" * 20, "audio/wav")
    assert caught.value.code == SpeechErrorCode.SPEECH_NOT_UNDERSTOOD


async def test_a_cancelled_transcription_returns_at_once(local: LocalSpeech) -> None:
    clip = espeak("the weather in paris is sunny and warm, and tomorrow it will rain")
    await local.load()
    with anyio.move_on_after(0.05) as scope:
        await local.transcribe(clip, "audio/wav")
    assert scope.cancelled_caught
    assert words(await local.transcribe(espeak("turn off the lights"), "audio/wav"))[:2] == ["turn", "off"]


async def test_a_missing_model_folder_is_a_clear_error(tmp_path: anyio.Path) -> None:
    provider = LocalSpeech("x", LocalSpeechConfig(kind="local", model_path=tmp_path / "nowhere"))
    with pytest.raises(SpeechError) as caught:
        await provider.transcribe(b"", "audio/wav")
    assert caught.value.code == SpeechErrorCode.SPEECH_UNAVAILABLE and "nowhere" in caught.value.message


async def test_an_espeak_that_cannot_be_started_is_a_speech_error(
    local: LocalSpeech, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "espeak-ng"
    broken.write_bytes(b"\x7fELF not really a program")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SpeechError) as caught:
        await local.synthesize("hello")
    assert caught.value.code == SpeechErrorCode.SPEECH_FAILED and "could not be started" in caught.value.message


def test_espeak_stdout_wav_gets_true_sizes() -> None:
    with pytest.raises(SpeechError):
        streamed_wav(b"not a wav")


async def test_openai_transcribes_with_a_multipart_upload(vendor: SpeechVendor) -> None:
    config = OpenAiSpeechConfig(kind="openai", base_url=vendor.url, api_key=SecretStr("sk-test"), language="en")
    provider = create_speech_provider("cloud", config)
    assert isinstance(provider, OpenAiSpeech)
    vendor.requests.clear()
    vendor.transcripts[:] = ["What is 2 plus 3?"]
    clip = espeak("what is two plus three")
    try:
        assert await provider.transcribe(clip, "audio/webm;codecs=opus") == "What is 2 plus 3?"
    finally:
        await provider.aclose()
    (request,) = vendor.requests
    assert request["authorization"] == "Bearer sk-test" and request["model"] == "whisper-1"
    assert (request["filename"], request["content_type"], request["language"]) == ("speech.webm", "audio/webm", "en")
    assert request["bytes"] == clip


async def test_openai_speaks_wav(vendor: SpeechVendor) -> None:
    provider = OpenAiSpeech("cloud", OpenAiSpeechConfig(kind="openai", base_url=vendor.url, voice="nova"))
    vendor.requests.clear()
    try:
        speech = await provider.synthesize("Five.")
    finally:
        await provider.aclose()
    assert speech.mime == "audio/wav" and speech.duration_ms == 300 and wav_seconds(speech.data) == 0.3
    (request,) = vendor.requests
    assert (request["model"], request["voice"], request["input"], request["authorization"]) == (
        "tts-1",
        "nova",
        "Five.",
        None,
    )


async def test_openai_errors_are_speech_errors_without_the_key(vendor: SpeechVendor) -> None:
    provider = OpenAiSpeech("cloud", OpenAiSpeechConfig(kind="openai", base_url=vendor.url, api_key=SecretStr("sk-x")))
    vendor.transcripts.clear()
    try:
        with pytest.raises(SpeechError) as refused:
            await provider.transcribe(b"noise", "audio/wav")
        vendor.status = 503
        with pytest.raises(SpeechError) as failed:
            await provider.synthesize("hello")
    finally:
        vendor.status = 200
        await provider.aclose()
    assert refused.value.code == SpeechErrorCode.SPEECH_NOT_UNDERSTOOD
    assert "could not be decoded" in refused.value.message
    assert failed.value.code == SpeechErrorCode.SPEECH_FAILED and "503" in failed.value.message
    assert "sk-x" not in refused.value.message + failed.value.message


async def test_openai_unreachable_is_a_speech_error() -> None:
    with socket_port() as port:
        provider = OpenAiSpeech("cloud", OpenAiSpeechConfig(kind="openai", base_url=f"http://127.0.0.1:{port}/v1"))
        try:
            with pytest.raises(SpeechError) as caught:
                await provider.synthesize("hello")
        finally:
            await provider.aclose()
    assert caught.value.code == SpeechErrorCode.SPEECH_FAILED and "unreachable" in caught.value.message


def test_sentences_come_out_as_the_text_streams() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Two plus three") == []
    assert splitter.feed(" is five. Any") == ["Two plus three is five."]
    assert splitter.feed("thing else?\nYes!") == ["Anything else?"]
    assert splitter.feed(" ... ") == ["Yes!"]
    assert splitter.flush() == []
    assert splitter.feed("3.5 is a number") == [] and splitter.flush() == ["3.5 is a number"]


def test_a_cut_note_is_shown_not_spoken() -> None:
    """A front-end developer's find: the spoken answer read out "[cut: the answer reached ...]"."""
    from haip_runtime.agents.api import CUT_NOTE
    from haip_runtime.agents.assistant import CUT_MARKER

    for note in (CUT_MARKER, CUT_NOTE):
        splitter = SentenceSplitter()
        said = splitter.feed("The sea is wide and") + splitter.feed(note) + splitter.flush()
        assert said == ["The sea is wide and …"], said  # (the note, not a word of it)


def test_a_long_sentence_is_cut_at_a_comma_or_space() -> None:
    splitter = SentenceSplitter()
    parts = splitter.feed("word, " * 100)
    assert parts and all(len(part) <= MAX_CHARS for part in parts)
    assert " ".join(parts + splitter.flush()).split() == ["word,"] * 100


def test_a_long_sentence_that_comes_whole_is_cut_too() -> None:
    """A reviewer's find: a sentence that ended in the part that brought it (``turn.say``) came out whole,
    63,000 characters, and its audio envelope passed the frame size for the text alone."""
    splitter = SentenceSplitter()
    parts = splitter.feed(" ".join(["word"] * 12_600) + ".\n") + splitter.flush()
    assert len(parts) > 200 and all(len(part) <= MAX_CHARS for part in parts)
    assert " ".join(parts).split() == ["word"] * 12_599 + ["word."]


class socket_port:
    """A port on 127.0.0.1 with nothing listening."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_a_wav_is_cut_into_whole_wavs_that_fit_and_play_the_same() -> None:
    """What a spoken sentence too large for one envelope is sent as (``hub/voice.py``): whole WAVs of at
    most ``most`` bytes, whose samples, played in turn, are the sentence's."""
    samples = bytes(range(256)) * 400  # 102,400 bytes: 51,200 16-bit samples, 3.2 s at 16 kHz
    whole = pcm_wav(samples, 16_000)
    pieces = wav_pieces(whole, 30_000)
    assert len(pieces) == 4 and all(len(data) <= 30_000 for data, _ in pieces)
    played = b""
    for data, duration_ms in pieces:
        with wave.open(io.BytesIO(data)) as wav:
            assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (16_000, 2, 1)
            played += wav.readframes(wav.getnframes())
            assert duration_ms == round(wav.getnframes() * 1000 / 16_000)
    assert played == samples and sum(ms for _, ms in pieces) == 3200
    assert wav_pieces(whole, len(whole)) == [(whole, 3200)]  # it fits: as it is
    assert wav_pieces(b"not a wav", 4) == [(b"not a wav", 0)]  # nothing to cut by: as it is
