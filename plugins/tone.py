"""An example agent plugin that listens: it measures the audio you send and answers with a tone.

Send it a WAV clip (16-bit PCM, as ``AUDIO``/``AUDIO_CHUNK``, inline or two-frame): it says how
long the clip is and how loud (RMS and peak in dBFS), then sends back a sine tone as a WAV of the
same length (at most ``max_seconds``), higher the louder you were. Other formats get their size.
Enable it in haip.toml::

    [agents.tone]
    plugin = "plugins/tone.py:ToneAgent"
    options = { base_hz = 440, max_seconds = 2 }
"""

from __future__ import annotations

import io
import math
import wave
from array import array
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from haip_runtime import Agent, AudioClip, Turn

SAMPLE_RATE = 16_000


class ToneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_hz: float = Field(default=440, gt=20, lt=8000)
    """Pitch of the answer to a quiet clip; every 6 dB louder adds a semitone."""
    max_seconds: float = Field(default=2.0, gt=0, le=10)
    """Longest tone sent back."""


@dataclass(frozen=True)
class Measure:
    seconds: float
    rms_dbfs: float
    peak_dbfs: float


class ToneAgent(Agent[ToneOptions]):
    name = "tone"
    description = "Measures the audio you send (duration, level) and answers with a tone."
    Options = ToneOptions

    async def on_message(self, turn: Turn) -> None:
        await turn.say("Send me audio (a 16-bit PCM WAV): I will measure it and answer with a tone.")

    async def on_audio(self, turn: Turn) -> None:
        clip = turn.audio
        assert clip is not None
        measure = measure_wav(clip)
        if measure is None:
            await turn.say(f"got {len(clip.data)} bytes of {clip.mime}; I can only measure 16-bit PCM WAV")
            return
        await turn.say(
            f"heard {measure.seconds:.2f} s at {measure.rms_dbfs:.1f} dBFS RMS (peak {measure.peak_dbfs:.1f} dBFS)"
        )
        seconds = min(max(measure.seconds, 0.05), self.options.max_seconds)
        semitones = max(0.0, (measure.rms_dbfs + 60) / 6)
        frequency = self.options.base_hz * 2 ** (semitones / 12)
        await turn.send_audio(tone_wav(frequency, seconds), "audio/wav", duration_ms=round(seconds * 1000))


def measure_wav(clip: AudioClip) -> Measure | None:
    """Duration and level of a 16-bit PCM WAV; ``None`` for anything else."""
    try:
        with wave.open(io.BytesIO(clip.data), "rb") as wav:
            if wav.getsampwidth() != 2:
                return None
            rate, count = wav.getframerate(), wav.getnframes()
            frames = wav.readframes(count)
    except (wave.Error, EOFError):
        return None
    samples = array("h", frames[: len(frames) // 2 * 2])
    if not samples or rate <= 0:
        return Measure(0.0, -math.inf, -math.inf)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    peak = max(abs(s) for s in samples)
    return Measure(count / rate, _dbfs(rms), _dbfs(peak))


def _dbfs(value: float) -> float:
    return 20 * math.log10(value / 32768) if value > 0 else -math.inf


def tone_wav(frequency: float, seconds: float, amplitude: float = 0.3) -> bytes:
    """A mono 16-bit sine tone as WAV bytes."""
    count = round(SAMPLE_RATE * seconds)
    scale = amplitude * 32767
    samples = array("h", (round(scale * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE)) for n in range(count)))
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(samples.tobytes())
    return out.getvalue()
