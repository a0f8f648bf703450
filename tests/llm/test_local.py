"""The embedded local model (SmolLM2-135M through xllamacpp, installed by scripts/setup): load, stream, cancel."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

from haip_runtime import HistoryEntry, LlmError, LlmErrorCode
from haip_runtime.agents.assistant import CUT_MARKER, AssistantAgent
from haip_runtime.config.providers import LocalLlmConfig
from haip_runtime.llm.local import LocalProvider, default_model_path
from haip_runtime.testing import AgentHarness

pytestmark = pytest.mark.anyio

HELLO = [HistoryEntry("user", "alice", "Say hello.", "m1")]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[LocalProvider]:
    llm = LocalProvider(
        "local", LocalLlmConfig(kind="local", max_tokens=8, temperature=0, context_tokens=512, threads=2)
    )
    yield llm
    await llm.aclose()


def generating() -> bool:
    return any(thread.name == "llm-local" for thread in threading.enumerate())


async def test_the_default_model_is_installed() -> None:
    path = default_model_path()
    assert path is not None and path.is_file() and path.suffix == ".gguf"


async def test_the_local_model_streams_a_short_reply_with_usage(local: LocalProvider) -> None:
    with anyio.fail_after(60):
        reply = await local.complete(HELLO, instructions="You are friendly.")
    assert reply.text.strip() and reply.tool_calls == ()
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8
    assert reply.stop_reason in ("stop", "length")


async def test_leaving_the_stream_stops_generation(local: LocalProvider) -> None:
    long = [HistoryEntry("user", "alice", "Write a long story about a dragon.", "m1")]
    config = LocalLlmConfig(kind="local", max_tokens=400, context_tokens=512, threads=2)
    llm = LocalProvider("local", config)
    llm._server = await _loaded(local)  # share the loaded model
    with anyio.fail_after(60):
        async with aclosing(llm.stream(long)) as deltas:
            async for delta in deltas:
                if delta.text:
                    assert generating()  # the first words arrive while the model is still writing
                    break
        assert not generating()  # leaving the stream waited for llama.cpp to stop
        reply = await local.complete(HELLO)  # and the model is free for the next answer
    assert reply.text.strip()


async def test_a_cancelled_turn_stops_generating(local: LocalProvider) -> None:
    got_text = anyio.Event()

    async def listen() -> None:
        async for delta in local.stream([HistoryEntry("user", "a", "Tell me a story.", "m")]):
            if delta.text:
                got_text.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await got_text.wait()
            tg.cancel_scope.cancel()
    assert not generating()


async def test_the_assistant_answers_with_the_local_model(local: LocalProvider) -> None:
    async with AgentHarness(AssistantAgent, llm=local, instructions="Answer in a few words.") as agent:
        turn = await agent.send("hello there", timeout=60)
    assert turn.status == "OK" and turn.text.strip()
    (end,) = [e for e in turn.events if e.type == "MESSAGE_END"]
    assert isinstance(end.payload, dict) and 0 < end.payload["tokens"] <= 8


async def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    llm = LocalProvider("local", LocalLlmConfig(kind="local", model_path=tmp_path / "nope.gguf"))
    with pytest.raises(LlmError) as caught:
        await llm.complete(HELLO)
    assert caught.value.code == LlmErrorCode.LLM_MODEL_NOT_FOUND and "nope.gguf" in caught.value.message


async def _loaded(llm: LocalProvider) -> object:
    await llm.load()
    return llm._server


async def test_an_offline_answer_cut_at_max_tokens_ends_with_the_marker(local: LocalProvider) -> None:
    async with AgentHarness(AssistantAgent, llm=local) as agent:
        turn = await agent.send("Write a long story about a dragon.", timeout=60)
    (end,) = [e for e in turn.events if e.type == "MESSAGE_END"]
    assert isinstance(end.payload, dict) and end.payload["stop_reason"] == "length" and end.payload["tokens"] == 8
    assert turn.text.endswith(CUT_MARKER) and len(turn.text) > len(CUT_MARKER)
