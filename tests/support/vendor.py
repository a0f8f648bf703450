"""A stand-in for a hosted LLM at the wire: a real uvicorn on 127.0.0.1 that answers each POST with the
next scripted reply, in the vendor's own streaming format (server-sent events), and records requests.

``openai_*`` and ``anthropic_*`` build the event streams those APIs send; a ``Reply`` can also be an
error status with a vendor error body, or a stream cut off mid-way (the connection drops).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.serving import served


@dataclass
class Reply:
    events: list[str] = field(default_factory=list)
    """Raw SSE text, one item per event."""
    status: int = 200
    error: dict[str, Any] | None = None
    """With an error status: the JSON body."""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    """Cut the connection after ``events`` instead of ending the stream."""
    stall: bool = False
    """Go silent after ``events`` (before the headers if there are none) until ``release()``, at most 10 s."""
    then: list[str] = field(default_factory=list)
    """After a stall: the rest of the stream."""


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class VendorServer:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Recorded] = []
        self.url = ""
        self._released = threading.Event()
        self.accepted_key: str | None = None

    def release(self) -> None:
        """End every stall."""
        self._released.set()

    async def _stall(self) -> None:
        await anyio.to_thread.run_sync(self._released.wait, 10)

    async def models(self, request: Request) -> Response:
        """``GET .../models``, which ``check --connect`` asks: 401 unless the key is ``accepted_key``."""
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.accepted_key is not None and key != self.accepted_key:
            return JSONResponse({"error": {"message": "invalid key"}}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "m"}]})

    def script(self, *replies: Reply) -> None:
        self.replies[:] = list(replies)
        self.requests.clear()
        self._released.clear()

    async def handle(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests.append(Recorded(request.url.path, dict(request.headers), body))
        if not self.replies:
            return JSONResponse({"error": {"message": "no scripted reply left"}}, status_code=500)
        reply = self.replies.pop(0)
        if reply.stall and not reply.events:
            await self._stall()
        if reply.status >= 400:
            return JSONResponse(reply.error or {}, status_code=reply.status, headers=reply.headers)

        async def stream() -> AsyncIterator[str]:
            for event in reply.events:
                yield event
            if reply.drop:
                raise ConnectionAbortedError("the vendor dropped the stream")  # uvicorn cuts the connection
            if reply.stall:
                await self._stall()
                for event in reply.then:
                    yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers=reply.headers)

    def openai_llm(self, model: str = "gpt-test") -> dict[str, Any]:
        """An ``[llm.<id>]`` table that points an OpenAI-format provider at this server (no retries)."""
        return {"kind": "openai", "base_url": self.url + "/v1", "api_key": "sk-test", "model": model, "max_retries": 0}


@contextmanager
def vendor_server() -> Iterator[VendorServer]:
    vendor = VendorServer()
    app = Starlette(
        routes=[Route("/{path:path}", vendor.handle, methods=["POST"]), Route("/{path:path}", vendor.models)]
    )
    with served(app, "the vendor stand-in") as url:
        vendor.url = url + ""
        yield vendor


# --- OpenAI chat completions ------------------------------------------------------------------------


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def openai_chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": choices, **extra})


def openai_text(*parts: str, usage: tuple[int, int] | None = (12, 3)) -> list[str]:
    """The stream of a plain text answer, as OpenAI sends it (role first, then content, finish, usage, [DONE])."""
    events = [openai_chunk({"role": "assistant", "content": ""})]
    events += [openai_chunk({"content": part}) for part in parts]
    events.append(openai_chunk({}, "stop"))
    if usage is not None:
        events.append(openai_chunk(None, usage={"prompt_tokens": usage[0], "completion_tokens": usage[1]}))
    return [*events, _sse("[DONE]")]


def openai_tool_call(name: str, arguments: str, call_id: str = "call_1", usage: tuple[int, int] = (20, 9)) -> list[str]:
    """A tool call whose name and JSON arguments arrive in fragments, as OpenAI streams them."""
    half = len(arguments) // 2
    events = [
        openai_chunk({"role": "assistant", "content": None}),
        openai_chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                ]
            }
        ),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]}),
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}),
        openai_chunk({}, "tool_calls"),
        openai_chunk(None, usage={"prompt_tokens": usage[0], "completion_tokens": usage[1]}),
    ]
    return [*events, _sse("[DONE]")]


def openai_error(status: int, message: str, code: str | None = None) -> Reply:
    return Reply(status=status, error={"error": {"message": message, "type": "invalid_request_error", "code": code}})


# --- Anthropic messages -----------------------------------------------------------------------------


def anthropic_events(*blocks: dict[str, Any], stop: str = "end_turn", usage: tuple[int, int] = (15, 4)) -> list[str]:
    """A Messages API stream: ``blocks`` are ``{"text": ...}`` or ``{"tool": name, "id": ..., "json": ...}``."""
    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "role": "assistant", "usage": {"input_tokens": usage[0], "output_tokens": 1}},
    }
    events = [_sse(start, "message_start"), _sse({"type": "ping"}, "ping")]
    for index, block in enumerate(blocks):
        if "text" in block:
            begin = {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            events.append(_sse(begin, "content_block_start"))
            for word in block["text"].split(" "):
                delta = {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": word + " "},
                }
                events.append(_sse(delta, "content_block_delta"))
        else:
            tool = {"type": "tool_use", "id": block["id"], "name": block["tool"], "input": {}}
            events.append(
                _sse({"type": "content_block_start", "index": index, "content_block": tool}, "content_block_start")
            )
            raw = block["json"]
            for piece in (raw[: len(raw) // 2], raw[len(raw) // 2 :]):
                delta = {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                }
                events.append(_sse(delta, "content_block_delta"))
        events.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    end = {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": usage[1]}}
    return [*events, _sse(end, "message_delta"), _sse({"type": "message_stop"}, "message_stop")]


def anthropic_error(status: int, kind: str, message: str) -> Reply:
    return Reply(status=status, error={"type": "error", "error": {"type": kind, "message": message}})


def anthropic_stream_error(kind: str, message: str) -> str:
    return _sse({"type": "error", "error": {"type": kind, "message": message}}, "error")
