"""The AG-UI mapping: ``AguiMember`` turns a transaction's HAIP events into AG-UI 1.0 events.

One member per thread and user, a member of the transaction like a session: it is handed every
event (``deliver``), maps those of its open AG-UI run (docs/protocol-guide.md section 12 has the
table), keeps them numbered for ``Last-Event-ID``, and turns approvals and input requests of its
own runs' tool calls into interrupts. What its runs do while no AG-UI run is open (after an
interrupt) is held for the next one. What other members' runs say during an AG-UI run reaches it as
whole messages once said (their streams and tool calls are not the client's to follow: a run of
theirs still streaming when ours ends would leave a text message open, which AG-UI refuses).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from ag_ui.core import (
    PROTOCOL_VERSION,
    ActivitySnapshotEvent,
    BaseEvent,
    Interrupt,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TokenUsage,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.core.events import RunFinishedCancelledOutcome, RunFinishedInterruptOutcome

from haip_runtime.auth.tokens import Principal
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.events import ALL_EVENTS, Channel, ErrorCode, EventType
from haip_runtime.tools.proxy import check_answer

#: AG-UI events a thread keeps for clients that reconnect with ``Last-Event-ID``.
JOURNAL_EVENTS = 2048
#: Other members' runs' streamed messages gathered at once (to be sent whole when they end); past it the oldest goes.
OTHERS_STREAMING = 64
#: Ids remembered of runs given up (a client that went away, then started another run): what more comes
#: of them is not sent; and of text messages an AG-UI run ended early (it closed with them open).
FORGOTTEN = 256
APPROVAL_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["approved"],
}


def dump(event: BaseEvent) -> str:
    return event.model_dump_json(by_alias=True, exclude_none=True)


#: The HAIP events an AG-UI user is said to accept (the transaction asks, e.g. before it speaks an answer).
_ACCEPTED = frozenset(ALL_EVENTS) - {EventType.AUDIO, EventType.AUDIO_CHUNK}


class AguiMember:
    """One AG-UI user in one thread: a member of its transaction, turning events into AG-UI's."""

    def __init__(self, principal: Principal, thread_id: str) -> None:
        self.id = f"ag-ui:{new_id()}"
        self.principal = principal
        self.thread_id = thread_id
        self.transactions: set[str] = set()
        #: (SSE id, AG-UI event as JSON, whether it ends a run)
        self.journal: deque[tuple[int, str, bool]] = deque(maxlen=JOURNAL_EVENTS)
        self.last_id = 0
        self.run_id: str | None = None  # the AG-UI run open now, if any
        self.runs: set[str] = set()  # HAIP runs the AG-UI user's messages started, until they end
        #: Message ids of this user waiting in the transaction's run queue: their runs are ours when they start.
        self.waiting: set[str] = set()
        self.interrupts: dict[str, dict[str, Any]] = {}  # interrupt id (= call id) -> what it asked
        self.calls: set[str] = set()  # tool calls of those runs
        self.failure: dict[str, Any] | None = None
        self.output_tokens = 0
        self.cancelled = False
        #: AG-UI events made while no AG-UI run is open but our HAIP runs go on (after an interrupt).
        self.held: deque[BaseEvent] = deque(maxlen=JOURNAL_EVENTS)
        #: Interrupts that were settled some other way (a HAIP member answered, the call ended).
        self.settled: deque[str] = deque(maxlen=256)
        #: Called when the member has become idle (the door lets it leave the transaction).
        self.on_idle: Callable[[AguiMember], None] | None = None
        #: Clients reading the journal now (``frames``): none means the open run's client went away.
        self.readers = 0
        #: An AG-UI run was opened and its client has not begun to read yet: it counts as reading.
        self.reader_due = False
        #: This member started the thread or added an agent: the greeting (``on_start``) is its run.
        self.greeting_due = False
        self._unread = anyio.Event()
        #: Text messages started in the journal and not ended.
        self._open_texts: dict[str, None] = {}
        #: Other runs' streamed messages, their text so far, sent whole at their end (``_others_said``).
        self._others: dict[str, list[str]] = {}
        #: Runs given up: nothing more of them is sent.
        self._forgotten: deque[str] = deque(maxlen=FORGOTTEN)
        #: Text messages an AG-UI run ended while they went on (an interrupt, a failure): the next
        #: run that carries more of them starts them again (same id: the client appends to it).
        self._cut: deque[str] = deque(maxlen=FORGOTTEN)
        self._changed = anyio.Event()

    @property
    def accepted(self) -> frozenset[str]:
        """What an AG-UI client takes: every event but audio (AG-UI carries none, so none is made for it)."""
        return _ACCEPTED

    @property
    def user(self) -> str:
        return self.principal.user

    # --- out: the journal --------------------------------------------------------------------------

    def emit(self, event: BaseEvent, ends: bool = False) -> None:
        if self.run_id is None:  # our HAIP runs go on between two AG-UI runs: for the next one
            self.held.append(event)
            return
        if isinstance(event, TextMessageStartEvent):
            self._open_texts[event.message_id] = None
        elif isinstance(event, TextMessageEndEvent):
            self._open_texts.pop(event.message_id, None)
        self.last_id += 1
        self.journal.append((self.last_id, dump(event), ends))
        self._changed.set()
        self._changed = anyio.Event()

    async def frames(self, after: int) -> AsyncIterator[str]:
        """SSE frames of the journal after id ``after``, live, until one that ends a run."""
        self.readers += 1
        self.reader_due = False
        try:
            while True:
                for number, data, ends in list(self.journal):
                    if number > after:
                        after = number
                        yield f"id: {self.thread_id}:{number}\ndata: {data}\n\n"
                        if ends:
                            return
                await self._changed.wait()
        finally:
            self.readers -= 1
            if not self.readers:
                self._unread.set()
                self._unread = anyio.Event()

    async def unread(self, timeout: float) -> bool:
        """Whether no client reads the journal (the open run's went away), waiting up to ``timeout``
        seconds for one that is going: a client that aborts its run and starts another at once may
        be quicker than the server is to see the first connection closed."""
        with anyio.move_on_after(timeout):
            while self.readers or self.reader_due:
                await self._unread.wait()
        return not (self.readers or self.reader_due)

    def abandon(self) -> list[str]:
        """The open AG-UI run's client went away and starts another run (a "stop", then a new
        message): end the open one cancelled, and forget its HAIP runs and waiting messages, whose
        ids are returned for the caller to cancel (what more comes of them is not sent)."""
        cancelled = [*self.runs, *self.waiting]
        self._forgotten.extend(self.runs)
        self.runs.clear()
        self.waiting.clear()
        self.calls.clear()
        self.cancelled = True
        self.close(outcome=RunFinishedCancelledOutcome())
        return cancelled

    def open(self, run_id: str) -> None:
        """Start an AG-UI run: RUN_STARTED, then what our HAIP runs did since the last one ended."""
        self.run_id = run_id
        self.reader_due = True  # (until its client's first read: a run opened a moment ago is not abandoned)
        self.emit(RunStartedEvent(thread_id=self.thread_id, run_id=run_id, protocol_version=PROTOCOL_VERSION))
        held, self.held = self.held, deque(maxlen=JOURNAL_EVENTS)
        for event in held:
            self.emit(event)

    def close(self, **outcome: Any) -> None:
        """End the open AG-UI run: finished (with an outcome), or failed if a HAIP run failed."""
        run_id = self.run_id
        if run_id is None:
            return
        usage = [TokenUsage(output_tokens=self.output_tokens)] if self.output_tokens else None
        for message_id in list(self._open_texts):  # (a failure, an interrupt mid-stream): AG-UI ends none open
            self.emit(TextMessageEndEvent(message_id=message_id))
            self._cut.append(message_id)
        if self.failure is not None:
            self.emit(RunErrorEvent(message=self.failure["message"], code=self.failure["code"], usage=usage), True)
        else:
            self.emit(RunFinishedEvent(thread_id=self.thread_id, run_id=run_id, usage=usage, **outcome), True)
        self.run_id, self.failure, self.cancelled, self.output_tokens = None, None, False, 0
        self.greeting_due = False  # (an agent that does not greet: nothing is awaited)
        if self.idle and self.on_idle is not None:
            self.on_idle(self)

    @property
    def idle(self) -> bool:
        """No AG-UI run open and nothing of ours going on or waiting: the user has left, for now."""
        return self.run_id is None and not self.runs and not self.waiting and not self.interrupts

    def settle(self) -> None:
        """Close the open run if nothing is left for it: it waits on interrupts, or its runs ended."""
        if self.run_id is None:
            return
        if self.interrupts:
            interrupts = [Interrupt(**asked) for asked in self.interrupts.values()]
            self.close(outcome=RunFinishedInterruptOutcome(interrupts=interrupts))
        elif not self.runs and not self.waiting:
            self.close(outcome=RunFinishedCancelledOutcome()) if self.cancelled else self.close()

    # --- in: the transaction's events --------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        if event.run_id is not None and event.run_id in self._forgotten:
            return  # a run given up with the client that started it
        payload = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        kind = event.type
        if kind in (EventType.RUN_FINISHED, EventType.RUN_ERROR) and event.run_id in self.runs:
            self.runs.discard(event.run_id)
            self.cancelled = self.cancelled or payload.get("status") == "CANCELLED"
            if kind == EventType.RUN_ERROR:
                self.failure = {"code": payload.get("code"), "message": payload.get("message") or "the run failed"}
            self.settle()
            return
        if kind == EventType.RUN_STARTED and payload.get("message_id") in self.waiting:
            self.waiting.discard(str(payload["message_id"]))  # a queued message of ours started at last
            self.runs.add(str(payload["run_id"]))
        elif kind == EventType.RUN_STARTED and "message_id" not in payload and self.greeting_due:
            self.greeting_due = False  # the greeting of the thread, or of the agent, this member's run brought
            self.runs.add(str(payload["run_id"]))
        elif (
            kind == EventType.INFO
            and payload.get("event") == "run.unqueued"
            and payload.get("message_id") in self.waiting
        ):
            self.waiting.discard(str(payload["message_id"]))
            self.cancelled = True
            self.settle()
            return
        if kind == EventType.TOOL_UPDATE and payload.get("call_id") in self.calls:
            self._tool_update(payload)
        if event.run_id is not None and event.run_id not in self.runs:
            # (between AG-UI runs too: a message streaming across two of them came with its middle missing)
            self._others_said(kind, payload)
            return
        if self.run_id is None and not self.runs:
            return  # between AG-UI runs, nothing of ours going on: the transaction's log has it
        if kind in (EventType.MESSAGE_PART, EventType.MESSAGE_END) and payload.get("message_id") in self._cut:
            self._cut.remove(payload["message_id"])  # ended early, when an AG-UI run closed with it open: again
            self.emit(TextMessageStartEvent(message_id=payload["message_id"], role="assistant"))
        if kind == EventType.MESSAGE:
            role = "user" if event.channel == Channel.USER else "assistant"
            message_id = str(payload.get("message_id") or event.id)
            self.emit(TextMessageStartEvent(message_id=message_id, role=role))
            self.emit(TextMessageContentEvent(message_id=message_id, delta=str(payload.get("text", ""))))
            self.emit(TextMessageEndEvent(message_id=message_id))
        elif kind == EventType.MESSAGE_START:
            self.emit(TextMessageStartEvent(message_id=payload["message_id"], role="assistant"))
        elif kind == EventType.MESSAGE_PART:
            self.emit(TextMessageContentEvent(message_id=payload["message_id"], delta=payload.get("text", "")))
        elif kind == EventType.MESSAGE_END:
            self.output_tokens += int(payload.get("tokens") or 0)
            self.emit(TextMessageEndEvent(message_id=payload["message_id"]))
        elif kind == EventType.TOOL_CALL:
            call_id = str(payload["call_id"])
            if event.run_id in self.runs:
                self.calls.add(call_id)
            self.emit(ToolCallStartEvent(tool_call_id=call_id, tool_call_name=payload["tool"]))
            self.emit(ToolCallArgsEvent(tool_call_id=call_id, delta=json.dumps(payload.get("params") or {})))
            self.emit(ToolCallEndEvent(tool_call_id=call_id))
        elif kind == EventType.TOOL_UPDATE and "status" in payload:
            content = {k: payload[k] for k in ("call_id", "status", "progress", "total", "message") if k in payload}
            activity = ActivitySnapshotEvent(
                message_id=f"tool-{payload['call_id']}", activity_type="tool_progress", content=content
            )
            self.emit(activity)
        elif kind == EventType.TOOL_DONE:
            self.calls.discard(str(payload["call_id"]))
            self._settle_interrupt(str(payload["call_id"]))
            result = payload.get("result") if payload.get("status") == "OK" else payload.get("error")
            text = tool_text(result, payload.get("status", ""))
            self.emit(
                ToolCallResultEvent(message_id=new_id(), tool_call_id=payload["call_id"], content=text, role="tool")
            )
        if kind == EventType.TOOL_UPDATE:
            self.settle()

    def left(self) -> None:
        """The member left the transaction (idle between runs): what it gathered of others' messages would
        miss what is said meanwhile, so it goes (such a message is not sent: the history has it)."""
        self._others.clear()

    def _others_said(self, kind: str, payload: dict[str, Any]) -> None:
        """Another member's run: its messages, each whole once said, while an AG-UI run is open (gathered
        between AG-UI runs too, while this member is in the transaction: one may end during the next)."""
        message_id = str(payload.get("message_id") or "")
        if kind == EventType.MESSAGE_START:
            self._others[message_id] = []
            if len(self._others) > OTHERS_STREAMING:
                del self._others[next(iter(self._others))]
        elif kind == EventType.MESSAGE_PART and message_id in self._others:
            self._others[message_id].append(str(payload.get("text", "")))
        elif kind in (EventType.MESSAGE, EventType.MESSAGE_END) and self.run_id is not None:
            parts = self._others.pop(message_id, None)
            text = str(payload.get("text", "")) if kind == EventType.MESSAGE else None
            if parts is not None:
                text = "".join(parts)
            if text is not None and message_id:
                self.emit(TextMessageStartEvent(message_id=message_id, role="assistant"))
                self.emit(TextMessageContentEvent(message_id=message_id, delta=text))
                self.emit(TextMessageEndEvent(message_id=message_id))
        elif kind == EventType.MESSAGE_END:
            self._others.pop(message_id, None)

    def _tool_update(self, payload: dict[str, Any]) -> None:
        """An approval or input request of one of our calls becomes an interrupt; any other status ends it."""
        call_id = str(payload["call_id"])
        status = payload.get("status")
        if status == "AWAITING_APPROVAL":
            message = payload.get("message") or "approve this tool call?"
            asked = {"reason": "tool_approval", "response_schema": APPROVAL_SCHEMA, "message": message}
        elif status == "INPUT_REQUIRED":
            request = payload.get("request") or {}
            schema = request.get("schema") if isinstance(request.get("schema"), dict) else {"type": "object"}
            asked = {"reason": "input_required", "response_schema": schema, "message": request.get("message")}
        else:
            self._settle_interrupt(call_id)
            return
        self.interrupts[call_id] = {"id": call_id, "tool_call_id": call_id, **asked}

    def _settle_interrupt(self, call_id: str) -> None:
        if self.interrupts.pop(call_id, None) is not None:
            self.settled.append(call_id)


def tool_text(result: Any, status: str) -> str:
    """A TOOL_CALL_RESULT's content: the MCP result's text blocks, else the result as JSON."""
    if isinstance(result, dict) and isinstance(result.get("content"), list):
        texts = [block.get("text", "") for block in result["content"] if isinstance(block, dict)]
        if any(texts):
            return "\n".join(texts)
    if result is None:
        return status
    return result if isinstance(result, str) else json.dumps(result)


def newest_user(request: RunAgentInput) -> tuple[int, Any] | None:
    """The newest user message of ``request``, with its index in ``messages``."""
    for index in range(len(request.messages) - 1, -1, -1):
        if request.messages[index].role == "user":
            return index, request.messages[index]
    return None


def user_text(request: RunAgentInput) -> tuple[int, str] | None:
    """The newest user message's index and text (the transaction keeps the rest of the conversation);
    ``INVALID_PAYLOAD`` if it holds anything but text (an image, audio, a document): not taken here,
    and not to be dropped without a word."""
    found = newest_user(request)
    if found is None:
        return None
    index, message = found
    content = message.content
    if isinstance(content, str):
        return index, content
    for number, part in enumerate(content):
        if getattr(part, "type", "text") != "text":
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"only text is taken in a user message: its part {number} is {getattr(part, 'type', '?')!r}",
                detail={"where": f"/messages/{index}/content/{number}"},
            )
    return index, "".join(getattr(part, "text", "") for part in content)


#: The longest id a run, a message or a resume entry may have (as a thread's): ids go into every member's frames.
MAX_ID = 128


def check_ids(run: RunAgentInput) -> None:
    """``INVALID_PAYLOAD`` for a ``runId``, the newest user message's ``id`` or an ``interruptId`` over
    ``MAX_ID`` characters or not printable: what of the body goes into frames (a prober's find: a message
    id of 3,000,000 characters went into the log and killed, at every join and resume, members whose
    clients hold the HAI's frame limit). The older messages' ids are not read (a reviewer's find: one a
    HAIP member gave, shown to the client, would have locked it out of the thread for good)."""
    named = [("/runId", run.run_id)]
    newest = newest_user(run)
    if newest is not None:
        named.append((f"/messages/{newest[0]}/id", newest[1].id))
    named += [(f"/resume/{index}/interruptId", entry.interrupt_id) for index, entry in enumerate(run.resume or ())]
    for where, value in named:
        if value is not None and (len(value) > MAX_ID or not str(value).isprintable()):
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"an id is at most {MAX_ID} printable characters",
                detail={"where": where},
            )


def check_resume(member: AguiMember | None, run: RunAgentInput) -> None:
    """Every resume entry answers an interrupt of this thread, open or settled meanwhile (by a HAIP
    member, or its call ended), with what it asked: an approval ``{approved: true|false, reason?}``
    (edited arguments are refused: no approval policy permits them), an input that fits its schema.
    Checked before anything is done (a prober's find: an input that did not fit was only logged, the
    stream hung, and the interrupt, taken out, could not be answered again)."""
    for index, entry in enumerate(run.resume or ()):
        asked = member.interrupts.get(entry.interrupt_id) if member is not None else None
        if asked is None:
            if member is not None and entry.interrupt_id in member.settled:
                continue
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"no open interrupt {entry.interrupt_id!r} to resume",
                detail={"where": f"/resume/{index}/interruptId"},
            )
        if entry.status != "resolved":
            continue  # cancelled: rejected, or declined
        where = f"/resume/{index}/payload"
        payload = entry.payload
        if not isinstance(payload, dict):
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD, "a resolved interrupt's payload is an object", detail={"where": where}
            )
        if asked["reason"] == "tool_approval":
            if "editedArgs" in payload:
                raise ProtocolError(
                    ErrorCode.INVALID_PAYLOAD, "this runtime's approval policy does not permit edited arguments"
                )
            # (a tester's finds: the message named no place, and a reason that is no text was taken, as
            # HAIP refuses it)
            wrong = "approved" if not isinstance(payload.get("approved"), bool) else "reason"
            if wrong == "approved" or not isinstance(payload.get("reason", ""), str):
                raise ProtocolError(
                    ErrorCode.INVALID_PAYLOAD,
                    f"an approval's payload is {{approved: true|false, reason?: text}} (at {where}/{wrong})",
                    detail={"where": f"{where}/{wrong}"},
                )
        else:
            try:
                check_answer("input", asked.get("response_schema"), {"input": payload}, "")
            except ProtocolError as refused:  # (its where is HAIP's: /payload/input/<field>)
                haip = str((refused.detail or {}).get("where", ""))
                field = haip.removeprefix("/payload/input")
                # The message names the same place as ``where`` (a front-end developer's find: it said HAIP's).
                said = refused.message.replace(f"at {haip}", f"at {where + field}") if haip else refused.message
                raise ProtocolError(refused.code, said, detail={"where": where + field}) from None
