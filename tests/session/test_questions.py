"""Approvals and input requests in words (PROTOCOL.md section 12): what a client without TOOL_* is told,
and how its next MESSAGE is read."""

from __future__ import annotations

import json
from typing import Any

from haip_runtime.auth.permissions import Permissions
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from haip_runtime.session.negotiation import Downgrader, negotiate
from haip_runtime.session.questions import Question, Questions
from haip_runtime.session.session import Session

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "title": "Name"},
        "guests": {"type": "integer"},
        "vegan": {"type": "boolean"},
        "room": {"type": "string", "enum": ["red", "blue"]},
    },
    "required": ["name", "guests"],
}


def tool_event(type: str, **payload: Any) -> Event:
    event = Event(type, {"call_id": "c1", **payload})
    event.stamp("tx", 1, None)
    return event


def test_a_legacy_client_is_asked_in_words_and_the_question_closes_when_the_call_moves_on() -> None:
    legacy = Downgrader(negotiate(sorted(TRANSACTION_ERA_EVENTS)))
    assert legacy.adapt(tool_event("TOOL_CALL", tool="demo.wipe", params={"all": True}))[0].type == "INFO"
    [asked] = legacy.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))
    assert (asked.type, asked.channel, asked.transaction) == ("MESSAGE", "AGENT", "tx")
    assert asked.payload == (
        'demo.wipe wants to run with {"all": true} and needs your approval: reply yes or no '
        '(a reason may follow, as in "no, not now").'
    )
    question = legacy.questions.first("tx")
    assert question is not None and question.kind == "approval" and legacy.questions.first("other") is None
    legacy.adapt(tool_event("TOOL_UPDATE", status="RUNNING"))  # approved by someone else meanwhile
    assert legacy.questions.first("tx") is None


def test_a_client_with_tool_events_or_without_message_is_not_asked_in_words() -> None:
    rich = Downgrader(negotiate(["TOOL_CALL", "TOOL_UPDATE", "MESSAGE"]))
    assert rich.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))[0].type == "TOOL_UPDATE"
    mute = Downgrader(negotiate(["INFO"]))
    assert mute.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))[0].type == "INFO"
    assert rich.questions.first("tx") is None and mute.questions.first("tx") is None


def test_a_member_whose_roles_refuse_tool_update_is_not_asked_in_words_so_their_yes_approves_nothing() -> None:
    """A prober's find: a viewer (``roles.viewer.events`` without TOOL_UPDATE) was refused a TOOL_UPDATE
    approval, but was asked in words, and their MESSAGE "yes" ran the tool."""
    viewer = Principal("vic", roles=("viewer",), permissions=Permissions(events=("MESSAGE", "TRANSACTION_JOIN")))
    session = Session(Principal("vic"), negotiate(TRANSACTION_ERA_EVENTS), SessionConfig())
    session.authenticate(viewer, negotiate(TRANSACTION_ERA_EVENTS))
    [told] = session.downgrader.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))
    assert told.type == "INFO" and session.downgrader.questions.first("tx") is None
    # Made for a viewer at once, as a node taking the session over makes it (a reviewer's find)
    moved = Session(viewer, negotiate(TRANSACTION_ERA_EVENTS), SessionConfig())
    [told] = moved.downgrader.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))
    assert told.type == "INFO" and moved.downgrader.questions.first("tx") is None
    staff = Principal("sam", permissions=Permissions(events=("MESSAGE", "TOOL_UPDATE")))
    session.authenticate(staff, negotiate(TRANSACTION_ERA_EVENTS))
    [asked] = session.downgrader.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))
    assert asked.type == "MESSAGE" and session.downgrader.questions.first("tx") is not None


def test_run_infos_reach_only_clients_that_accept_runs() -> None:
    queued = Event("INFO", {"event": "run.queued", "message_id": "m", "position": 1})
    assert Downgrader(negotiate(sorted(TRANSACTION_ERA_EVENTS))).adapt(queued) == []
    assert Downgrader(negotiate(["INFO", "RUN_STARTED"])).adapt(queued) == [queued]


def test_an_input_request_lists_its_fields_and_how_to_answer() -> None:
    questions = Questions()
    text = questions.follow(
        tool_event("TOOL_UPDATE", status="INPUT_REQUIRED", request={"message": "Who?", "schema": SCHEMA})
    )
    assert text is not None and text.splitlines() == [
        "a tool asks: Who?",
        "- name (Name): string, required",
        "- guests: integer, required",
        "- vegan: boolean, optional",
        "- room: string, one of red, blue, optional",
        'Reply with one "name: value" line per field, or a JSON object, or "decline".',
    ]
    questions.follow(tool_event("TOOL_DONE", status="CANCELLED"))
    assert questions.first("tx") is None


def test_approvals_are_read_from_yes_or_no_with_a_reason() -> None:
    approval = Question("c1", "tx", "approval", "demo.wipe")
    assert approval.read("Yes") == {"decision": "approve"}
    assert approval.read("ok, go ahead") == {"decision": "approve"}
    assert approval.read("no, not now") == {"decision": "reject", "reason": "not now"}
    assert approval.read("No") == {"decision": "reject"}
    assert isinstance(approval.read("what is this?"), str)


def test_input_is_read_from_lines_json_or_decline_and_bad_values_are_explained() -> None:
    asking = Question("c1", "tx", "input", "demo.book", SCHEMA)
    lines = asking.read("Name: Ada\nguests = 3\nvegan: yes\nroom: blue")
    assert lines == {"input": {"name": "Ada", "guests": 3, "vegan": True, "room": "blue"}}
    assert asking.read('{"name": "Bo", "guests": 2}') == {"input": {"name": "Bo", "guests": 2}}
    assert asking.read("decline") == {"decision": "decline"}
    assert asking.read("name: Ada") == 'Still needed: guests. Reply with every field again, one "name: value" per line.'
    assert asking.read("name: Ada\nguests: many") == '"many" is not a valid integer for guests.'
    assert asking.read("name: Ada\nguests: 2\nroom: green") == '"green" is not a valid string for room.'
    assert str(asking.read("name: Ada\nwho knows")).startswith('Not understood: "who knows".')
    single = Question(
        "c2", "tx", "input", "demo.ask", {"properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    assert single.read("Lisbon") == {"input": {"city": "Lisbon"}}  # one field: the reply is its value
    consent = Question("c3", "tx", "input", "demo.ask", {"properties": {"agree": {"type": "boolean"}}})
    assert consent.read("no") == {"input": {"agree": False}} and consent.read("cancel") == {"decision": "decline"}


def test_open_questions_kept_as_text_come_back_whole_on_another_node() -> None:
    asking = Downgrader(negotiate(sorted(TRANSACTION_ERA_EVENTS)))
    asking.adapt(tool_event("TOOL_CALL", tool="demo.wipe", params={}))
    asking.adapt(tool_event("TOOL_UPDATE", status="AWAITING_APPROVAL"))
    asked = tool_event("TOOL_UPDATE", status="INPUT_REQUIRED", request={"message": "Who?", "schema": SCHEMA})
    asked.payload["call_id"] = "c2"  # type: ignore[index]
    asking.adapt(asked)
    kept = asking.questions.kept()

    moved = Downgrader(negotiate(sorted(TRANSACTION_ERA_EVENTS)))
    moved.questions.restore(kept)
    first = moved.questions.first("tx")
    assert first == Question("c1", "tx", "approval", "demo.wipe")
    moved.questions.close(first)
    assert moved.questions.first("tx") == Question("c2", "tx", "input", "a tool", SCHEMA)
    assert Questions().kept() == ""  # nothing asked: nothing kept
    for spoiled in ("not json", "[1]", '[["c", "tx", "approval", "t", "no schema"]]'):
        unread = Questions()
        unread.restore(spoiled)
        assert unread.first("tx") is None


def test_restored_questions_keep_only_the_calls_the_log_shows_waiting() -> None:
    kept = json.dumps([["c1", "tx", "approval", "t", {}], ["c2", "tx", "approval", "t", {}]])
    moved = Questions()
    moved.restore(kept)
    moved.retain({"c2"})  # c1 was answered after the window was last written
    first = moved.first("tx")
    assert first is not None and first.call_id == "c2"
