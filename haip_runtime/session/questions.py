"""Approvals and input requests in words, for clients that accept neither TOOL_CALL nor TOOL_UPDATE
(PROTOCOL.md section 12: the reference SDK and CLI show only MESSAGEs).

The session's ``Downgrader`` hands every tool event such a client cannot take to ``Questions.follow``:
a ``TOOL_UPDATE`` that asks (``AWAITING_APPROVAL``, ``INPUT_REQUIRED``) becomes the text of an agent
MESSAGE and an open ``Question`` of that transaction, closed when the call moves on. The hub gives the
member's next MESSAGE in the transaction to ``Question.read``: the answer for the tool proxy, or a
sentence saying how to answer (the question stays open). Nothing here talks to the proxy itself.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import EventType, ToolStatus

#: Tool calls remembered for the questions they may ask (name and arguments), oldest forgotten first.
MAX_CALLS = 256
#: Open questions kept per session, oldest dropped first (the proxy times them out anyway).
MAX_QUESTIONS = 64
YES = frozenset({"yes", "y", "yeah", "yep", "ok", "okay", "sure", "approve", "approved", "go"})
NO = frozenset({"no", "n", "nope", "reject", "rejected", "deny", "denied", "cancel", "stop"})
DECLINE = frozenset({"decline", "cancel", "skip"})  # not "no": the answer to a yes/no field
_ASKING = (ToolStatus.AWAITING_APPROVAL, ToolStatus.INPUT_REQUIRED)
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)\W*(.*)", re.DOTALL)
_FIELD_LINE = re.compile(r"\s*([^:=\n]+?)\s*[:=]\s*(.*?)\s*$")


@dataclass
class Question:
    """One approval or input request a member was asked in words."""

    call_id: str
    transaction_id: str
    kind: Literal["approval", "input"]
    tool: str
    schema: dict[str, Any] = field(default_factory=dict)

    def read(self, text: str) -> dict[str, Any] | str:
        """The answer ``text`` gives (``decision`` and ``reason``, or ``input``) for the tool proxy, or,
        if it is not one, what to tell the member."""
        return _approval(text) if self.kind == "approval" else _input(text, self.schema)


class Questions:
    """The open questions of one session by transaction, oldest first, and the calls they are about.

    Sessions are many and most never get a question: the state is made when the first tool call is seen."""

    __slots__ = ("_calls", "_open")

    def __init__(self) -> None:
        self._calls: OrderedDict[str, tuple[str, Any]] | None = None
        self._open: list[Question] = []

    def follow(self, event: Event) -> str | None:
        """Track one tool event; the text of the MESSAGE to send instead if it asks something."""
        body = event.payload if isinstance(event.payload, dict) else {}
        call_id = str(body.get("call_id", ""))
        calls = self._calls
        if calls is None:
            calls = self._calls = OrderedDict()
        if event.type == EventType.TOOL_CALL:
            calls[call_id] = (str(body.get("tool", "")), body.get("params"))
            while len(calls) > MAX_CALLS:
                calls.popitem(last=False)
            return None
        self._close(call_id)  # whatever the call does now, an earlier question of it is over
        if event.type == EventType.TOOL_DONE:
            calls.pop(call_id, None)
            return None
        status = body.get("status")
        if event.type != EventType.TOOL_UPDATE or status not in _ASKING:
            return None
        tool, params = calls.get(call_id, ("a tool", None))
        transaction = event.transaction or ""
        if status == ToolStatus.AWAITING_APPROVAL:
            self._add(Question(call_id, transaction, "approval", tool))
            return approval_text(tool, params)
        request: dict[str, Any] = body["request"] if isinstance(body.get("request"), dict) else {}
        schema: dict[str, Any] = request["schema"] if isinstance(request.get("schema"), dict) else {}
        self._add(Question(call_id, transaction, "input", tool, schema))
        return input_text(tool, str(request.get("message") or ""), schema)

    def first(self, transaction_id: str | None) -> Question | None:
        """The oldest question open in the transaction: what the member's next MESSAGE there answers."""
        return next((q for q in self._open if q.transaction_id == transaction_id), None)

    def close(self, question: Question) -> None:
        if question in self._open:
            self._open.remove(question)

    def kept(self) -> str:
        """The open questions as text for the session's window in a cluster ("" when none), so that the
        node the session moves to knows what the member's next MESSAGE answers (``restore``)."""
        if not self._open:
            return ""
        return json.dumps([[q.call_id, q.transaction_id, q.kind, q.tool, q.schema] for q in self._open])

    def restore(self, kept: str) -> None:
        """The open questions as another node ``kept`` them (the session moved here); a field that does
        not read as such is ignored (nothing is asked then, as before it was kept)."""
        try:
            rows = json.loads(kept) if kept else []
            questions = [
                Question(
                    str(call_id), str(transaction), "approval" if kind == "approval" else "input", str(tool), schema
                )
                for call_id, transaction, kind, tool, schema in rows
                if isinstance(schema, dict)
            ]
        except (ValueError, TypeError):
            return
        for question in questions:
            self._add(question)

    def retain(self, waiting: set[str]) -> None:
        """Keep only the questions about calls in ``waiting`` (those the log shows still waiting for an
        answer: one answered or ended after the window was last written is closed)."""
        self._open = [q for q in self._open if q.call_id in waiting]

    def _close(self, call_id: str) -> None:
        if self._open:
            self._open = [q for q in self._open if q.call_id != call_id]

    def _add(self, question: Question) -> None:
        self._open.append(question)
        del self._open[:-MAX_QUESTIONS]


def approval_text(tool: str, params: Any) -> str:
    arguments = json.dumps(params, ensure_ascii=False) if params else "no arguments"
    return (
        f"{tool} wants to run with {arguments} and needs your approval: "
        'reply yes or no (a reason may follow, as in "no, not now").'
    )


def input_text(tool: str, message: str, schema: dict[str, Any]) -> str:
    lines = [f"{tool} asks: {message}" if message else f"{tool} asks for input."]
    required = set(schema.get("required") or ())
    for name, spec in _properties(schema).items():
        title = spec.get("title")
        kind = spec.get("type", "string")
        choices = f", one of {', '.join(map(str, spec['enum']))}" if spec.get("enum") else ""
        label = f" ({title})" if title and title != name else ""
        lines.append(f"- {name}{label}: {kind}{choices}, {'required' if name in required else 'optional'}")
    lines.append('Reply with one "name: value" line per field, or a JSON object, or "decline".')
    return "\n".join(lines)


def _approval(text: str) -> dict[str, Any] | str:
    match = _FIRST_WORD.match(text)
    word = match.group(1).lower() if match else ""
    reason = match.group(2).strip() if match else ""
    if word in YES:
        return {"decision": "approve"}
    if word in NO:
        return {"decision": "reject", **({"reason": reason} if reason else {})}
    return 'Please answer the approval request first: reply yes or no (a reason may follow, as in "no, not now").'


def _input(text: str, schema: dict[str, Any]) -> dict[str, Any] | str:
    stripped = text.strip()
    if stripped.lower() in DECLINE:
        return {"decision": "decline"}
    properties = _properties(schema)
    values = _as_json(stripped) or _as_lines(stripped, properties)
    if isinstance(values, str):
        return values
    missing = [name for name in schema.get("required") or () if name not in values]
    if missing:
        return f'Still needed: {", ".join(missing)}. Reply with every field again, one "name: value" per line.'
    return {"input": values}


def _as_json(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _as_lines(text: str, properties: dict[str, dict[str, Any]]) -> dict[str, Any] | str:
    by_name = {name.lower(): name for name in properties}
    by_name |= {str(spec["title"]).lower(): name for name, spec in properties.items() if spec.get("title")}
    values: dict[str, Any] = {}
    for line in filter(str.strip, text.splitlines()):
        match = _FIELD_LINE.match(line)
        name = by_name.get(match.group(1).lower()) if match else None
        if match is None or name is None:
            if len(properties) == 1 and len(text.splitlines()) == 1:  # one field: the whole reply is its value
                name, raw = next(iter(properties)), text.strip()
            else:
                return f'Not understood: "{line.strip()}". Fields: {", ".join(properties)}; one "name: value" per line.'
        else:
            raw = match.group(2)
        value = _coerce(raw, properties[name])
        if value is None:
            return f'"{raw}" is not a valid {properties[name].get("type", "value")} for {name}.'
        values[name] = value
    return values


def _coerce(raw: str, spec: dict[str, Any]) -> Any:
    """``raw`` as the field's JSON type, or ``None`` if it is not one (or not one of its choices)."""
    kind = spec.get("type", "string")
    value: Any = raw
    try:
        if kind == "integer":
            value = int(raw)
        elif kind == "number":
            value = float(raw)
        elif kind == "boolean":
            value = {"true": True, "yes": True, "y": True, "false": False, "no": False, "n": False}[raw.lower()]
    except (ValueError, KeyError):
        return None
    if spec.get("enum") and value not in spec["enum"]:
        return None
    return value


def _properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {str(name): spec if isinstance(spec, dict) else {} for name, spec in properties.items()}
