"""The agents' history of a transaction: what its models read, bounded, and rebuilt from its log.

``History`` is the bounded list of ``HistoryEntry``s (messages, tool calls and their results) a
transaction keeps for its agents; ``history_from_events`` rebuilds it from the event log when a
transaction comes back from the store. The log itself is the store's; ``HistoryEntry`` is the
LLM seam's type (``llm/provider.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, SupportsIndex

from haip_runtime.llm.provider import HistoryEntry
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import Channel, EventType
from haip_runtime.tools.proxy import ToolCallResult


class History(deque[HistoryEntry]):
    """The agents' view of the conversation, bounded by entries and by bytes of text (kept as a sum)."""

    def __init__(self, entries: Iterable[HistoryEntry], *, maxlen: int, max_bytes: int) -> None:
        super().__init__(maxlen=maxlen)
        self.max_bytes = max_bytes
        self.bytes = 0
        for entry in entries:
            self.append(entry)

    def append(self, entry: HistoryEntry) -> None:
        if len(self) == self.maxlen:
            self.bytes -= len(self[0].text)  # the deque lets it go
        super().append(entry)
        self.bytes += len(entry.text)
        while len(self) > 1 and self.bytes > self.max_bytes:
            self.bytes -= len(self.popleft().text)

    def __setitem__(self, index: SupportsIndex, entry: HistoryEntry) -> None:  # type: ignore[override]
        self.bytes += len(entry.text) - len(self[index].text)
        super().__setitem__(index, entry)


def history_from_events(events: Iterable[Event]) -> list[HistoryEntry]:
    """The agents' history, rebuilt from a transaction's log (after a restart or an eviction)."""
    entries: dict[str, HistoryEntry] = {}
    authors: dict[str, str] = {}
    tools: dict[str, str] = {}  # call_id -> tool, of agents' calls
    for event in events:
        body = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        message_id = str(body.get("message_id", ""))
        if event.type == EventType.MESSAGE and event.channel == Channel.USER:
            entry = HistoryEntry("user", str(body.get("author", "")), str(body.get("text", "")), message_id)
            entries[message_id if message_id not in entries else f"{message_id}@{event.tseq}"] = entry  # (reused)
        elif event.type == EventType.MESSAGE_START:
            authors[message_id] = str(body.get("author", ""))
            entries[message_id] = HistoryEntry("agent", authors[message_id], "", message_id)
        elif event.type == EventType.MESSAGE_PART and message_id in entries:
            entry = entries[message_id]
            entries[message_id] = replace(entry, text=entry.text + str(body.get("text", "")))
        elif event.type == EventType.MESSAGE_UPDATE and message_id in entries:
            if entries[message_id].author == body.get("author", entries[message_id].author):  # (its author's)
                entries[message_id] = replace(entries[message_id], text=str(body.get("text", "")))
        elif event.type == EventType.TOOL_CALL and event.run_id is not None:  # an agent's call, not a member's
            call_id, tool = str(body.get("call_id", "")), str(body.get("tool", ""))
            params = body.get("params")
            arguments: dict[str, Any] = params if isinstance(params, dict) else {}
            tools[call_id] = tool
            caller = str(body.get("caller", ""))
            entries[f"call:{call_id}"] = HistoryEntry(
                "tool_call", caller, "", call_id, call_id=call_id, tool=tool, arguments=arguments
            )
        elif event.type == EventType.TOOL_DONE and str(body.get("call_id", "")) in tools:
            call_id = str(body.get("call_id", ""))
            status, text = str(body.get("status", "")), ToolCallResult.from_done(tools[call_id], body).model_text
            entries[f"result:{call_id}"] = HistoryEntry(
                "tool_result", tools[call_id], text, call_id, call_id=call_id, tool=tools[call_id], status=status
            )
    return list(entries.values())
