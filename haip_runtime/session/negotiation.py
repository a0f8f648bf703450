"""``accept_events`` negotiation: what each client is sent instead of events it did not ask for.

PROTOCOL.md section 12. One ``Downgrader`` per session; it keeps the text of streamed messages
so a client without ``MESSAGE_START`` gets one whole ``MESSAGE`` at ``MESSAGE_END``. A client
without ``RUN_*`` gets no run events at all, nor the INFOs about waiting messages (the reference SDK
logs every INFO as unknown), but a ``RUN_ERROR`` still reaches it as ``ERROR``. A client without
``TOOL_CALL`` and ``TOOL_UPDATE`` is asked for approvals and input in words (``questions.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ALL_EVENTS, TRANSACTION_ERA_EVENTS, Channel, EventType
from haip_runtime.session.questions import Questions

_TOOL_EVENTS = {"TOOL_CALL": "call", "TOOL_UPDATE": "update", "TOOL_DONE": "done", "TOOL_CANCEL": "cancel"}
_NEVER_DOWNGRADED = {"PAUSE_CHANNEL", "RESUME_CHANNEL"}
#: Streamed text kept per message for a client that gets it whole; a bound against runaway streams.
MAX_BUFFERED_STREAM_CHARS = 4 * 1024 * 1024


def negotiate(accept_events: Iterable[str] | None) -> frozenset[str]:
    """The types a client gets. Unknown names are ignored; HAI, ERROR, PING, PONG always pass."""
    if accept_events is None:
        return TRANSACTION_ERA_EVENTS
    wanted = {name for name in accept_events if name in ALL_EVENTS}
    return frozenset(wanted | {"HAI", "ERROR", "PING", "PONG"})


class Downgrader:
    """Turns one outbound event into what this client accepts (zero, one or two events)."""

    def __init__(self, accepted: frozenset[str], *, may_answer: bool = True) -> None:
        """``may_answer``: whether the member may answer a tool call (their roles let them send
        ``TOOL_UPDATE``); one who may not is never asked in words, so their words answer nothing."""
        self.accepted = accepted
        self._streams: dict[str, _Buffered] = {}
        self._in_words = may_answer and "MESSAGE" in accepted and not {"TOOL_CALL", "TOOL_UPDATE"} & accepted
        #: Approvals and input requests asked in words (only a client without TOOL_CALL and TOOL_UPDATE, allowed
        #: to answer, is asked so; the others share one that stays empty).
        self.questions = Questions() if self._in_words else _NO_QUESTIONS

    def adapt(self, event: Event) -> list[Event]:
        kind = event.type
        if kind == EventType.INFO and "RUN_STARTED" not in self.accepted and _about_runs(event):
            return []
        if kind in self.accepted:
            return [self._object_message_for_legacy(event)] if kind == EventType.MESSAGE else [event]
        if kind in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END"):
            return self._stream_to_message(event)
        if kind in _TOOL_EVENTS:
            question = self.questions.follow(event) if self._in_words else None
            if question is not None:
                return [self._agent_message(event, question)]
            return self._as_info(event, "tool", _TOOL_EVENTS[kind])
        if kind == EventType.RUN_ERROR and isinstance(event.payload, dict) and "ERROR" in self.accepted:
            body = event.payload  # RUN_ERROR {run_id, code, message}, as the transaction made it
            code, message, run_id = body.get("code", "INTERNAL_ERROR"), body.get("message", ""), body.get("run_id")
            error = error_body(str(code), str(message), related_id=str(run_id) if run_id else None)
            return [event.with_changes(id=new_id(), type=EventType.ERROR, payload=error, channel=Channel.SYSTEM)]
        if kind == EventType.AUDIO_CHUNK and "AUDIO" in self.accepted:
            return [event.with_changes(type=EventType.AUDIO)]
        if kind == EventType.AUDIO and "AUDIO_CHUNK" in self.accepted:
            return [event.with_changes(type=EventType.AUDIO_CHUNK)]
        return []  # PAUSE/RESUME_CHANNEL and anything else the client did not ask for

    def _object_message_for_legacy(self, event: Event) -> Event:
        # A client of the transaction era shows MESSAGE payloads as text: give it the string form.
        if isinstance(event.payload, dict) and "MESSAGE_START" not in self.accepted:
            return event.with_changes(payload=str(event.payload.get("text", "")))
        return event

    def _stream_to_message(self, event: Event) -> list[Event]:
        payload: dict[str, Any] = event.payload if isinstance(event.payload, dict) else {}
        message_id = str(payload.get("message_id", ""))
        if event.type == EventType.MESSAGE_START:
            self._streams[message_id] = _Buffered()
        elif event.type == EventType.MESSAGE_PART:
            self._streams.setdefault(message_id, _Buffered()).add(str(payload.get("text", "")))
        elif event.type == EventType.MESSAGE_END:
            buffered = self._streams.pop(message_id, None)
            if "MESSAGE" in self.accepted:
                text = "" if buffered is None else "".join(buffered.parts)
                return [event.with_changes(type=EventType.MESSAGE, payload=text, channel=Channel.AGENT)]
        return []

    def _agent_message(self, event: Event, text: str) -> Event:
        payload: dict[str, Any] | str = text
        if "MESSAGE_START" in self.accepted:
            payload = {"text": text, "message_id": new_id(), "author": "runtime"}
        return event.with_changes(id=new_id(), type=EventType.MESSAGE, payload=payload, channel=Channel.AGENT)

    def _as_info(self, event: Event, family: str, action: str) -> list[Event]:
        if "INFO" not in self.accepted:
            return []
        body = event.payload if isinstance(event.payload, dict) else {"value": event.payload}
        return [event.with_changes(type=EventType.INFO, payload={"event": family, "action": action, **body})]


_NO_QUESTIONS = Questions()


def _about_runs(event: Event) -> bool:
    """An INFO of the run family (``run.queued``, ``run.unqueued``)."""
    return isinstance(event.payload, dict) and str(event.payload.get("event", "")).startswith("run.")


class _Buffered:
    """The parts of one streamed message, with their running length (so each part costs O(1))."""

    __slots__ = ("chars", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0

    def add(self, text: str) -> None:
        if self.chars < MAX_BUFFERED_STREAM_CHARS:
            self.parts.append(text)
            self.chars += len(text)
