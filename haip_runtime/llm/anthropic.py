"""``kind = "anthropic"``: the Anthropic Messages API, streamed, with tool use.

History becomes ``messages`` (assistant turns as ``text``/``tool_use`` blocks, results as
``tool_result`` blocks in a user turn), MCP tools become ``tools`` with vendor-safe names, and the
event stream (``message_start``, ``content_block_*``, ``message_delta``, ``error``) becomes ``Delta``s.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from haip_runtime.config.providers import AnthropicLlmConfig
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

#: The Messages API requires ``max_tokens``.
DEFAULT_MAX_TOKENS = 1024
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def messages_request(
    config: AnthropicLlmConfig,
    history: Sequence[HistoryEntry],
    tools: Sequence[ToolLike],
    instructions: str | None,
    names: ToolNames,
) -> dict[str, Any]:
    """The body of ``POST /v1/messages`` (streaming)."""
    messages: list[dict[str, Any]] = []
    for exchange in conversation(history):
        if isinstance(exchange, UserText):
            messages.append({"role": "user", "content": exchange.text})
        elif isinstance(exchange, AgentText):
            blocks: list[dict[str, Any]] = [{"type": "text", "text": exchange.text}] if exchange.text else []
            blocks += [
                {"type": "tool_use", "id": cid, "name": names.vendor(name), "input": args}
                for cid, name, args in exchange.calls
            ]
            messages.append({"role": "assistant", "content": blocks})
        elif isinstance(exchange, ToolResults):
            results = [
                {"type": "tool_result", "tool_use_id": cid, "content": text or "(no output)", "is_error": failed}
                for cid, text, failed in exchange.results
            ]
            messages.append({"role": "user", "content": results})
    if messages and messages[0]["role"] == "assistant":  # the API wants a user turn first (e.g. after a greeting)
        messages.insert(0, {"role": "user", "content": "(the conversation starts)"})
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": messages,
        "stream": True,
    }
    if instructions:
        body["system"] = instructions
    if tools:
        body["tools"] = [
            {
                "name": names.vendor(tool.name),
                "description": tool.description,
                "input_schema": tool.input_schema or {"type": "object"},
            }
            for tool in tools
        ]
    for key in ("temperature", "top_p"):
        value = getattr(config, key)
        if value is not None:
            body[key] = value
    return body


class EventReader:
    """Reads Messages API stream events into ``Delta``s; a tool call comes out whole at its block's end."""

    def __init__(self, names: ToolNames, http: HttpStreamer) -> None:
        self._names = names
        self._http = http
        self._blocks: dict[int, dict[str, str]] = {}
        self._input_tokens = 0
        self._stop: str | None = None
        self._ended = False

    def feed(self, kind: str, data: dict[str, Any]) -> Iterator[Delta]:
        kind = str(data.get("type", kind))
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self._input_tokens = int(usage.get("input_tokens") or 0)
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                self._blocks[int(data["index"])] = {
                    "id": str(block.get("id")),
                    "name": str(block.get("name")),
                    "json": "",
                }
        elif kind == "content_block_delta":
            yield from self._delta(int(data.get("index", 0)), data.get("delta") or {})
        elif kind == "content_block_stop":
            block = self._blocks.pop(int(data.get("index", 0)), None)
            if block is not None:
                name = self._names.original(block["name"])
                yield Delta(tool_call=ToolCall(block["id"], name, parse_arguments(block["json"]), block["json"]))
        elif kind == "message_delta":
            stop = (data.get("delta") or {}).get("stop_reason")
            self._stop = _STOP_REASONS.get(stop, stop) if stop else self._stop
            output = int((data.get("usage") or {}).get("output_tokens") or 0)
            yield Delta(usage=Usage(self._input_tokens, output))
        elif kind == "message_stop":
            self._ended = True
        elif kind == "error":
            error = data.get("error") or {}
            said = self._http.scrub(str(error.get("message", "unknown error")))
            if error.get("type") == "overloaded_error":
                raise LlmError(LlmErrorCode.LLM_UNAVAILABLE, f"{self._http.vendor} is overloaded: {said}")
            raise self._http.request_error(said)

    def _delta(self, index: int, delta: dict[str, Any]) -> Iterator[Delta]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            yield Delta(text=str(delta["text"]))
        elif delta.get("type") == "input_json_delta" and index in self._blocks:
            self._blocks[index]["json"] += str(delta.get("partial_json", ""))

    def finish(self) -> Iterator[Delta]:
        if not self._ended:
            raise LlmError(
                LlmErrorCode.LLM_STREAM_BROKEN, f"the answer from {self._http.vendor} ended before message_stop"
            )
        yield Delta(stop_reason=self._stop or "stop")


class AnthropicProvider(Provider):
    """Streams messages from the Anthropic API."""

    def __init__(self, id: str, config: AnthropicLlmConfig) -> None:
        self.id = id
        self.model = config.model
        self.config = config
        key = config.api_key.get_secret_value() if config.api_key else ""
        headers = {"anthropic-version": config.anthropic_version}
        if key:
            headers["x-api-key"] = key
        self._http = HttpStreamer(f"llm {id!r}", config.base_url, headers, config, key)

    async def stream(
        self,
        history: Sequence[HistoryEntry],
        *,
        tools: Sequence[ToolLike] = (),
        instructions: str | None = None,
    ) -> AsyncGenerator[Delta, None]:
        names = ToolNames(tool.name for tool in tools)
        body = messages_request(self.config, history, tools, instructions, names)
        response = await self._http.open_stream("/v1/messages", body, self.model)
        reader = EventReader(names, self._http)
        async for kind, data in events(self._http, response):
            for delta in reader.feed(kind, data):
                yield delta
        for delta in reader.finish():
            yield delta

    async def aclose(self) -> None:
        await self._http.aclose()
