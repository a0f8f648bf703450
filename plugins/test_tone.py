"""Tests of the tone plugin's measuring and tone making, without a server."""

from __future__ import annotations

import math

from haip_runtime import AudioClip
from plugins.tone import measure_wav, tone_wav


def clip(data: bytes, mime: str = "audio/wav") -> AudioClip:
    return AudioClip(data=data, mime=mime, message_id="m", author="u")


def test_a_tone_measures_as_what_it_was_made_with() -> None:
    measure = measure_wav(clip(tone_wav(440, 0.25, amplitude=1.0)))
    assert measure is not None
    assert measure.seconds == 0.25
    assert round(measure.peak_dbfs, 1) == 0.0 and round(measure.rms_dbfs, 1) == -3.0


def test_silence_and_other_formats() -> None:
    silent = measure_wav(clip(tone_wav(440, 0.1, amplitude=0.0)))
    assert silent is not None and silent.rms_dbfs == -math.inf
    assert measure_wav(clip(b"OggS not a wav", "audio/ogg")) is None
