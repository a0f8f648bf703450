"""The AG-UI mapping in memory: an ``AguiMember`` handed HAIP events, and what AG-UI events it makes."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from ag_ui.core import Event as AguiEvent
from ag_ui.core import RunAgentInput
from pydantic import TypeAdapter

from haip_runtime.auth.tokens import Principal
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import Channel, EventType
from haip_runtime.server.agui.endpoint import body_path
from haip_runtime.server.agui.mapping import AguiMember, check_resume, tool_text, user_text

EVENTS: TypeAdapter[Any] = TypeAdapter(AguiEvent)


def member() -> AguiMember:
    return AguiMember(Principal("alice"), "thread-1")


def running() -> AguiMember:
    """A member whose AG-UI run ``run-a`` is open, with its HAIP run ``r1`` under way."""
    agui = member()
    agui.runs.add("r1")
    agui.open("run-a")
    return agui


def sent(agui: AguiMember, after: int = 0) -> list[dict[str, Any]]:
    """The AG-UI events in the journal after ``after``, each validated against the protocol's models."""
    events = [json.loads(data) for number, data, _ends in agui.journal if number > after]
    for event in events:
        EVENTS.validate_python(event)
    return events


def haip(type: str, payload: dict[str, Any], run_id: str | None = "r1", channel: str = Channel.AGENT) -> Event:
    return Event(type, payload, channel=channel, run_id=run_id)


def test_a_failed_haip_run_ends_the_ag_ui_run_with_run_error_and_the_usage_so_far() -> None:
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "m1", "author": "assistant"}))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "m1", "text": "partial"}))
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "m1", "tokens": 7}))
    agui.deliver(haip(EventType.RUN_ERROR, {"run_id": "r1", "code": "LLM_TIMEOUT", "message": "too slow"}))
    events = sent(agui)
    assert [e["type"] for e in events][-1] == "RUN_ERROR"
    assert events[-1] == {
        "type": "RUN_ERROR",
        "message": "too slow",
        "code": "LLM_TIMEOUT",
        "usage": [{"outputTokens": 7}],
    }
    assert agui.run_id is None and agui.failure is None  # the next run starts clean


def test_a_cancelled_run_finishes_with_the_cancelled_outcome() -> None:
    agui = running()
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "CANCELLED"}))
    assert sent(agui)[-1]["outcome"] == {"type": "cancelled"}


def test_another_members_message_is_a_user_text_message_and_nothing_is_sent_between_runs() -> None:
    agui = member()
    agui.deliver(haip(EventType.MESSAGE, {"text": "early", "author": "bob"}, None, Channel.USER))
    assert sent(agui) == []  # no AG-UI run open and none of ours going on
    agui.runs.add("r1")
    agui.open("run-a")
    agui.deliver(haip(EventType.MESSAGE, {"text": "hi all", "author": "bob", "message_id": "b1"}, None, Channel.USER))
    events = sent(agui)[1:]
    assert [(e["type"], e.get("role"), e.get("delta")) for e in events] == [
        ("TEXT_MESSAGE_START", "user", None),
        ("TEXT_MESSAGE_CONTENT", None, "hi all"),
        ("TEXT_MESSAGE_END", None, None),
    ]


def test_a_failed_tool_call_result_carries_its_error_and_progress_is_an_activity() -> None:
    agui = running()
    agui.deliver(haip(EventType.TOOL_CALL, {"call_id": "c1", "tool": "demo.fail", "server": "demo", "params": {}}))
    agui.deliver(haip(EventType.TOOL_UPDATE, {"call_id": "c1", "status": "RUNNING", "progress": 1, "total": 2}))
    error = {"code": "TOOL_ERROR", "message": "this tool always fails"}
    agui.deliver(haip(EventType.TOOL_DONE, {"call_id": "c1", "status": "ERROR", "error": error}))
    events = sent(agui)
    [activity] = [e for e in events if e["type"] == "ACTIVITY_SNAPSHOT"]
    assert activity["content"] == {"call_id": "c1", "status": "RUNNING", "progress": 1, "total": 2}
    [result] = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
    assert json.loads(result["content"]) == error and result["role"] == "tool"


def test_what_our_runs_do_between_two_ag_ui_runs_is_sent_in_the_next() -> None:
    agui = running()
    agui.deliver(haip(EventType.TOOL_CALL, {"call_id": "c1", "tool": "demo.add", "params": {"a": 1}}))
    agui.deliver(haip(EventType.TOOL_UPDATE, {"call_id": "c1", "status": "AWAITING_APPROVAL"}))
    first = sent(agui)
    assert first[-1]["outcome"]["type"] == "interrupt"
    agui.deliver(haip(EventType.TOOL_UPDATE, {"call_id": "c1", "status": "RUNNING"}))  # a HAIP member approved
    assert "c1" in agui.settled and not agui.interrupts
    agui.deliver(haip(EventType.MESSAGE, {"text": "3", "message_id": "m2"}))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    assert sent(agui, agui.last_id) == []  # held, not sent: no AG-UI run is open
    after = agui.last_id
    agui.open("run-b")
    agui.settle()
    kinds = [e["type"] for e in sent(agui, after)]
    assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED"
    assert "ACTIVITY_SNAPSHOT" in kinds and "TEXT_MESSAGE_CONTENT" in kinds


@pytest.mark.anyio
async def test_frames_carry_sse_ids_and_stop_after_the_event_that_ends_the_run() -> None:
    agui = running()
    frames: list[str] = []

    async def read() -> None:
        async for frame in agui.frames(0):
            frames.append(frame)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    assert [frame.split("\n")[0] for frame in frames] == ["id: thread-1:1", "id: thread-1:2"]


def run_input(**fields: Any) -> RunAgentInput:
    return RunAgentInput.model_validate({"threadId": "t", "runId": "r", "messages": [], **fields})


def test_resume_entries_must_answer_an_interrupt_and_edited_arguments_are_refused() -> None:
    agui = member()
    with pytest.raises(ProtocolError, match="no open interrupt"):
        check_resume(None, run_input(resume=[{"interruptId": "x", "status": "resolved"}]))
    agui.interrupts["c1"] = {"id": "c1", "reason": "tool_approval"}
    edited = {"interruptId": "c1", "status": "resolved", "payload": {"approved": True, "editedArgs": {"a": 2}}}
    with pytest.raises(ProtocolError, match="edited arguments"):
        check_resume(agui, run_input(resume=[edited]))
    check_resume(agui, run_input(resume=[{"interruptId": "c1", "status": "resolved", "payload": {"approved": True}}]))
    agui.settled.append("c0")
    check_resume(agui, run_input(resume=[{"interruptId": "c0", "status": "resolved"}]))


def test_the_newest_user_message_is_read_from_text_or_parts() -> None:
    messages = [
        {"id": "1", "role": "user", "content": "first"},
        {"id": "2", "role": "assistant", "content": "ok"},
        {"id": "3", "role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]},
    ]
    assert user_text(run_input(messages=messages)) == (2, "second")
    assert user_text(run_input()) is None
    assert tool_text({"content": [{"type": "text", "text": "5"}]}, "OK") == "5"
    assert tool_text(None, "CANCELLED") == "CANCELLED"


def test_the_member_says_it_is_idle_only_once_nothing_of_its_own_goes_on() -> None:
    agui = member()
    idle: list[AguiMember] = []
    agui.on_idle = idle.append
    agui.runs.add("r1")
    agui.open("run-a")
    agui.deliver(haip(EventType.TOOL_CALL, {"call_id": "c1", "tool": "demo.add", "params": {}}))
    agui.deliver(haip(EventType.TOOL_UPDATE, {"call_id": "c1", "status": "AWAITING_APPROVAL"}))
    assert agui.run_id is None and idle == []  # ended by an interrupt: the user is still needed
    agui.open("run-b")
    agui.interrupts.clear()
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    assert idle == [agui]


def test_a_message_that_waits_in_the_run_queue_keeps_the_ag_ui_run_open_until_its_run_ends() -> None:
    agui = member()
    agui.open("run-a")
    agui.waiting.add("m1")
    agui.settle()  # nothing running yet, but a message of ours waits: the run stays open
    still_open = agui.run_id
    agui.deliver(haip(EventType.RUN_STARTED, {"run_id": "r1", "agent": "echo", "message_id": "m1"}))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    assert still_open == "run-a" and agui.run_id is None and agui.idle
    assert [e["type"] for e in sent(agui)] == ["RUN_STARTED", "RUN_FINISHED"]


def test_a_waiting_message_taken_out_of_the_queue_ends_the_ag_ui_run_cancelled() -> None:
    agui = member()
    agui.open("run-a")
    agui.waiting.add("m1")
    unqueued = {"event": "run.unqueued", "message_id": "m1", "reason": "cancelled by alice"}
    agui.deliver(haip(EventType.INFO, unqueued, run_id=None))
    events = sent(agui)
    assert agui.run_id is None and agui.waiting == set()
    cancelled = {"type": "RUN_FINISHED", "threadId": "thread-1", "runId": "run-a", "outcome": {"type": "cancelled"}}
    assert events[-1] == cancelled


def open_texts_at_run_ends(events: list[dict[str, Any]]) -> list[str]:
    """Text messages still open when a run finished or failed: AG-UI clients refuse such a stream."""
    open_now: set[str] = set()
    left: list[str] = []
    for event in events:
        if event["type"] == "TEXT_MESSAGE_START":
            open_now.add(event["messageId"])
        elif event["type"] == "TEXT_MESSAGE_END":
            open_now.discard(event["messageId"])
        elif event["type"] in ("RUN_FINISHED", "RUN_ERROR"):
            left += sorted(open_now)
    return left


def test_another_members_run_still_streaming_when_ours_ends_leaves_no_text_message_open() -> None:
    """An AG-UI tester's find: bob's run streamed into alice's AG-UI run, which ended with it open, and
    @ag-ui/client refused the stream ("Cannot send 'RUN_FINISHED' while text messages are still active")."""
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "theirs", "author": "assistant"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": "once upon"}, "r-bob"))
    agui.deliver(haip(EventType.TOOL_CALL, {"call_id": "c-bob", "tool": "demo.add", "params": {}}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE, {"text": "3", "message_id": "ours"}))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    events = sent(agui)
    assert open_texts_at_run_ends(events) == []
    assert [e.get("messageId") for e in events if e["type"] == "TEXT_MESSAGE_START"] == ["ours"]
    assert not any(e["type"].startswith("TOOL_CALL") for e in events)  # bob's calls are not this client's
    after = agui.last_id
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": " a time"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "theirs"}, "r-bob"))
    assert sent(agui, after) == []  # between AG-UI runs: the history has it


def test_another_members_message_said_during_our_run_comes_whole_at_its_end() -> None:
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "theirs", "author": "assistant"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": "once upon"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": " a time"}, "r-bob"))
    assert sent(agui)[1:] == []  # nothing of it yet
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "theirs"}, "r-bob"))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    events = sent(agui)
    assert [(e["type"], e.get("delta")) for e in events[1:-1]] == [
        ("TEXT_MESSAGE_START", None),
        ("TEXT_MESSAGE_CONTENT", "once upon a time"),
        ("TEXT_MESSAGE_END", None),
    ]
    assert open_texts_at_run_ends(events) == []


def test_a_run_that_fails_mid_stream_ends_its_open_message_first() -> None:
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "m1", "author": "assistant"}))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "m1", "text": "half"}))
    agui.deliver(haip(EventType.RUN_ERROR, {"run_id": "r1", "code": "NODE_LOST", "message": "its node was lost"}))
    events = sent(agui)
    assert [e["type"] for e in events[-2:]] == ["TEXT_MESSAGE_END", "RUN_ERROR"]
    assert open_texts_at_run_ends(events) == []


def test_a_message_cut_by_an_interrupt_starts_again_in_the_next_run_with_the_rest() -> None:
    """An AG-UI run closed by an interrupt while its message streams ends the message (AG-UI refuses a
    run finishing with one open); the rest of it, in the next run, starts it again under its id (the
    client appends to the message it has)."""
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "m1", "author": "assistant"}))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "m1", "text": "let me check"}))
    agui.deliver(haip(EventType.TOOL_CALL, {"call_id": "c1", "tool": "demo.add", "params": {}}))
    agui.deliver(haip(EventType.TOOL_UPDATE, {"call_id": "c1", "status": "AWAITING_APPROVAL"}))
    first = sent(agui)
    assert first[-1]["outcome"]["type"] == "interrupt" and open_texts_at_run_ends(first) == []
    after = agui.last_id
    agui.open("run-b")
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "m1", "text": ": done"}))
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "m1"}))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    rest = sent(agui, after)
    assert [(e["type"], e.get("messageId"), e.get("delta")) for e in rest[1:-1]] == [
        ("TEXT_MESSAGE_START", "m1", None),
        ("TEXT_MESSAGE_CONTENT", "m1", ": done"),
        ("TEXT_MESSAGE_END", "m1", None),
    ]
    assert open_texts_at_run_ends(rest) == []


def test_an_abandoned_run_ends_cancelled_and_nothing_more_of_its_turns_is_sent() -> None:
    agui = running()
    agui.waiting.add("m-queued")
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "m1", "author": "patient"}))
    assert sorted(agui.abandon()) == ["m-queued", "r1"]
    events = sent(agui)
    assert events[-1]["outcome"] == {"type": "cancelled"} and open_texts_at_run_ends(events) == []
    after = agui.last_id
    agui.runs.add("r2")
    agui.open("run-b")
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "m1", "text": "late"}, "r1"))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "CANCELLED"}))
    assert [e["type"] for e in sent(agui, after)] == ["RUN_STARTED"] and agui.run_id == "run-b"


def test_a_user_message_with_anything_but_text_is_refused_with_where() -> None:
    image = {"type": "image", "source": {"type": "data", "value": "aGk=", "mimeType": "image/png"}}
    messages = [{"id": "1", "role": "user", "content": [{"type": "text", "text": "look"}, image]}]
    with pytest.raises(ProtocolError) as refused:
        user_text(run_input(messages=messages))
    assert refused.value.code == "INVALID_PAYLOAD" and refused.value.detail == {"where": "/messages/0/content/1"}
    assert "'image'" in refused.value.message


def test_only_the_greeting_this_member_brought_is_its_run() -> None:
    """A greeting (a run answering no message) is the AG-UI member's when its run started the thread or
    added the agent; another member's agent greeting is not (a reviewer's find: it was adopted, and a
    "stop" would have cancelled it)."""
    agui = running()
    agui.deliver(haip(EventType.RUN_STARTED, {"run_id": "g-other", "agent": "greeter"}, "g-other"))
    assert "g-other" not in agui.runs
    agui.greeting_due = True
    agui.deliver(haip(EventType.RUN_STARTED, {"run_id": "g-mine", "agent": "greeter"}, "g-mine"))
    assert "g-mine" in agui.runs and not agui.greeting_due


def test_another_members_message_streaming_across_two_runs_comes_whole_in_the_second() -> None:
    """A re-tester's find: the parts said between two AG-UI runs were dropped, and the message came in
    the second run whole-looking, its middle missing."""
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "theirs", "author": "storyteller"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": "once"}, "r-bob"))
    agui.deliver(haip(EventType.RUN_FINISHED, {"run_id": "r1", "status": "OK"}))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": " upon a"}, "r-bob"))  # between runs
    after = agui.last_id
    agui.runs.add("r2")
    agui.open("run-b")
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": " time"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "theirs"}, "r-bob"))
    said = [e.get("delta") for e in sent(agui, after) if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert said == ["once upon a time"]


def test_a_message_partly_missed_while_the_member_was_away_is_not_sent() -> None:
    agui = running()
    agui.deliver(haip(EventType.MESSAGE_START, {"message_id": "theirs", "author": "storyteller"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": "once"}, "r-bob"))
    agui.left()  # idle between runs, out of the transaction: its parts meanwhile never came
    after = agui.last_id
    agui.open("run-b")
    agui.deliver(haip(EventType.MESSAGE_PART, {"message_id": "theirs", "text": " time"}, "r-bob"))
    agui.deliver(haip(EventType.MESSAGE_END, {"message_id": "theirs"}, "r-bob"))
    assert [e["type"] for e in sent(agui, after)] == ["RUN_STARTED"]  # the history has it, whole


def test_a_refused_bodys_where_is_a_path_into_the_body_not_pydantics_union_tags() -> None:
    """A re-tester's find: ``/messages/0/user/content/str`` (the union members pydantic tried)."""
    old_binary = [{"type": "binary", "mimeType": "image/png", "data": "aGk="}]
    body = {"threadId": "t", "runId": "r", "messages": [{"id": "1", "role": "user", "content": old_binary}]}
    assert body_path(body, ("messages", 0, "user", "content", "str")) == "/messages/0/content"
    assert body_path(body, ("messages", 0, "user", "name")) == "/messages/0/name"  # a missing key stays
