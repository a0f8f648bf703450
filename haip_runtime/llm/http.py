"""HTTP for the hosted providers: one pooled ``httpx2`` client, retries with backoff, vendor errors as ``LlmError``.

``open_stream`` posts a JSON body and returns the response once its status is good, retrying 429,
5xx and failed connections (only before the first byte: a stream cut half-way is reported, not
replayed, since its text has already reached the users). ``events`` reads the server-sent events.
The API key lives in the client's headers only; messages are scrubbed of it before they are raised.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
import httpx2

from haip_runtime.config.providers import LlmOptions
from haip_runtime.exceptions import LlmError
from haip_runtime.protocol.events import LlmErrorCode

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
MAX_BACKOFF_SECONDS = 20.0
MAX_RETRY_AFTER_SECONDS = 60.0
_CONTEXT_WORDS = ("context_length", "context length", "too long", "maximum context", "exceed_context", "context window")


class HttpStreamer:
    """POSTs to one provider's endpoint and streams the answers back."""

    def __init__(
        self, vendor: str, base_url: str, headers: Mapping[str, str], options: LlmOptions, secret: str
    ) -> None:
        self.vendor = vendor
        self.base_url = base_url.rstrip("/")
        self._options = options
        self._secret = secret
        timeout = httpx2.Timeout(options.timeout_seconds, connect=min(options.timeout_seconds, 10.0))
        self._client = httpx2.AsyncClient(headers=dict(headers), timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open_stream(self, path: str, body: dict[str, Any], model: str) -> httpx2.Response:
        """The streaming response of ``POST base_url + path``, with a good status; ``LlmError`` otherwise."""
        url = self.base_url + path
        for attempt in range(self._options.max_retries + 1):
            last = attempt == self._options.max_retries
            try:
                response = await self._client.send(self._client.build_request("POST", url, json=body), stream=True)
            except httpx2.TimeoutException as exc:
                failure = LlmError(LlmErrorCode.LLM_TIMEOUT, f"{self.vendor} at {self.base_url} did not answer in time")
                await self._retry_or_raise(failure, exc, attempt, last, None)
                continue
            except httpx2.TransportError as exc:
                why = self.scrub(str(exc)) or type(exc).__name__
                failure = LlmError(
                    LlmErrorCode.LLM_UNREACHABLE, f"cannot reach {self.vendor} at {self.base_url}: {why}"
                )
                await self._retry_or_raise(failure, exc, attempt, last, None)
                continue
            if response.status_code < 400:
                return response
            text = await _read_and_close(response)
            failure = self.status_error(response.status_code, text, model)
            if response.status_code in RETRY_STATUSES:
                await self._retry_or_raise(failure, None, attempt, last, response.headers.get("retry-after"))
                continue
            raise failure
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    async def _retry_or_raise(
        self, failure: LlmError, cause: Exception | None, attempt: int, last: bool, retry_after: str | None
    ) -> None:
        if last:
            raise failure from cause
        delay = _backoff(self._options.retry_backoff_seconds, attempt, retry_after)
        logger.info("%s: %s; retry %d in %.2f s", self.vendor, failure.code, attempt + 1, delay)
        await anyio.sleep(delay)

    def status_error(self, status: int, body: str, model: str) -> LlmError:
        """A readable ``LlmError`` for an HTTP error status, with the vendor's own message."""
        said = self.scrub(_vendor_message(body)) or f"HTTP {status}"
        where = f"{self.vendor} at {self.base_url}"
        if status in (401, 403):
            return LlmError(LlmErrorCode.LLM_AUTH_FAILED, f"{where} refused the API key (HTTP {status}): {said}")
        if status == 404:
            return LlmError(LlmErrorCode.LLM_MODEL_NOT_FOUND, f"{where} has no model {model!r} (HTTP 404): {said}")
        if status == 429:
            return LlmError(LlmErrorCode.LLM_RATE_LIMITED, f"{where} is rate limiting us (HTTP 429): {said}")
        if status >= 500 or status in RETRY_STATUSES:
            return LlmError(LlmErrorCode.LLM_UNAVAILABLE, f"{where} failed (HTTP {status}): {said}")
        return self.request_error(said, status)

    def request_error(self, said: str, status: int | None = None) -> LlmError:
        """A rejected request: context too long, or another reason the vendor gave."""
        http = f" (HTTP {status})" if status else ""
        if any(word in said.lower() for word in _CONTEXT_WORDS):
            return LlmError(
                LlmErrorCode.LLM_CONTEXT_TOO_LONG, f"the conversation is too long for the model{http}: {said}"
            )
        return LlmError(LlmErrorCode.LLM_BAD_REQUEST, f"{self.vendor} refused the request{http}: {said}")

    def broken(self, exc: Exception) -> LlmError:
        """The stream failed after it started (connection dropped, read timeout, bad data)."""
        if isinstance(exc, httpx2.TimeoutException):
            return LlmError(LlmErrorCode.LLM_TIMEOUT, f"{self.vendor} stopped sending mid-answer (timed out)")
        why = self.scrub(str(exc)) or type(exc).__name__
        return LlmError(LlmErrorCode.LLM_STREAM_BROKEN, f"the answer from {self.vendor} was cut off: {why}")

    def scrub(self, text: str) -> str:
        """``text`` without the API key in it (some vendors echo part of a bad key back)."""
        return text.replace(self._secret, "***") if self._secret else text


async def events(streamer: HttpStreamer, response: httpx2.Response) -> AsyncGenerator[tuple[str, Any], None]:
    """``(event name, parsed JSON data)`` of a server-sent event stream; ``[DONE]`` ends it.

    Closes the response when done, and turns transport failures into ``LlmError``.
    """
    try:
        async for sse in httpx2.EventSource(response):
            if not sse.data or sse.data.strip() == "[DONE]":
                if sse.data.strip() == "[DONE]":
                    return
                continue
            try:
                data = json.loads(sse.data)
            except json.JSONDecodeError as exc:
                raise LlmError(
                    LlmErrorCode.LLM_STREAM_BROKEN, f"{streamer.vendor} sent data that is not JSON: {sse.data[:80]!r}"
                ) from exc
            yield sse.event, data
    except httpx2.TransportError as exc:
        raise streamer.broken(exc) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await response.aclose()


async def _read_and_close(response: httpx2.Response) -> str:
    try:
        return (await response.aread()).decode("utf-8", "replace")
    except httpx2.TransportError:
        return ""
    finally:
        await response.aclose()


def _vendor_message(body: str) -> str:
    """The message in an OpenAI- or Anthropic-shaped error body, else the body's start."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:500]
    if isinstance(error, str):
        return error[:500]
    return body.strip()[:300]


def _backoff(base: float, attempt: int, retry_after: str | None) -> float:
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = -1
        if 0 <= seconds <= MAX_RETRY_AFTER_SECONDS:
            return seconds
    delay = min(base * 2.0**attempt, MAX_BACKOFF_SECONDS)
    return delay * (0.5 + random.random() / 2)  # jitter, so many turns do not retry in step
