"""The built-in assistant: a full turn over a real server (LLM at the wire, demo MCP server as a subprocess),
and its tool loop, commands and limits in the harness with a scripted LLM."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from haip_runtime import LlmError, LlmErrorCode
from haip_runtime.agents.assistant import CUT_MARKER, AssistantAgent
from haip_runtime.client import HaipClient, Received
from haip_runtime.testing import AgentHarness, FakeToolError, ScriptedLLM
from tests.support.serving import LiveServer, live_server, make_config
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

KEY = "sk-assistant-test-key"
DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


@pytest.fixture(scope="module")
def runtime(vendor: VendorServer) -> Iterator[LiveServer]:
    gpt = {"kind": "openai", "base_url": vendor.url + "/v1", "api_key": KEY, "model": "gpt-test", "max_retries": 0}
    config = {
        "llm": {"gpt": gpt},
        "agents": {
            "assistant": {"plugin": "assistant", "llm": "gpt", "mcp_servers": ["demo"], "instructions": "Be brief."}
        },
        "mcp": {"servers": {"demo": DEMO}},
    }
    with live_server(make_config(config)) as live:
        yield live


async def start(client: HaipClient) -> str:
    tx = await client.start_transaction("assistant")
    await client.wait_for(
        lambda e: e.type == "TOOL_LIST" and any(t["name"] == "demo.slow_count" for t in e.get("tools"))
    )
    return tx


def of_type(events: list[Received], kind: str) -> list[Received]:
    return [e for e in events if e.type == kind]


async def test_a_full_turn_streams_calls_a_tool_with_progress_and_answers_with_its_result(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    arguments = json.dumps({"steps": 3, "delay": 0.05})
    first = [openai_chunk({"role": "assistant", "content": "Let me count."})]
    first += openai_tool_call("demo_slow_count", arguments, "call_9", usage=(50, 11))[1:]
    vendor.script(Reply(first), Reply(openai_text("I counted ", "to 3.", usage=(80, 6))))
    async with HaipClient(runtime.ws_url, token=runtime.token(), timeout=20) as client:
        tx = await start(client)
        await client.send_text(tx, "count to three")
        finished = await client.wait_for("RUN_FINISHED")
        run = [e for e in client.received if e.run_id == finished.run_id]
    assert finished.get("status") == "OK"
    kinds = [e.type for e in run if e.type != "TOOL_UPDATE"]
    assert kinds == [
        "RUN_STARTED",
        *["MESSAGE_START", "MESSAGE_PART", "MESSAGE_END"],
        *["TOOL_CALL", "TOOL_DONE"],
        *["MESSAGE_START", "MESSAGE_PART", "MESSAGE_PART", "MESSAGE_END"],
        "RUN_FINISHED",
    ]
    parts = [e.get("text") for e in of_type(run, "MESSAGE_PART")]
    assert parts == ["Let me count.", "I counted ", "to 3."]
    assert [e.get("tokens") for e in of_type(run, "MESSAGE_END")] == [11, 6]
    (call,) = of_type(run, "TOOL_CALL")
    assert call.get("tool") == "demo.slow_count" and call.get("caller") == "assistant"
    assert call.get("params") == {"steps": 3, "delay": 0.05}
    progress = [e.get("progress") for e in of_type(run, "TOOL_UPDATE") if e.get("progress") is not None]
    assert progress and progress[-1] == 3
    assert of_type(run, "TOOL_DONE")[0].get("status") == "OK"
    # the model's second request carried the call and its result, under the id of the HAIP call
    second = vendor.requests[1].body
    assert second["messages"][0] == {"role": "system", "content": "Be brief."}
    assistant, result = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"] == {"name": "demo_slow_count", "arguments": arguments}
    assert assistant["tool_calls"][0]["id"] == call.get("call_id")
    assert result == {"role": "tool", "tool_call_id": call.get("call_id"), "content": "counted to 3"}
    assert "demo_slow_count" in {tool["function"]["name"] for tool in second["tools"]}


async def test_a_refused_key_ends_the_run_with_a_readable_error_and_no_key(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    vendor.script(openai_error(401, f"Incorrect API key provided: {KEY}"))
    async with HaipClient(runtime.ws_url, token=runtime.token(), timeout=20) as client:
        tx = await start(client)
        await client.send_text(tx, "hello")
        error = await client.wait_for("RUN_ERROR")
        await client.send_text(tx, "/tools")  # the transaction goes on; commands need no LLM
        listing = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and "demo.add" in e.get("text", ""))
        frames = json.dumps([e.payload for e in client.received])
    assert error.get("code") == LlmErrorCode.LLM_AUTH_FAILED
    assert "refused the API key (HTTP 401)" in error.get("message") and KEY not in frames
    assert "- demo.add: Add two numbers." in listing.get("text")


# --- in the harness, with a scripted LLM ----------------------------------------------------------


def add(arguments: dict[str, Any]) -> float:
    """Add two numbers."""
    if "a" not in arguments:
        raise FakeToolError("a is required")
    return float(arguments["a"]) + float(arguments["b"])


async def test_the_tool_loop_feeds_results_back_and_stops_at_the_step_limit() -> None:
    llm = ScriptedLLM([ScriptedLLM.call("demo.add", {"a": 2, "b": 3})] * 2)
    async with AgentHarness(AssistantAgent, tools={"demo.add": add}, llm=llm, options={"max_steps": 2}) as agent:
        turn = await agent.send("add twice")
    assert turn.status == "OK" and [r["status"] for r in turn.tool_results] == ["OK", "OK"]
    assert turn.text == "(I stopped after 2 model requests without a final answer.)"
    seen = llm.requests[1].history
    assert [e.role for e in seen] == ["user", "tool_call", "tool_result"] and seen[-1].text == "5.0"
    assert llm.requests[0].tools == ("demo.add",)


async def test_invalid_arguments_are_told_to_the_model_without_a_call() -> None:
    bad = ScriptedLLM.call("demo.add")
    bad = type(bad)(bad.id, bad.name, None, "{oops")
    llm = ScriptedLLM([bad, "Sorry, I could not add."])
    async with AgentHarness(AssistantAgent, tools={"demo.add": add}, llm=llm) as agent:
        turn = await agent.send("add")
    assert turn.tool_calls == [] and turn.text == "Sorry, I could not add."
    result = llm.requests[1].history[-1]
    assert result.role == "tool_result" and result.status == "ERROR" and "INVALID_ARGUMENTS" in result.text


async def test_commands_work_without_an_llm_and_chat_without_one_is_a_clear_error() -> None:
    async with AgentHarness(AssistantAgent, tools={"demo.add": add}) as agent:
        listing = await agent.send("/tools")
        called = await agent.send('/call add {"a": 1, "b": 1}')
        chat = await agent.send("hello")
    assert listing.text == "- demo.add: Add two numbers."
    assert called.text == "demo.add returned: 2.0"
    assert chat.status == "ERROR" and chat.error is not None
    assert chat.error["code"] == LlmErrorCode.LLM_NOT_CONFIGURED and "agents.assistant.llm" in chat.error["message"]


async def test_an_llm_error_reaches_the_user_as_run_error_with_its_code() -> None:
    llm = ScriptedLLM([LlmError(LlmErrorCode.LLM_CONTEXT_TOO_LONG, "the conversation is too long for the model")])
    async with AgentHarness(AssistantAgent, llm=llm, instructions="Be terse.") as agent:
        turn = await agent.send("hi")
    assert turn.error == {
        "run_id": turn.events[0].run_id,
        "code": "LLM_CONTEXT_TOO_LONG",
        "message": "the conversation is too long for the model",
    }
    assert llm.requests[0].instructions == "Be terse."


async def test_a_refused_approval_is_told_to_the_model_as_the_tool_result() -> None:
    llm = ScriptedLLM([ScriptedLLM.call("demo.add", {"a": 1, "b": 2}), "Fine, I will not add."])
    harness = AgentHarness(
        AssistantAgent, tools={"demo.add": add}, llm=llm, require_approval=["demo.add"], approve=False
    )
    async with harness as agent:
        turn = await agent.send("add please")
    assert turn.tool_results[0]["status"] == "CANCELLED" and turn.text == "Fine, I will not add."
    result = llm.requests[1].history[-1]
    assert result.status == "CANCELLED" and result.text == "REJECTED: rejected by tester: harness"


async def test_an_answer_cut_at_max_tokens_says_so_and_its_end_carries_the_stop_reason(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    cut = openai_text("A creature ", "of", usage=(30, 2))
    cut[-3] = openai_chunk({}, "length")  # the finish: the model ran out of max_tokens
    vendor.script(Reply(cut))
    async with HaipClient(runtime.ws_url, token=runtime.token(), timeout=20) as client:
        tx = await start(client)
        await client.send_text(tx, "describe a dragon")
        finished = await client.wait_for("RUN_FINISHED")
        run = [e for e in client.received if e.run_id == finished.run_id]
    text = "".join(str(e.get("text")) for e in of_type(run, "MESSAGE_PART"))
    assert text == "A creature of" + CUT_MARKER
    (end,) = of_type(run, "MESSAGE_END")
    assert end.get("stop_reason") == "length" and end.get("tokens") == 2


async def test_a_whole_answer_ends_with_stop_and_no_marker() -> None:
    async with AgentHarness(AssistantAgent, llm=ScriptedLLM(["All done."])) as agent:
        turn = await agent.send("hi")
    assert turn.text == "All done."
    (end,) = [e for e in turn.events if e.type == "MESSAGE_END"]
    assert end.payload["stop_reason"] == "stop"  # type: ignore[index]
