"""A conversation as people read it: messages assembled from a transaction's log.

The log holds an answer as a MESSAGE_START, many MESSAGE_PARTs and a MESSAGE_END; a tool call as a
TOOL_CALL, its updates and a TOOL_DONE. ``Transcript`` folds those into items, each one message:
who wrote it, its whole text, when it started, whether it is still streaming, the stop reason its
MESSAGE_END gave, and the tool calls made with it and how they ended. A tool call belongs to the
latest item of its run (an agent that calls a tool before it writes gets an item of its own with
no text); a call a member made directly is an item of its own. A run that failed or was stopped
marks its last item, or leaves an item of its own when it wrote nothing.

``Transcript(limit)`` takes events in ``tseq`` order and starts at most ``limit`` items; after
that it only completes the items it has (``next_after`` is where the next page starts). Parts of
messages that started before the first event it saw are ignored, so pages never overlap.
"""

from __future__ import annotations

from typing import Any

from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import Channel, EventType

#: Tool statuses after which a call is over.
_DONE = {"OK", "ERROR", "CANCELLED"}


class Transcript:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        #: The ``tseq`` after which the next page starts (``None``: no item was left out).
        self.next_after: int | None = None
        self._messages: dict[str, dict[str, Any]] = {}
        self._audio_items: dict[str, dict[str, Any]] = {}  # a clip's message_id -> its item
        self._calls: dict[str, dict[str, Any]] = {}
        self._runs: dict[str, dict[str, Any]] = {}  # run_id -> its latest item
        self._agents: dict[str, str] = {}  # run_id -> the agent running it

    @property
    def complete(self) -> bool:
        """Whether every item has ended (its message and its tool calls)."""
        return all(item["state"] != "streaming" for item in self.items) and all(
            call["status"] in _DONE for call in self._calls.values()
        )

    def feed(self, event: Event) -> None:
        body: dict[str, Any] = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        kind = event.type
        if kind == EventType.MESSAGE or kind == EventType.MESSAGE_START:
            role = "user" if event.channel == Channel.USER else "agent"
            state = "streaming" if kind == EventType.MESSAGE_START else "complete"
            spoken = self._audio_items.get(str(body.get("audio_message_id", "")))
            if spoken is not None and not spoken["text"]:  # the transcript of a clip already listed
                spoken["text"], spoken["spoken"] = str(body.get("text", "")), True
                if body.get("message_id"):  # (a voice tester's find: the REST item had none, a typed one has)
                    spoken["message_id"] = str(body["message_id"])
                self._messages[str(body.get("message_id", ""))] = spoken
                return
            item = self._start(event, str(body.get("author", "")), role, str(body.get("text", "")), state)
            if item is not None:
                if body.get("message_id"):  # (a client joining while it streams goes on with its parts)
                    item["message_id"] = str(body["message_id"])
                self._messages.setdefault(str(body.get("message_id", "")), item)  # (an id reused: the first keeps it)
        elif kind == EventType.MESSAGE_PART:
            if (message := self._messages.get(str(body.get("message_id", "")))) is not None:
                message["text"] += str(body.get("text", ""))
        elif kind == EventType.MESSAGE_UPDATE:
            message = self._messages.get(str(body.get("message_id", "")))
            if message is not None and message["author"] == body.get("author", message["author"]):  # (its author's)
                message["text"], message["edited"] = str(body.get("text", "")), True
        elif kind == EventType.MESSAGE_END:
            if (message := self._messages.get(str(body.get("message_id", "")))) is not None:
                message["state"] = "complete"
                if body.get("stop_reason"):
                    message["stop_reason"] = body["stop_reason"]
        elif kind in (EventType.AUDIO, EventType.AUDIO_CHUNK):
            self._audio(event, body)
        elif kind == EventType.RUN_STARTED and event.run_id is not None:
            self._agents[event.run_id] = str(body.get("agent", ""))
        elif kind == EventType.TOOL_CALL:
            self._call(event, body)
        elif kind in (EventType.TOOL_UPDATE, EventType.TOOL_DONE):
            if (call := self._calls.get(str(body.get("call_id", "")))) is not None:
                call["status"] = str(body.get("status", call["status"]))
                if kind == EventType.TOOL_DONE:
                    _outcome(call, body)
        elif kind in (EventType.RUN_ERROR, EventType.RUN_FINISHED) and event.run_id is not None:
            self._run_ended(event, body)

    def _audio(self, event: Event, body: dict[str, Any]) -> None:
        """A clip is one item however many chunks it came in; a spoken answer's sentences (chunks with
        the ``message_id`` of its text) and a spoken message's chunks (named by ``audio_message_id``)
        belong to that message."""
        audio_id = str(body.get("message_id", ""))
        item = self._messages.get(audio_id) or self._audio_items.get(audio_id)
        if item is None:
            author = self._agents.get(event.run_id or "", str(body.get("author", "")))
            item = self._start(event, author, _role(event), "", "complete", run=False)
            if item is None:
                return
            self._audio_items[audio_id] = item
        audio = item.setdefault("audio", {"message_id": audio_id, "mime": body.get("mime")})
        if body.get("duration_ms") is not None:
            audio["duration_ms"] = audio.get("duration_ms", 0) + int(body["duration_ms"])

    def _start(
        self, event: Event, author: str, role: str, text: str, state: str, *, run: bool = True
    ) -> dict[str, Any] | None:
        if len(self.items) >= self.limit:
            if self.next_after is None and event.tseq is not None:
                self.next_after = event.tseq - 1
            return None
        item: dict[str, Any] = {
            "id": event.id,
            "tseq": event.tseq,
            "author": author,
            "role": role,
            "text": text,
            "time": _ms(event.ts),
            "state": state,
            "tool_calls": [],
        }
        self.items.append(item)
        if run and event.run_id is not None:
            self._runs[event.run_id] = item
        return item

    def _call(self, event: Event, body: dict[str, Any]) -> None:
        caller = str(body.get("caller", ""))
        params = body.get("params")
        call: dict[str, Any] = {
            "call_id": str(body.get("call_id", "")),
            "tool": str(body.get("tool", "")),
            "arguments": params if isinstance(params, dict) else {},
            "caller": caller,
            "status": "RUNNING",
        }
        item = self._runs.get(event.run_id) if event.run_id is not None else None
        if item is None:
            item = self._start(event, caller, "agent" if event.run_id is not None else "user", "", "complete")
        if item is not None:
            item["tool_calls"].append(call)
            self._calls[call["call_id"]] = call

    def _run_ended(self, event: Event, body: dict[str, Any]) -> None:
        assert event.run_id is not None
        status = "ERROR" if event.type == EventType.RUN_ERROR else str(body.get("status", "OK"))
        item = self._runs.get(event.run_id)
        if item is not None and item["state"] == "streaming":  # the run is over, so is its message
            item["state"] = "complete"
        if status == "OK" or (item is None and event.run_id not in self._agents):  # a run of an earlier page
            return
        if item is None:  # stopped before it wrote anything: the stop is its trace
            item = self._start(event, self._agents.get(event.run_id, ""), "agent", "", "complete")
        if item is not None:
            item["run"] = {"status": status}
            if event.type == EventType.RUN_ERROR:
                item["run"]["error"] = {k: body[k] for k in ("code", "message") if k in body}


def _ms(ts: str) -> int | None:
    """An envelope's ``ts`` (epoch milliseconds, as text) as a number; ``None`` if it is not one."""
    try:
        return int(ts)
    except (TypeError, ValueError):
        return None


def _role(event: Event) -> str:
    return "user" if event.channel in (Channel.USER, Channel.AUDIO_IN) else "agent"


def _outcome(call: dict[str, Any], body: dict[str, Any]) -> None:
    result = body.get("result")
    if isinstance(result, dict):
        content = result.get("content")
        texts = [str(c.get("text", "")) for c in content if isinstance(c, dict)] if isinstance(content, list) else []
        call["result"] = "\n".join(text for text in texts if text)
        if result.get("structuredContent") is not None:
            call["structured"] = result["structuredContent"]
    if isinstance(body.get("error"), dict):
        call["error"] = {k: body["error"][k] for k in ("code", "message") if k in body["error"]}


def summary(head: list[Event], tail: list[Event], title_chars: int = 80, preview_chars: int = 140) -> dict[str, Any]:
    """What a conversation list shows of one: ``title`` (its first user message, cut; ``None``
    before one), ``preview`` (its latest message with text, cut) and ``last_activity`` (the time
    of its latest event but ``INFO``, ms, as ``Transaction.active_at``; ``None`` for an empty log),
    from the first and last events of its log."""
    title = next((i["text"] for i in _items(head) if i["role"] == "user" and i["text"].strip()), None)
    preview = next((i["text"] for i in reversed(_items(tail)) if i["text"].strip()), "")
    last = next((event for event in reversed(tail) if event.type != EventType.INFO), None)
    return {
        "title": _cut(title, title_chars) if title is not None else None,
        "preview": _cut(preview, preview_chars),
        "last_activity": _ms(last.ts) if last is not None else None,
    }


def _items(events: list[Event]) -> list[dict[str, Any]]:
    transcript = Transcript(limit=len(events))
    for event in events:
        transcript.feed(event)
    return transcript.items


def _cut(text: str, chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1].rstrip() + "…"
