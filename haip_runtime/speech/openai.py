"""``kind = "openai"``: the OpenAI-compatible audio API, as OpenAI, speaches and faster-whisper-server speak it.

``POST {base_url}/audio/transcriptions`` (multipart: ``file``, ``model``, ``response_format=json``)
answers ``{"text": ...}``; ``POST {base_url}/audio/speech`` (JSON: ``model``, ``input``, ``voice``,
``response_format: "wav"``) answers the audio bytes. The key lives in the client's headers only.
"""

from __future__ import annotations

import mimetypes
from typing import Any

import httpx2

from haip_runtime.config.providers import OpenAiSpeechConfig
from haip_runtime.exceptions import SpeechError
from haip_runtime.protocol.events import SpeechErrorCode
from haip_runtime.speech.provider import Speech, SpeechProvider, wav_duration_ms

#: File names by type, so the server knows the container (it reads the extension).
_EXTENSIONS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/webm": "webm", "audio/ogg": "ogg", "audio/mpeg": "mp3"}


class OpenAiSpeech(SpeechProvider):
    def __init__(self, id: str, config: OpenAiSpeechConfig) -> None:
        super().__init__(id)
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        timeout = httpx2.Timeout(config.timeout_seconds, connect=min(config.timeout_seconds, 10.0))
        self._client = httpx2.AsyncClient(headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def transcribe(self, audio: bytes, mime: str) -> str:
        base = mime.split(";")[0].strip().lower()
        extension = _EXTENSIONS.get(base) or (mimetypes.guess_extension(base) or ".bin").lstrip(".")
        form = {"model": self.config.transcription_model, "response_format": "json"}
        if self.config.language:
            form["language"] = self.config.language
        response = await self._post(
            "/audio/transcriptions", files={"file": (f"speech.{extension}", audio, base)}, data=form
        )
        try:
            body = response.json()
            text = body["text"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"{self.base_url} answered no transcription") from exc
        return str(text).strip()

    async def synthesize(self, text: str) -> Speech:
        body = {"model": self.config.speech_model, "input": text, "voice": self.config.voice, "response_format": "wav"}
        response = await self._post("/audio/speech", json=body)
        duration = wav_duration_ms(response.content)
        if duration is None:
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"{self.base_url} answered audio that is not WAV")
        return Speech(response.content, "audio/wav", duration)

    async def _post(self, path: str, **request: Any) -> httpx2.Response:
        url = self.base_url + path
        try:
            response = await self._client.post(url, **request)
        except httpx2.TimeoutException as exc:
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"{url} did not answer in time") from exc
        except httpx2.TransportError as exc:
            raise SpeechError(SpeechErrorCode.SPEECH_FAILED, f"{url} is unreachable: {type(exc).__name__}") from exc
        if response.status_code == 400:
            raise SpeechError(SpeechErrorCode.SPEECH_NOT_UNDERSTOOD, f"{url} refused the audio: {_said(response)}")
        if response.status_code >= 300:
            raise SpeechError(
                SpeechErrorCode.SPEECH_FAILED, f"{url} answered HTTP {response.status_code}: {_said(response)}"
            )
        return response


def _said(response: httpx2.Response) -> str:
    """The vendor's error message (``{"error": {"message": ...}}``), short."""
    try:
        body = response.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text
    return str(message or "")[:200]
