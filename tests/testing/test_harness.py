"""The in-memory agent harness, as a plugin author uses it."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from haip_runtime import Agent, NoOptions, Turn
from haip_runtime.demo.storyteller import Storyteller
from haip_runtime.exceptions import ProtocolError
from haip_runtime.testing import AgentHarness, FakeToolContext, FakeToolError
from tests.support.agents import FailingAgent, GreeterAgent, WaitingAgent

pytestmark = pytest.mark.anyio


class Helpdesk(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        found = await turn.call_tool("tickets.search", {"q": turn.text})
        if not found.ok:
            await turn.say(f"search failed: {found.text}")
            return
        closed = await turn.call_tool("tickets.close", {"id": found.structured_content["id"]})  # type: ignore[index]
        await turn.say(f"ticket {found.structured_content['id']}: {closed.status}")  # type: ignore[index]


def search(arguments: dict[str, Any]) -> dict[str, Any]:
    """Find a ticket."""
    if arguments["q"] == "nothing":
        raise FakeToolError("no such ticket")
    return {"id": 42}


async def close(arguments: dict[str, Any]) -> str:
    await anyio.lowlevel.checkpoint()
    return f"closed {arguments['id']}"


TOOLS = {"tickets.search": search, "tickets.close": close}


async def test_streaming_plugin_turn_is_recorded_in_order() -> None:
    async with AgentHarness(Storyteller, options={"words_per_second": 10_000}) as agent:
        turn = await agent.send("a dragon")
    assert turn.status == "OK"
    assert turn.messages == [turn.text] and turn.text.startswith("Once upon a time, someone said 'a dragon'.")
    kinds = [e.type for e in turn.events]
    assert kinds[0] == "RUN_STARTED" and kinds[1] == "MESSAGE_START" and kinds[-2:] == ["MESSAGE_END", "RUN_FINISHED"]


async def test_fake_tools_are_called_through_the_real_proxy() -> None:
    async with AgentHarness(Helpdesk, tools=TOOLS, require_approval=["tickets.close"]) as agent:
        turn = await agent.send("printer on fire")
    assert turn.text == "ticket 42: OK"
    assert [call["tool"] for call in turn.tool_calls] == ["tickets.search", "tickets.close"]
    assert turn.tool_results[0]["result"]["structuredContent"] == {"id": 42}
    statuses = [e.payload.get("status") for e in turn.events if e.type == "TOOL_UPDATE"]  # type: ignore[union-attr]
    assert "AWAITING_APPROVAL" in statuses


async def test_refused_approval_and_failing_tools_are_values() -> None:
    async with AgentHarness(Helpdesk, tools=TOOLS, require_approval=["tickets.*"], approve=False) as agent:
        refused = await agent.send("printer on fire")
    async with AgentHarness(Helpdesk, tools=TOOLS) as agent:
        failed = await agent.send("nothing")
    assert refused.text == "search failed: rejected by tester: harness"
    assert failed.text == "search failed: no such ticket" and failed.tool_results[0]["status"] == "ERROR"


async def test_greeting_history_and_errors() -> None:
    async with AgentHarness(GreeterAgent, user="dana", params={"topic": "tea"}) as agent:
        assert agent.greeting is not None and agent.greeting.text == "hello dana, params=['topic']"
        turn = await agent.send("hi")
    async with AgentHarness(FailingAgent) as failing:
        broken = await failing.send("break")
    assert turn.text == "agent:hello dana, params=['topic'] | user:hi"
    assert broken.status == "ERROR" and broken.error is not None and "ValueError" in broken.error["message"]


async def test_a_turn_that_does_not_end_times_out() -> None:
    async with AgentHarness(WaitingAgent) as agent:
        with pytest.raises(TimeoutError):
            await agent.send("think", timeout=0.05)


def test_fake_tool_names_need_a_server() -> None:
    with pytest.raises(ValueError, match="'server.tool'"):
        AgentHarness(Helpdesk, tools={"search": search})


async def test_fake_tool_results_are_what_the_real_mcp_server_returns() -> None:
    # The demo server's own functions, once as fake tools and once behind the real MCP server (in-process).
    from mcp import Client

    import haip_runtime.demo.mcp_server as demo

    async def stats(arguments: dict[str, Any]) -> Any:
        return {"calls": 1, "cancelled": 0}

    fakes = {
        "demo.add": lambda args: demo.add(float(args["a"]), float(args["b"])),
        "demo.pid": lambda args: 4242,
        "demo.stats": stats,
        "demo.slow_count": lambda args: f"counted to {args['steps']}",
    }
    calls = {"add": {"a": 2, "b": 3}, "pid": {}, "stats": {}, "slow_count": {"steps": 1, "delay": 0}}

    class CallsAll(Agent[NoOptions]):
        async def on_message(self, turn: Turn) -> None:
            for tool, arguments in calls.items():
                await turn.call_tool(f"demo.{tool}", arguments)

    async with AgentHarness(CallsAll, tools=fakes) as agent:
        turn = await agent.send("go")
    faked = {r["call_id"]: r["result"] for r in turn.tool_results}
    by_tool = {c["tool"].partition(".")[2]: faked[c["call_id"]] for c in turn.tool_calls}
    assert by_tool["add"]["content"] == [{"type": "text", "text": "5.0"}]  # not '{"result": 5.0}'
    demo.STATS.calls = 1
    async with Client(demo.server) as client:
        for tool, arguments in calls.items():
            real = await client.call_tool(tool, arguments)
            expected = {
                "content": real.model_dump(by_alias=True, mode="json", exclude_none=True)["content"],
                "structuredContent": real.structured_content,
            }
            if tool == "pid":
                expected["content"][0]["text"], expected["structuredContent"] = "4242", {"result": 4242}
            if tool == "stats":
                expected["structuredContent"] = {"calls": 1, "cancelled": 0}
                expected["content"][0]["text"] = '{\n  "calls": 1,\n  "cancelled": 0\n}'
            assert by_tool[tool] == expected, tool


async def test_what_json_cannot_hold_and_a_crash_come_back_as_from_the_real_mcp_server() -> None:
    """An author's find: a fake returning a datetime and a set failed the turn (``ExceptionGroup``) where a
    real server gives them JSON forms, and a fake's plain exception showed its text where a real server
    hides it. Both are now as the real ``MCPServer`` answers (the harness logs the crash)."""
    import datetime

    from mcp import Client
    from mcp.server.mcpserver import MCPServer

    def when() -> dict[str, Any]:
        return {"at": datetime.datetime(2020, 1, 2, 3, 4, 5), "tags": {"x"}, "days": (1, 2)}

    def boom() -> str:
        raise ValueError("a secret in the message")

    real = MCPServer("real")
    real.tool()(when)
    real.tool()(boom)

    class CallsBoth(Agent[NoOptions]):
        async def on_message(self, turn: Turn) -> None:
            for tool in ("when", "boom"):
                await turn.call_tool(f"real.{tool}")

    fakes = {"real.when": lambda args: when(), "real.boom": lambda args: boom()}
    async with AgentHarness(CallsBoth, tools=fakes) as agent:
        turn = await agent.send("go")
    assert turn.error is None
    results = {c["tool"]: r for c, r in zip(turn.tool_calls, turn.tool_results, strict=True)}
    async with Client(real) as client:
        for tool in ("when", "boom"):
            answer = await client.call_tool(tool, {})
            done = results[f"real.{tool}"]
            assert done["result"]["content"] == answer.model_dump(mode="json", exclude_none=True)["content"], tool
            assert (done["status"] == "ERROR") is answer.is_error, tool
    assert "secret" not in str(results["real.boom"])


async def slow_survey(arguments: dict[str, Any], ctx: FakeToolContext) -> str:
    for step in (1, 2):
        await ctx.report_progress(step, 2, f"step {step}")
    answer = await ctx.elicit("Your name?", {"type": "object", "properties": {"name": {"type": "string"}}})
    return "declined" if answer is None else f"hello {answer['name']}"


class Surveyor(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        result = await turn.call_tool("forms.survey")
        await turn.say(result.text)


@pytest.mark.parametrize(("user_input", "said"), [({"name": "Ada"}, "hello Ada"), (None, "declined")])
async def test_fake_tools_report_progress_and_ask_the_user(user_input: dict[str, str] | None, said: str) -> None:
    async with AgentHarness(Surveyor, tools={"forms.survey": slow_survey}, user_input=user_input) as agent:
        turn = await agent.send("go")
    assert turn.text == said
    updates = [e.payload for e in turn.events if e.type == "TOOL_UPDATE"]
    statuses = [u.get("status") for u in updates]  # type: ignore[union-attr]
    assert "INPUT_REQUIRED" in statuses
    assert [u.get("progress") for u in updates if u.get("progress") is not None][-1] == 2  # type: ignore[union-attr]


async def test_the_harness_answers_messages_sent_at_once_each_in_its_turn() -> None:
    """The session's run limit is the hub's policy; a plugin author's harness has none. The agent's own
    (``concurrent_turns``, one) holds: each message waits its turn, and is answered, in order."""
    results: list[str] = []
    async with AgentHarness(Storyteller, options={"words_per_second": 10_000}) as agent:

        async def send(number: int) -> None:
            results.append((await agent.send(f"story {number}")).text.split("'")[1])

        async with anyio.create_task_group() as tg:
            for number in range(6):
                tg.start_soon(send, number)
    assert results == [f"story {number}" for number in range(6)]


class SaysANumber(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        await turn.say(12345)  # type: ignore[arg-type]


async def test_an_agent_saying_something_that_is_not_text_fails_before_anything_is_sent() -> None:
    """A tester's find: members got MESSAGE_PART {"text": 12345} (and the store kept it) before the
    TypeError; now nothing goes out but the run's error (the log has the TypeError's words)."""
    async with AgentHarness(SaysANumber) as agent:
        turn = await agent.send("hi")
    assert [e.type for e in turn.events] == ["RUN_STARTED", "RUN_ERROR"]
    assert turn.error is not None and turn.error["message"] == (
        "agent 'saysanumber' failed: TypeError (the server's log has its traceback)"
    )


async def test_the_harness_checks_a_message_against_the_agents_input_schema_as_the_server_does() -> None:
    """An author's tester: the harness let any payload through, so a test passed that the server refused."""
    from haip_runtime.exceptions import ProtocolError
    from tests.support.agents import CalculatorAgent

    async with AgentHarness(CalculatorAgent) as agent:
        turn = await agent.send({"a": 2, "b": 40})
        with pytest.raises(ProtocolError) as refused:
            await agent.send({"a": "x", "b": 1})
    assert turn.text == "2 + 40 = 42"
    assert refused.value.code == "INVALID_PAYLOAD" and refused.value.detail == {"where": "/payload/a"}


async def test_arguments_json_cannot_hold_fail_the_call_before_members_see_it(caplog: pytest.LogCaptureFixture) -> None:
    """An author's find: ``call_tool`` with an ``object()`` among its arguments failed deep in the log's
    keeping, after its TOOL_CALL had taken a tseq that was never stored (a gap in the history)."""

    class Careless(Agent[NoOptions]):
        async def on_message(self, turn: Turn) -> None:
            await turn.call_tool("t.crunch", {"steps": object()})

    async with AgentHarness(Careless, tools={"t.crunch": lambda args: 1}) as agent:
        turn = await agent.send("go")
    assert turn.error is not None and turn.error["code"] == "INTERNAL_ERROR"
    assert [event.type for event in turn.events] == ["RUN_STARTED", "RUN_ERROR"]
    numbers = [event.tseq or 0 for event in turn.events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert "call_tool('t.crunch'): the arguments must be what JSON holds" in caplog.text  # (the traceback's)


@pytest.mark.parametrize("pattern", ["*", "close", "tickets.close", "*.close", "tickets.*"])
async def test_approval_patterns_match_as_haip_toml_s_do(pattern: str) -> None:
    """An agent author's find: patterns copied from haip.toml (a tool's own name, ``*``) were dropped, and
    the tool ran without approval while the test passed."""
    async with AgentHarness(Helpdesk, tools=TOOLS, require_approval=[pattern], approve=False) as agent:
        turn = await agent.send("printer on fire")
    statuses = [e.payload.get("status") for e in turn.events if e.type == "TOOL_UPDATE"]  # type: ignore[union-attr]
    assert "AWAITING_APPROVAL" in statuses
    assert turn.text in ("search failed: rejected by tester: harness", "ticket 42: CANCELLED")  # (which one asked)


def test_an_approval_pattern_that_matches_no_fake_tool_is_refused() -> None:
    with pytest.raises(ValueError, match=r"require_approval pattern 'tickets\.clsoe' matches none of the fake tools"):
        AgentHarness(Helpdesk, tools=TOOLS, require_approval=["tickets.clsoe"])


async def test_an_input_the_request_refuses_fails_the_send_at_once_saying_why() -> None:
    """An agent author's find: a ``user_input`` that did not fit the request's schema waited out the 30 s
    timeout and raised a bare TimeoutError; the reason was only in the log."""
    async with AgentHarness(Surveyor, tools={"forms.survey": strict_survey}, user_input={"nom": "Ada"}) as agent:
        with anyio.fail_after(10), pytest.raises(ProtocolError, match="refused its answer to forms.survey.*'name'"):
            await agent.send("go")
        assert agent.greeting is None  # (no on_start: the attribute is there, None)


async def strict_survey(arguments: dict[str, Any], ctx: FakeToolContext) -> str:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    answer = await ctx.elicit("Your name?", schema)
    return "declined" if answer is None else f"hello {answer['name']}"


class LateWriter(Agent[NoOptions]):
    """Writes to its stream after the block, and leaves a task that speaks after the turn."""

    failures: list[BaseException] = []
    turn_over = asyncio.Event()
    spoke_late = asyncio.Event()

    async def on_message(self, turn: Turn) -> None:
        async with turn.stream() as out:
            await out.write("a")
        try:
            await out.write("after the end")
        except RuntimeError as error:
            LateWriter.failures.append(error)
        with pytest.raises(TypeError, match="whole number"):
            out.tokens = "many"  # type: ignore[assignment]
        self.context_task = asyncio.ensure_future(self._later(turn))

    async def _later(self, turn: Turn) -> None:
        await LateWriter.turn_over.wait()
        try:
            await turn.say("too late")
        except RuntimeError as error:
            LateWriter.failures.append(error)
        finally:
            LateWriter.spoke_late.set()


async def test_nothing_an_agent_sends_after_its_message_or_its_turn_ended_goes_out() -> None:
    """An agent author's finds: a write after the stream's block went out after MESSAGE_END (and joined the
    message's text), and a task the hook left running spoke after RUN_FINISHED with the finished run's id."""
    LateWriter.failures.clear()
    async with AgentHarness(LateWriter) as agent:
        turn = await agent.send("go")
        LateWriter.turn_over.set()
        with anyio.fail_after(5):
            await LateWriter.spoke_late.wait()
        after = [e.type for e in agent.events if e.run_id == turn.events[0].run_id]
    assert turn.messages == ["a"]
    assert after[-3:] == ["MESSAGE_PART", "MESSAGE_END", "RUN_FINISHED"]  # nothing after the end, nor the run's
    assert [str(error).split(":")[0] for error in LateWriter.failures] == [
        f"message {turn.events[1].payload['message_id']} has ended (its `async with turn.stream()` block is over)",  # type: ignore[index]
        f"the turn of agent 'latewriter' (run {turn.events[0].run_id}) has ended",
    ]


class CallsBig(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        await turn.call_tool("big.fail", {})


class SendsAudio(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        try:
            await turn.send_audio(b"\0" * int(turn.text), "audio/wav")
        except ValueError as error:
            await turn.say(str(error))


async def test_a_large_tool_error_and_audio_stay_within_a_frame() -> None:
    """A reviewer's finds: a tool error cut to the frame limit was repeated whole as ``error.message`` (a 2 MB
    TOOL_DONE), and ``send_audio`` sent 1 MiB of audio as a 1.4 MB frame."""

    def fail(arguments: dict[str, Any]) -> None:
        raise FakeToolError("x" * (3 * 1024 * 1024 // 2))

    async with AgentHarness(CallsBig, tools={"big.fail": fail}) as agent:
        failed = await agent.send("go")
    async with AgentHarness(SendsAudio) as agent:
        small, big = await agent.send("1000"), await agent.send(str(1024 * 1024))
    [done] = [e for e in failed.events if e.type == "TOOL_DONE"]
    assert len(done.payload_json) < 1024 * 1024 and done.payload["error"]["message"].endswith(" …")  # type: ignore[index]
    assert [e.type for e in small.events].count("AUDIO_CHUNK") == 1
    assert "AUDIO_CHUNK" not in [e.type for e in big.events] and "send it in pieces" in big.text


async def test_a_waiting_message_taken_out_of_the_queue_fails_its_send_at_once() -> None:
    """A reviewer's find: ``send`` of a message cancelled while it waited its turn waited out its timeout."""
    async with AgentHarness(WaitingAgent) as agent, anyio.create_task_group() as tg:
        failures: list[str] = []
        ended = anyio.Event()

        async def second() -> None:
            try:
                await agent.send({"text": "two", "message_id": "two"}, timeout=20)
            except RuntimeError as error:
                failures.append(str(error))
            finally:
                ended.set()

        tg.start_soon(agent.send, "one")
        tg.start_soon(second)
        with anyio.fail_after(10):
            while agent.transaction is None or agent.transaction.queued != ["two"]:
                await agent.member.arrived()
        agent.transaction.cancel_run("two", "tester")
        with anyio.fail_after(10):  # (far less than its own timeout, 20 s)
            await ended.wait()
        tg.cancel_scope.cancel()
    assert failures == ["AgentHarness: message two never ran: cancelled by tester"]


class CallsWithBigArguments(Agent[NoOptions]):
    async def on_message(self, turn: Turn) -> None:
        try:
            await turn.call_tool("tickets.search", {"q": "B" * (2 * 1024 * 1024)})
        except ValueError as error:
            await turn.say(str(error))


async def test_a_tool_call_with_arguments_past_a_frame_is_refused_before_anything_goes_out() -> None:
    """A tester's find: the TOOL_CALL of 100 KB of arguments went out past a 64 KiB frame limit."""
    async with AgentHarness(CallsWithBigArguments, tools=TOOLS) as agent:
        turn = await agent.send("go")
    assert turn.tool_calls == [] and "bytes of arguments are over what one frame holds" in turn.text


async def test_an_exception_out_of_the_block_is_the_tests_own_not_an_exception_group() -> None:
    """A newcomer's find: ``pytest.raises(ProtocolError)`` around ``async with AgentHarness`` (or a failed
    assert in it) met an ExceptionGroup from the harness's task group."""
    from tests.support.agents import CalculatorAgent

    with pytest.raises(ProtocolError) as refused:
        async with AgentHarness(CalculatorAgent) as agent:
            await agent.send({"a": "x", "b": 1})
    with pytest.raises(AssertionError, match="the test's own"):
        async with AgentHarness(CalculatorAgent) as agent:
            turn = await agent.send({"a": 2, "b": 40})
            assert turn.text == "", "the test's own"
    assert refused.value.code == "INVALID_PAYLOAD"
