"""``kind = "openai"``: the OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama, llama.cpp, LM Studio).

``chat_request`` builds the request body (history as ``messages``, MCP tools as ``functions``
with vendor-safe names), ``ChunkReader`` turns streamed ``chat.completion.chunk`` objects into
``Delta``s (tool-call fragments are joined by index). The embedded local model speaks the same
chunk format, so ``local.py`` reuses both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from haip_runtime.config.providers import LlmOptions, OpenAiLlmConfig
from haip_runtime.exceptions import LlmError
from haip_runtime.llm.http import HttpStreamer, events
from haip_runtime.llm.provider import (
    AgentText,
    Delta,
    Provider,
    ToolCall,
    ToolLike,
    ToolNames,
    ToolResults,
    Usage,
    UserText,
    conversation,
    parse_arguments,
)
from haip_runtime.protocol.events import LlmErrorCode

if TYPE_CHECKING:
    from haip_runtime.llm.provider import HistoryEntry

_STOP_REASONS = {"stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls", "length": "length"}


def chat_request(
    model: str,
    history: Sequence[HistoryEntry],
    tools: Sequence[ToolLike],
    instructions: str | None,
    options: LlmOptions,
    names: ToolNames,
) -> dict[str, Any]:
    """The body of ``POST /chat/completions`` (streaming)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for exchange in conversation(history):
        if isinstance(exchange, UserText):
            messages.append({"role": "user", "content": exchange.text})
        elif isinstance(exchange, AgentText):
            message: dict[str, Any] = {"role": "assistant", "content": exchange.text or None}
            if exchange.calls:
                message["tool_calls"] = [
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": names.vendor(name), "arguments": json.dumps(args)},
                    }
                    for cid, name, args in exchange.calls
                ]
            messages.append(message)
        elif isinstance(exchange, ToolResults):
            messages += [{"role": "tool", "tool_call_id": cid, "content": text} for cid, text, _ in exchange.results]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": names.vendor(tool.name),
                    "description": tool.description,
                    "parameters": tool.input_schema or {"type": "object"},
                },
            }
            for tool in tools
        ]
    for key in ("max_tokens", "temperature", "top_p"):
        value = getattr(options, key)
        if value is not None:
            body[key] = value
    return body


class ChunkReader:
    """Reads ``chat.completion.chunk`` objects into ``Delta``s; tool calls come out whole, at the end."""

    def __init__(self, names: ToolNames, vendor: str) -> None:
        self._names = names
        self._vendor = vendor
        self._calls: dict[int, dict[str, str]] = {}
        self._stop: str | None = None

    def feed(self, chunk: dict[str, Any]) -> Iterator[Delta]:
        error = chunk.get("error")
        if error is not None:
            said = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            kind = str(error.get("type", "")) if isinstance(error, dict) else ""
            if "context" in kind or "context" in said.lower():
                raise LlmError(LlmErrorCode.LLM_CONTEXT_TOO_LONG, f"the conversation is too long for the model: {said}")
            raise LlmError(LlmErrorCode.LLM_STREAM_BROKEN, f"{self._vendor} failed mid-answer: {said}")
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield Delta(text=str(delta["content"]))
            for fragment in delta.get("tool_calls") or ():
                self._join(fragment)
            if choice.get("finish_reason"):
                self._stop = _STOP_REASONS.get(choice["finish_reason"], str(choice["finish_reason"]))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            yield Delta(usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)))

    def _join(self, fragment: dict[str, Any]) -> None:
        call = self._calls.setdefault(int(fragment.get("index", len(self._calls))), {"id": "", "name": "", "args": ""})
        function = fragment.get("function") or {}
        call["id"] = fragment.get("id") or call["id"]
        call["name"] += function.get("name") or ""
        call["args"] += function.get("arguments") or ""

    def finish(self) -> Iterator[Delta]:
        for index in sorted(self._calls):
            call = self._calls[index]
            name = self._names.original(call["name"])
            yield Delta(
                tool_call=ToolCall(call["id"] or f"call_{index}", name, parse_arguments(call["args"]), call["args"])
            )
        stop = self._stop or ("tool_calls" if self._calls else None)
        if stop is None:
            raise LlmError(LlmErrorCode.LLM_STREAM_BROKEN, f"the answer from {self._vendor} ended without a finish")
        yield Delta(stop_reason=stop)


class OpenAiProvider(Provider):
    """Streams chat completions from an OpenAI-compatible server."""

    def __init__(self, id: str, config: OpenAiLlmConfig) -> None:
        self.id = id
        self.model = config.model
        self.config = config
        key = config.api_key.get_secret_value() if config.api_key else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = HttpStreamer(f"llm {id!r}", config.base_url, headers, config, key)

    async def stream(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        names = ToolNames(tool.name for tool in tools)
        body = chat_request(self.model, history, tools, instructions, self.config, names)
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        response = await self._http.open_stream("/chat/completions", body, self.model)
        reader = ChunkReader(names, self._http.vendor)
        async for _, chunk in events(self._http, response):
            for delta in reader.feed(chunk):
                yield delta
        for delta in reader.finish():
            yield delta

    async def aclose(self) -> None:
        await self._http.aclose()
