"""docs/protocol-guide.md stays true: its tables list what events.py and errors.py define, its examples decode."""

from __future__ import annotations

import enum
import json
import re

import pytest

from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import decode, parse_payload
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ErrorCode, EventType, RunOutcome, ServerState, ToolErrorCode, ToolOutcome
from tests.support.serving import ROOT

GUIDE = (ROOT / "docs" / "protocol-guide.md").read_text(encoding="utf-8")

#: Models for what only the server sends; what a client may send is checked with ``payloads.INBOUND``.
SERVER_ONLY: dict[str, type[p.Payload]] = {
    "MESSAGE_START": p.MessageStart,
    "MESSAGE_PART": p.MessagePart,
    "MESSAGE_END": p.MessageEnd,
    "TOOL_DONE": p.ToolDone,
    "RUN_STARTED": p.RunStarted,
    "RUN_FINISHED": p.RunFinished,
    "RUN_ERROR": p.RunError,
}


def section(title: str) -> str:
    start = GUIDE.index(f"\n## {title}")
    end = GUIDE.find("\n## ", start + 1)
    return GUIDE[start : end if end != -1 else None]


def first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.MULTILINE)


def table(header: str) -> list[str]:
    """The first column of the table whose first header cell is ``header``, in order."""
    lines = GUIDE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        match = re.match(r"^\| `([^`]+)` \|", line)
        assert match is not None, f"a row of the {header!r} table without a `value`: {line}"
        rows.append(match.group(1))
    return rows


def examples() -> list[str]:
    return re.findall(r"```json\n(.*?)```", GUIDE, flags=re.DOTALL)


def test_the_event_reference_lists_every_event_type_once() -> None:
    listed = first_column(section("8. Event reference"))
    assert sorted(listed) == sorted(e.value for e in EventType)


def test_the_error_table_lists_every_error_code_once() -> None:
    listed = first_column(section("7. Errors"))
    assert sorted(listed) == sorted(c.value for c in ErrorCode)


@pytest.mark.parametrize(
    ("header", "members"),
    [
        ("RUN_FINISHED status", RunOutcome),
        ("TOOL_DONE status", ToolOutcome),
        ("TOOL_DONE error code", ToolErrorCode),
        ("MCP server state", ServerState),
    ],
)
def test_each_outcome_and_state_table_lists_the_enum_in_order(header: str, members: type[enum.StrEnum]) -> None:
    assert table(header) == [member.value for member in members]


def test_the_error_body_table_lists_the_fields_error_body_writes_in_order() -> None:
    body = error_body(ErrorCode.INVALID_PAYLOAD, "m", related_id="e1", detail={"where": "/payload"})
    assert table("error field") == list(body)


def test_the_guide_has_examples_of_the_whole_flow() -> None:
    types = {json.loads(example)["type"] for example in examples()}
    assert {"HAI", "INFO", "TRANSACTION_START", "TOOL_LIST", "MESSAGE", "MESSAGE_START"} <= types
    assert {"TOOL_CALL", "TOOL_UPDATE", "TOOL_DONE", "TOOL_SCHEMA", "ERROR"} <= types


@pytest.mark.parametrize("example", examples(), ids=lambda text: str(json.loads(text)["type"]))
def test_every_example_is_an_envelope_the_runtime_accepts(example: str) -> None:
    envelope = decode(example)
    model = SERVER_ONLY.get(envelope.type) or p.INBOUND[envelope.type]
    parse_payload(envelope, model)  # raises DecodeError with the path of what is wrong
