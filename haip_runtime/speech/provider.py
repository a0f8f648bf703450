"""The speech seam: ``SpeechProvider`` hears (``transcribe``) and speaks (``synthesize``); WAV helpers.

A provider is built once per ``[speech.<id>]`` and shared by every transaction; its methods are
cancellable (a cancelled turn stops transcribing and speaking) and never block the event loop.
"""

from __future__ import annotations

import io
import wave
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Speech:
    """Synthesized audio: a whole playable file (``mime``) and its length."""

    data: bytes
    mime: str
    duration_ms: int


class SpeechProvider(ABC):
    """Speech to text and text to speech, for agents with ``agents.<name>.speech``."""

    def __init__(self, id: str) -> None:
        self.id = id

    @abstractmethod
    async def transcribe(self, audio: bytes, mime: str) -> str:
        """The words in ``audio`` (any container the engine decodes: WAV, WebM/Opus, Ogg, MP3...).

        Raises ``SpeechError`` (``SPEECH_NOT_UNDERSTOOD`` for audio it cannot decode)."""

    @abstractmethod
    async def synthesize(self, text: str) -> Speech:
        """``text`` spoken, as one playable file."""

    async def load(self) -> None:
        """Load what the first request would (models), off the event loop; the default loads nothing."""
        return None

    def waiting(self) -> int:
        """How many transcriptions one asked for now would wait behind (0: it starts at once, as with a
        service that takes requests in parallel, the default)."""
        return 0

    async def aclose(self) -> None:
        """Release connections; the default holds none."""
        return None


def pcm_wav(frames: bytes, rate: int, channels: int = 1, width: int = 2) -> bytes:
    """16-bit PCM ``frames`` as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)
    return out.getvalue()


def wav_pieces(data: bytes, most: int) -> list[tuple[bytes, int]]:
    """``data`` (a PCM WAV file) as whole WAV files of at most ``most`` bytes each, in order, with each
    one's length in ms: ``[(data, its length)]`` if it fits, or if it is not a WAV this can cut."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError):
        return [(data, wav_duration_ms(data) or 0)]
    step = channels * width
    if len(data) <= most or not rate or not step:
        return [(data, round(len(frames) // max(step, 1) * 1000 / rate) if rate else 0)]
    header = len(pcm_wav(b"", rate, channels, width))
    per_piece = max(step, (most - header) // step * step)
    pieces = []
    for at in range(0, len(frames), per_piece):
        part = frames[at : at + per_piece]
        pieces.append((pcm_wav(part, rate, channels, width), round(len(part) // step * 1000 / rate)))
    return pieces


def wav_duration_ms(data: bytes) -> int | None:
    """The length of a WAV file, or ``None`` if ``data`` is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate = wav.getframerate()
            return round(wav.getnframes() * 1000 / rate) if rate else None
    except (wave.Error, EOFError):
        return None
