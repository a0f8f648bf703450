"""The OpenAI-compatible provider against a local server speaking the chat completions streaming format."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from haip_runtime import HistoryEntry, LlmError, LlmErrorCode, ToolSpec
from haip_runtime.config.providers import OpenAiLlmConfig
from haip_runtime.llm import Reply as LlmReply
from haip_runtime.llm import ToolCall, Usage
from haip_runtime.llm.openai import OpenAiProvider
from tests.support.vendor import (
    Reply,
    VendorServer,
    openai_chunk,
    openai_error,
    openai_text,
    openai_tool_call,
    vendor_server,
)

pytestmark = pytest.mark.anyio

KEY = "sk-test-very-secret-key"
ADD = ToolSpec("demo.add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "number"}}})


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


def provider(url: str, **options: Any) -> OpenAiProvider:
    settings: dict[str, Any] = {"retry_backoff_seconds": 0, "max_retries": 2, "timeout_seconds": 5, **options}
    return OpenAiProvider(
        "gpt", OpenAiLlmConfig(kind="openai", base_url=url, api_key=KEY, model="gpt-test", **settings)
    )


def user(text: str) -> HistoryEntry:
    return HistoryEntry("user", "alice", text, "m1")


async def complete(vendor: VendorServer, *replies: Reply, **kwargs: Any) -> LlmReply:
    vendor.script(*replies)
    llm = provider(vendor.url + "/v1")
    try:
        return await llm.complete([user("hi")], **kwargs)
    finally:
        await llm.aclose()


async def failure(vendor: VendorServer, *replies: Reply, url: str | None = None) -> LlmError:
    vendor.script(*replies)
    llm = provider(url or vendor.url + "/v1")
    try:
        with pytest.raises(LlmError) as caught:
            await llm.complete([user("hi")])
    finally:
        await llm.aclose()
    assert KEY not in caught.value.message
    return caught.value


async def test_text_streams_in_parts_with_usage_and_the_request_is_well_formed(vendor: VendorServer) -> None:
    vendor.script(Reply(openai_text("Hel", "lo", "!", usage=(12, 3))))
    llm = provider(vendor.url + "/v1", temperature=0.2, max_tokens=50)
    deltas = [d async for d in llm.stream([user("hi")], instructions="Be brief.")]
    await llm.aclose()
    assert [d.text for d in deltas if d.text] == ["Hel", "lo", "!"]
    assert [d.usage for d in deltas if d.usage] == [Usage(12, 3)] and deltas[-1].stop_reason == "stop"
    (request,) = vendor.requests
    assert request.path == "/v1/chat/completions" and request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "temperature": 0.2,
    }


async def test_tool_call_fragments_are_joined_and_the_name_is_mapped_back(vendor: VendorServer) -> None:
    reply = await complete(vendor, Reply(openai_tool_call("demo_add", '{"a": 2, "b": 3}')), tools=[ADD])
    assert reply.tool_calls == (ToolCall("call_1", "demo.add", {"a": 2, "b": 3}, '{"a": 2, "b": 3}'),)
    assert reply.stop_reason == "tool_calls" and reply.usage == Usage(20, 9) and reply.text == ""
    sent = vendor.requests[0].body["tools"]
    assert sent == [
        {
            "type": "function",
            "function": {"name": "demo_add", "description": "Add two numbers.", "parameters": ADD.input_schema},
        }
    ]


async def test_invalid_tool_arguments_are_reported_not_raised(vendor: VendorServer) -> None:
    reply = await complete(vendor, Reply(openai_tool_call("demo_add", '{"a": 2,')), tools=[ADD])
    assert reply.tool_calls[0].arguments is None and reply.tool_calls[0].raw_arguments == '{"a": 2,'


async def test_history_with_tool_calls_becomes_assistant_and_tool_messages(vendor: VendorServer) -> None:
    vendor.script(Reply(openai_text("5")))
    history = [
        user("add 2 and 3"),
        HistoryEntry("agent", "assistant", "Let me add.", "m2"),
        HistoryEntry("tool_call", "assistant", "", "c1", call_id="c1", tool="demo.add", arguments={"a": 2, "b": 3}),
        HistoryEntry("tool_result", "demo.add", "5.0", "c1", call_id="c1", tool="demo.add", status="OK"),
        HistoryEntry("tool_call", "assistant", "", "c2", call_id="c2", tool="demo.gone", arguments={}),  # no result
    ]
    llm = provider(vendor.url + "/v1", stream_usage=False)
    await llm.complete(history, tools=[ADD])
    await llm.aclose()
    assert vendor.requests[0].body["messages"] == [
        {"role": "user", "content": "add 2 and 3"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "demo_add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5.0"},
    ]
    assert "stream_options" not in vendor.requests[0].body


async def test_rate_limited_then_success_is_retried(vendor: VendorServer) -> None:
    limited = openai_error(429, "Rate limit reached")
    limited.headers = {"retry-after": "0"}
    reply = await complete(vendor, limited, Reply(openai_text("ok")))
    assert reply.text == "ok" and len(vendor.requests) == 2


async def test_server_errors_past_the_retries_are_llm_unavailable(vendor: VendorServer) -> None:
    error = await failure(vendor, *[openai_error(503, "overloaded")] * 3)
    assert error.code == LlmErrorCode.LLM_UNAVAILABLE and "HTTP 503" in error.message and "overloaded" in error.message
    assert len(vendor.requests) == 3  # the first try and max_retries = 2


@pytest.mark.parametrize(
    ("reply", "code", "words"),
    [
        (openai_error(401, f"Incorrect API key provided: {KEY}"), LlmErrorCode.LLM_AUTH_FAILED, "refused the API key"),
        (
            openai_error(404, "The model `gpt-test` does not exist"),
            LlmErrorCode.LLM_MODEL_NOT_FOUND,
            "no model 'gpt-test'",
        ),
        (
            openai_error(400, "This model's maximum context length is 8192 tokens", "context_length_exceeded"),
            LlmErrorCode.LLM_CONTEXT_TOO_LONG,
            "too long",
        ),
        (openai_error(400, "temperature must be at most 2"), LlmErrorCode.LLM_BAD_REQUEST, "temperature must be"),
    ],
)
async def test_vendor_errors_become_readable_coded_errors(
    vendor: VendorServer, reply: Reply, code: str, words: str
) -> None:
    error = await failure(vendor, reply)
    assert error.code == code and words in error.message
    assert len(vendor.requests) == 1  # not retried


async def test_a_dropped_stream_is_a_broken_stream_error(vendor: VendorServer) -> None:
    cut = Reply(
        [openai_chunk({"role": "assistant", "content": ""}), openai_chunk({"content": "Half an ans"})], drop=True
    )
    error = await failure(vendor, cut)
    assert error.code == LlmErrorCode.LLM_STREAM_BROKEN and "cut off" in error.message


async def test_a_stream_without_a_finish_is_a_broken_stream_error(vendor: VendorServer) -> None:
    error = await failure(vendor, Reply([openai_chunk({"content": "Half"})]))
    assert error.code == LlmErrorCode.LLM_STREAM_BROKEN and "without a finish" in error.message


async def test_an_error_object_mid_stream_is_reported(vendor: VendorServer) -> None:
    error = await failure(
        vendor, Reply([openai_chunk({"content": "a"}), 'data: {"error": {"message": "model crashed"}}\n\n'])
    )
    assert error.code == LlmErrorCode.LLM_STREAM_BROKEN and "model crashed" in error.message


async def test_an_unreachable_endpoint_is_reported_after_retries(vendor: VendorServer) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    error = await failure(vendor, url=url)
    assert error.code == LlmErrorCode.LLM_UNREACHABLE and url in error.message


@pytest.mark.parametrize("started", [False, True])
async def test_a_silent_vendor_times_out(vendor: VendorServer, started: bool) -> None:
    vendor.script(*[Reply(openai_text("never")[:1] if started else [], stall=True)] * 2)
    llm = provider(vendor.url + "/v1", timeout_seconds=0.3, max_retries=1)
    try:
        with pytest.raises(LlmError) as caught:
            await llm.complete([user("hi")])
    finally:
        vendor.release()
        await llm.aclose()
    assert caught.value.code == LlmErrorCode.LLM_TIMEOUT
    assert ("mid-answer" in caught.value.message) == started
    assert len(vendor.requests) == (1 if started else 2)  # retried only before the answer started
