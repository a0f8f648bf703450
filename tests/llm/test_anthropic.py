"""The Anthropic provider against a local server speaking the Messages API streaming format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from haip_runtime import HistoryEntry, LlmError, LlmErrorCode, ToolSpec
from haip_runtime.config.providers import AnthropicLlmConfig
from haip_runtime.llm import ToolCall, Usage
from haip_runtime.llm.anthropic import AnthropicProvider
from tests.support.vendor import (
    Reply,
    VendorServer,
    anthropic_error,
    anthropic_events,
    anthropic_stream_error,
    vendor_server,
)

pytestmark = pytest.mark.anyio

KEY = "sk-ant-test-secret"
ADD = ToolSpec("demo.add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "number"}}})


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


def provider(url: str, **options: Any) -> AnthropicProvider:
    settings: dict[str, Any] = {"retry_backoff_seconds": 0, "max_retries": 1, "timeout_seconds": 5, **options}
    return AnthropicProvider(
        "claude", AnthropicLlmConfig(kind="anthropic", base_url=url, api_key=KEY, model="claude-test", **settings)
    )


async def run(vendor: VendorServer, *replies: Reply, history: list[HistoryEntry] | None = None) -> Any:
    vendor.script(*replies)
    llm = provider(vendor.url)
    try:
        return await llm.complete(
            history or [HistoryEntry("user", "alice", "hi", "m1")], tools=[ADD], instructions="Be brief."
        )
    finally:
        await llm.aclose()


async def failure(vendor: VendorServer, *replies: Reply) -> LlmError:
    with pytest.raises(LlmError) as caught:
        await run(vendor, *replies)
    assert KEY not in caught.value.message
    return caught.value


async def test_text_and_a_tool_use_stream_with_usage_and_the_request_is_well_formed(vendor: VendorServer) -> None:
    blocks = ({"text": "Adding now."}, {"tool": "demo_add", "id": "toolu_1", "json": '{"a": 2, "b": 3}'})
    reply = await run(vendor, Reply(anthropic_events(*blocks, stop="tool_use", usage=(15, 7))))
    assert reply.text == "Adding now. "
    assert reply.tool_calls == (ToolCall("toolu_1", "demo.add", {"a": 2, "b": 3}, '{"a": 2, "b": 3}'),)
    assert reply.usage == Usage(15, 7) and reply.stop_reason == "tool_calls"
    (request,) = vendor.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY and request.headers["anthropic-version"] == "2023-06-01"
    assert request.body == {
        "model": "claude-test",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "system": "Be brief.",
        "tools": [{"name": "demo_add", "description": "Add two numbers.", "input_schema": ADD.input_schema}],
    }


async def test_history_becomes_tool_use_and_tool_result_blocks(vendor: VendorServer) -> None:
    history = [
        HistoryEntry("agent", "assistant", "Hello! Ask me anything.", "g1"),  # a greeting before any user turn
        HistoryEntry("user", "alice", "add 2 and 3", "m1"),
        HistoryEntry("tool_call", "assistant", "", "c1", call_id="c1", tool="demo.add", arguments={"a": 2, "b": 3}),
        HistoryEntry(
            "tool_result", "demo.add", "TOOL_ERROR: boom", "c1", call_id="c1", tool="demo.add", status="ERROR"
        ),
    ]
    await run(vendor, Reply(anthropic_events({"text": "It failed."})), history=history)
    assert vendor.requests[0].body["messages"] == [
        {"role": "user", "content": "(the conversation starts)"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello! Ask me anything."}]},
        {"role": "user", "content": "add 2 and 3"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c1", "name": "demo_add", "input": {"a": 2, "b": 3}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "TOOL_ERROR: boom", "is_error": True}],
        },
    ]


async def test_overloaded_then_success_is_retried(vendor: VendorServer) -> None:
    reply = await run(
        vendor, anthropic_error(529, "overloaded_error", "Overloaded"), Reply(anthropic_events({"text": "ok"}))
    )
    assert reply.text == "ok " and len(vendor.requests) == 2


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (anthropic_error(401, "authentication_error", "invalid x-api-key"), LlmErrorCode.LLM_AUTH_FAILED),
        (anthropic_error(404, "not_found_error", "model: claude-test"), LlmErrorCode.LLM_MODEL_NOT_FOUND),
        (
            anthropic_error(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
            LlmErrorCode.LLM_CONTEXT_TOO_LONG,
        ),
    ],
)
async def test_vendor_errors_become_readable_coded_errors(vendor: VendorServer, reply: Reply, code: str) -> None:
    error = await failure(vendor, reply)
    assert error.code == code and (reply.error or {})["error"]["message"] in error.message


async def test_an_error_event_mid_stream_is_reported(vendor: VendorServer) -> None:
    events = anthropic_events({"text": "partial answer"})[:3] + [
        anthropic_stream_error("overloaded_error", "Overloaded")
    ]
    error = await failure(vendor, Reply(events))
    assert error.code == LlmErrorCode.LLM_UNAVAILABLE and "Overloaded" in error.message


async def test_a_dropped_stream_is_a_broken_stream_error(vendor: VendorServer) -> None:
    error = await failure(vendor, Reply(anthropic_events({"text": "partial answer"})[:4], drop=True))
    assert error.code == LlmErrorCode.LLM_STREAM_BROKEN


async def test_a_stream_that_ends_before_message_stop_is_broken(vendor: VendorServer) -> None:
    error = await failure(vendor, Reply(anthropic_events({"text": "partial answer"})[:4]))
    assert error.code == LlmErrorCode.LLM_STREAM_BROKEN and "message_stop" in error.message
