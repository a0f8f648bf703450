"""Speech for tests: sentences spoken by Debian's espeak-ng (scripts/setup installs it), WAV helpers, and a
stand-in for the OpenAI audio API at the wire (``/v1/audio/transcriptions`` and ``/v1/audio/speech``,
in OpenAI's own request and response formats) on a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import errno
import io
import math
import re
import shutil
import subprocess
import wave
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.serving import served

_NUMBERS = {"2": "two", "3": "three", "4": "four", "5": "five"}


def espeak(text: str) -> bytes:
    """``text`` spoken by espeak-ng, as a WAV file (22.05 kHz mono)."""
    exe = shutil.which("espeak-ng")
    assert exe is not None, "espeak-ng is missing: run scripts/setup as root (or apt-get install espeak-ng)"
    for attempt in range(3):
        try:
            done = subprocess.run([exe, "--stdout", "--stdin"], input=text.encode(), capture_output=True, check=True)
            break
        except OSError as exc:
            # CI's VM once failed the exec itself with EFAULT ("Bad address") in all of a module's tests:
            # the machine's fault, not espeak's or ours, and gone on the next try. Anything else is raised.
            if exc.errno != errno.EFAULT or attempt == 2:
                raise
    raw = done.stdout
    return wav(raw[44:], 22_050)


def wav(frames: bytes, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames[: len(frames) // 2 * 2])
    return out.getvalue()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnframes() / w.getframerate()


def words(text: str) -> list[str]:
    """``text`` as lower-case words, digits spelled out (whisper writes "2" for "two")."""
    return [_NUMBERS.get(word, word) for word in re.findall(r"[a-z0-9']+", text.lower())]


def tone(seconds: float, rate: int = 16_000) -> bytes:
    samples = array("h", (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate))))
    return wav(samples.tobytes(), rate)


@dataclass
class SpeechVendor:
    """What the stand-in answers and what it was asked."""

    url: str = ""
    transcripts: list[str] = field(default_factory=list)
    """The next transcriptions to answer, in order."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    speech_status: int = 200
    """The status of /audio/speech alone."""

    async def transcriptions(self, request: Request) -> Response:
        async with request.form() as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, "you must provide a file")
            self.requests.append(
                {
                    "path": request.url.path,
                    "authorization": request.headers.get("authorization"),
                    "model": form.get("model"),
                    "language": form.get("language"),
                    "filename": upload.filename,
                    "content_type": upload.content_type,
                    "bytes": await upload.read(),
                }
            )
        if self.status != 200:
            return _error(self.status, "the model is overloaded")
        if not self.transcripts:
            return _error(400, "Audio file could not be decoded")
        return JSONResponse({"text": self.transcripts.pop(0)})

    async def speech(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, "authorization": request.headers.get("authorization"), **body})
        if self.status != 200 or self.speech_status != 200:
            return _error(self.status if self.status != 200 else self.speech_status, "the model is overloaded")
        if not body.get("input") or body.get("response_format") != "wav":
            return _error(400, "input and response_format wav are required here")
        return Response(tone(0.06 * len(body["input"]), 24_000), media_type="audio/wav")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}}, status)


@contextmanager
def speech_vendor() -> Iterator[SpeechVendor]:
    vendor = SpeechVendor()
    app = Starlette(
        routes=[
            Route("/v1/audio/transcriptions", vendor.transcriptions, methods=["POST"]),
            Route("/v1/audio/speech", vendor.speech, methods=["POST"]),
        ]
    )
    with served(app, "the speech stand-in") as url:
        vendor.url = url + "/v1"
        yield vendor
