"""The TOOL_UPDATEs an MCP task's states become (`tools/updates.py`), the bridge's own words included."""

from __future__ import annotations

from typing import Any

import pytest

from haip_runtime.bridge import TaskState
from haip_runtime.protocol.events import ToolStatus
from haip_runtime.tools.updates import Updates

pytestmark = pytest.mark.anyio


class Sent:
    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def __call__(self, type: str, payload: dict[str, Any] | str, *, channel: str = "agent") -> None:
        assert isinstance(payload, dict)
        self.updates.append(payload)


async def test_a_call_waiting_for_its_server_says_so_while_running() -> None:
    sent = Sent()
    updates = Updates("c1", sent)
    await updates.task(TaskState("t1", "working", "the agent is running"))
    await updates.task(TaskState("t1", "working", "waiting for it to come back", local=True))
    assert [(u["status"], u["message"], u["task"]) for u in sent.updates] == [
        ("RUNNING", "the agent is running", {"id": "t1", "status": "working"}),
        ("RUNNING", "waiting for it to come back", {"id": "t1", "status": "working"}),
    ]


async def test_while_cancelling_only_the_servers_confirmation_or_the_bridges_word_is_told() -> None:
    sent = Sent()
    updates = Updates("c1", sent)
    updates.send(ToolStatus.CANCELLING, message="cancelled by alice")
    await updates.task(TaskState("t1", "working", "the agent is running"))  # a late state: not told
    await updates.task(TaskState("t1", "working", "the cancel could not reach MCP server 'b'", local=True))
    assert [(u["status"], u.get("message")) for u in sent.updates] == [
        ("CANCELLING", "cancelled by alice"),
        ("CANCELLING", "the cancel could not reach MCP server 'b'"),
    ]
