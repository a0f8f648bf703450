"""The AG-UI door: ``POST /ag-ui/{agent}`` takes AG-UI 1.0's ``RunAgentInput`` and answers with its
events over SSE. The whole mapping lives here (docs/protocol-guide.md has it as a table).

It is another door onto the same transactions, not a parallel system. AG-UI's ``threadId`` is the
transaction id: the first run on a thread starts the transaction (through the hub's ``begin``,
as TRANSACTION_START does), later runs continue it, and HAIP members who join it see the AG-UI
user's messages and the agent's answers live. The AG-UI user takes part as an ``AguiMember``, one
per thread and user, a member of the transaction like a session: it is handed every event
(``deliver``) and turns those of its open run into AG-UI events. A message goes in through
``Transaction.user_message``, as a HAIP MESSAGE does; approvals and input requests end the AG-UI
run with an interrupt outcome, and the next run's ``resume`` answers them through the tool proxy,
as a member's TOOL_UPDATE does (the HAIP run waits meanwhile).

Beyond AG-UI: every event has an SSE ``id`` (a per-thread counter), and a POST to the same thread
with ``Last-Event-ID`` gets what came after it, then the rest of the run live.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

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
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from haip_runtime.auth.tokens import Principal
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub import lifecycle
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.transports.http import http_credentials, refused_origin

if TYPE_CHECKING:
    from haip_runtime.hub.router import Hub
    from haip_runtime.server.doors import Doorway

logger = logging.getLogger(__name__)

#: AG-UI events a thread keeps for clients that reconnect with ``Last-Event-ID``.
JOURNAL_EVENTS = 2048
#: AG-UI members kept (one per thread and user); the least recently used leaves its transaction past this.
MAX_MEMBERS = 4096
#: The largest RunAgentInput taken (it carries the client's whole message history).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: The HTTP status of each error a request is refused with (others: 400).
STATUS = {
    ErrorCode.UNAUTHORIZED: 403,
    ErrorCode.AGENT_NOT_FOUND: 404,
    ErrorCode.TRANSACTION_NOT_FOUND: 404,
    ErrorCode.RESUME_FAILED: 404,
    ErrorCode.REPLAY_TOO_OLD: 410,
    ErrorCode.RUN_LIMIT_EXCEEDED: 429,
    ErrorCode.RATE_LIMITED: 429,
}
APPROVAL_SCHEMA = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["approved"],
}


def dump(event: BaseEvent) -> str:
    return event.model_dump_json(by_alias=True, exclude_none=True)


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
        self._changed = anyio.Event()

    @property
    def user(self) -> str:
        return self.principal.user

    # --- out: the journal --------------------------------------------------------------------------

    def emit(self, event: BaseEvent, ends: bool = False) -> None:
        if self.run_id is None:  # our HAIP runs go on between two AG-UI runs: for the next one
            self.held.append(event)
            return
        self.last_id += 1
        self.journal.append((self.last_id, dump(event), ends))
        self._changed.set()
        self._changed = anyio.Event()

    async def frames(self, after: int) -> AsyncIterator[str]:
        """SSE frames of the journal after id ``after``, live, until one that ends a run."""
        while True:
            for number, data, ends in list(self.journal):
                if number > after:
                    after = number
                    yield f"id: {self.thread_id}:{number}\ndata: {data}\n\n"
                    if ends:
                        return
            await self._changed.wait()

    def open(self, run_id: str) -> None:
        """Start an AG-UI run: RUN_STARTED, then what our HAIP runs did since the last one ended."""
        self.run_id = run_id
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
        if self.failure is not None:
            self.emit(RunErrorEvent(message=self.failure["message"], code=self.failure["code"], usage=usage), True)
        else:
            self.emit(RunFinishedEvent(thread_id=self.thread_id, run_id=run_id, usage=usage, **outcome), True)
        self.run_id, self.failure, self.cancelled, self.output_tokens = None, None, False, 0
        if self.idle and self.on_idle is not None:
            self.on_idle(self)

    @property
    def idle(self) -> bool:
        """No AG-UI run open and nothing of ours going on or waiting: the user has left, for now."""
        return self.run_id is None and not self.runs and not self.interrupts

    def settle(self) -> None:
        """Close the open run if nothing is left for it: it waits on interrupts, or its runs ended."""
        if self.run_id is None:
            return
        if self.interrupts:
            interrupts = [Interrupt(**asked) for asked in self.interrupts.values()]
            self.close(outcome=RunFinishedInterruptOutcome(interrupts=interrupts))
        elif not self.runs:
            self.close(outcome=RunFinishedCancelledOutcome()) if self.cancelled else self.close()

    # --- in: the transaction's events --------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        payload = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        kind = event.type
        if kind in (EventType.RUN_FINISHED, EventType.RUN_ERROR) and event.run_id in self.runs:
            self.runs.discard(event.run_id)
            self.cancelled = self.cancelled or payload.get("status") == "CANCELLED"
            if kind == EventType.RUN_ERROR:
                self.failure = {"code": payload.get("code"), "message": payload.get("message") or "the run failed"}
            self.settle()
            return
        if kind == EventType.TOOL_UPDATE and payload.get("call_id") in self.calls:
            self._tool_update(payload)
        if self.run_id is None and not self.runs:
            return  # between AG-UI runs, nothing of ours going on: the transaction's log has it
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


def last_user_text(request: RunAgentInput) -> str | None:
    """The text of the newest user message (the transaction keeps the rest of the conversation)."""
    for message in reversed(request.messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, str):
                return content
            return "".join(getattr(part, "text", "") for part in content)
    return None


def last_user_id(request: RunAgentInput) -> str | None:
    users = [message for message in request.messages if message.role == "user"]
    return str(users[-1].id) if users and users[-1].id else None


def check_resume(member: AguiMember | None, run: RunAgentInput) -> None:
    """Every resume entry answers an interrupt of this thread, open or settled meanwhile (by a HAIP
    member, or its call ended); edited arguments are refused (no approval policy permits them)."""
    for entry in run.resume or ():
        asked = member.interrupts.get(entry.interrupt_id) if member is not None else None
        if asked is None:
            if member is not None and entry.interrupt_id in member.settled:
                continue
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, f"no open interrupt {entry.interrupt_id!r} to resume")
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        if asked["reason"] == "tool_approval" and "editedArgs" in payload:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD, "this runtime's approval policy does not permit edited arguments"
            )


def error(status: int, code: str, message: str, where: str | None = None) -> JSONResponse:
    body = error_body(code, message)
    if where is not None:
        body["detail"] = {"where": where}
    return JSONResponse({"error": body}, status_code=status)


class AguiDoor:
    """The AG-UI route and the AG-UI members of every thread."""

    def __init__(self, door: Doorway, hub: Hub) -> None:
        self.door = door
        self.hub = hub
        self.members: OrderedDict[tuple[str, str], AguiMember] = OrderedDict()

    def routes(self) -> list[BaseRoute]:
        return [Route("/ag-ui/{agent}", self.run, methods=["POST"])]

    async def run(self, request: Request) -> Response:
        if refused_origin(request.scope, self.door.config.server.allowed_origins):
            return error(403, ErrorCode.UNAUTHORIZED, "origin not allowed")
        try:
            principal = await self.door.authenticate(http_credentials(request.scope).first(None))
        except ProtocolError as failure:
            return error(401, failure.code, failure.message)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:  # refused as it comes, never held whole
                return error(413, ErrorCode.MESSAGE_TOO_LARGE, f"a RunAgentInput is at most {MAX_BODY_BYTES} bytes")
        try:
            run = RunAgentInput.model_validate_json(body)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            where = "/" + "/".join(str(part) for part in first["loc"])
            return error(400, ErrorCode.INVALID_PAYLOAD, f"not an AG-UI RunAgentInput: {first['msg']}", where)
        agent = request.path_params["agent"]
        try:
            member = await self._member(principal, agent, run)
            after = self._last_event_id(request, member)
            if after is None:
                if member.run_id is not None:
                    raise ProtocolError(
                        ErrorCode.RUN_LIMIT_EXCEEDED, f"a run is already open on thread {run.thread_id!r}"
                    )
                after = member.last_id
                self._start(member, run, agent, request.headers.get("traceparent"))
        except ProtocolError as failure:
            return error(STATUS.get(failure.code, 400), failure.code, failure.message)

        async def stream() -> AsyncIterator[str]:
            async for frame in member.frames(after):
                yield frame

        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def _last_event_id(self, request: Request, member: AguiMember) -> int | None:
        """The SSE id a reconnecting client saw last (``<thread>:<n>`` or ``n``); ``None`` for a new run."""
        header = request.headers.get("last-event-id")
        if header is None:
            return None
        number = header.rpartition(":")[2]
        if not number.isdecimal() or int(number) > member.last_id:
            raise ProtocolError(ErrorCode.RESUME_FAILED, f"Last-Event-ID {header!r} is not one this thread sent")
        oldest = member.journal[0][0] if member.journal else member.last_id + 1
        if int(number) + 1 < oldest:
            raise ProtocolError(ErrorCode.REPLAY_TOO_OLD, f"events after {header!r} are no longer kept")
        return int(number)

    async def _member(self, principal: Principal, agent: str, run: RunAgentInput) -> AguiMember:
        """The AG-UI member of this thread for this user, with the thread's transaction live and open."""
        hub = self.hub
        spec = hub.agents.get(agent)
        if spec is None:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {agent!r}")
        if not principal.permissions.may_start(agent):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {agent!r}")
        thread = run.thread_id
        if not thread or len(thread) > 128:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "threadId must be 1 to 128 characters")
        found = await hub.transactions.find(thread, principal)
        taken = found is None and await hub.store.transaction(thread) is not None
        # No await from here on: two first runs of one thread at once make one transaction, one member.
        if found is None:
            found = hub.transactions.live.get(thread)
            taken = taken or (found is not None and not hub.transactions.may_see(found.users, principal))
        if taken:
            raise ProtocolError(ErrorCode.TRANSACTION_NOT_FOUND, f"no thread {thread!r} you may continue")
        if found is not None and (not isinstance(found, Transaction) or found.ended):
            raise ProtocolError(ErrorCode.TRANSACTION_NOT_FOUND, f"thread {thread!r} has ended")
        key = (thread, principal.user)
        member = self.members.get(key)
        if member is not None:
            member.principal = principal  # the newest token's rights
            self.members.move_to_end(key)
        check_resume(member, run)  # before anything is made or joined: a bad resume changes nothing
        if member is None:
            member = AguiMember(principal, thread)
            member.on_idle = self._idle
            self.members[key] = member
            while len(self.members) > MAX_MEMBERS:
                self._forget(self.members.popitem(last=False)[1])
        if found is None:
            lifecycle.begin(hub.context, member, spec, None, {}, thread, run.run_id, id=thread)
        elif isinstance(found, Transaction):
            if not found.is_member(member):
                found.check_room(member, run.run_id)
                if found.add_member(member):
                    joined = p.TransactionJoined(members=found.member_users, agents=list(found.agents))
                    announce = {**joined.dump(), "joined": member.user}
                    found.publish(Event(EventType.TRANSACTION_JOIN, announce, exclude=frozenset({member.id})))
            if agent not in found.agents:
                await lifecycle.add_agent(hub.context, member, run.run_id, found, agent)
        return member

    def _idle(self, member: AguiMember) -> None:
        """Between runs the AG-UI user leaves the transaction (so an idle one can leave memory), and
        joins again with the next run. After the event being published now: the hub runs it next."""

        async def leave() -> None:
            if member.idle:
                self._forget(member)

        self.hub.spawn(leave)

    def _forget(self, member: AguiMember) -> None:
        for transaction_id in list(member.transactions):
            transaction = self.hub.transactions.live.get(transaction_id)
            if transaction is not None:
                transaction.remove_member(member)

    def _start(self, member: AguiMember, run: RunAgentInput, agent: str, traceparent: str | None = None) -> None:
        """Open an AG-UI run: answer the interrupts it resumes, send its user message, or both."""
        transaction = self.hub.transactions.live[member.thread_id]
        text = last_user_text(run)
        resuming = bool(run.resume)
        answers = [(entry, member.interrupts.get(entry.interrupt_id)) for entry in run.resume or ()]
        if text is not None and not resuming:
            transaction.admit_runs(member, len(transaction.agents), run.run_id)
        member.open(run.run_id)
        for entry, asked in answers:
            if asked is None:
                continue
            member.interrupts.pop(entry.interrupt_id, None)
            self._answer(transaction, member, entry.interrupt_id, asked["reason"], entry.status, entry.payload)
        if text is not None and not resuming:
            # Under the client's own message id: the client has the message already, members see it.
            user_message = {"text": text, "message_id": last_user_id(run) or new_id(), "via": "ag-ui"}
            runs = transaction.user_message(member, text, user_message, traceparent)
            member.runs.update(each.id for each in runs)
        elif text is None and not resuming and not member.runs:
            member.failure = {"code": ErrorCode.INVALID_PAYLOAD, "message": "the run has no user message to answer"}
        member.settle()

    def _answer(
        self, transaction: Transaction, member: AguiMember, call_id: str, reason: str, status: str, payload: Any
    ) -> None:
        tools = self.hub.tools
        if tools is None:
            return
        fields = payload if isinstance(payload, dict) else {}
        if reason == "tool_approval":
            approved = status == "resolved" and fields.get("approved") is True
            answer: dict[str, Any] = {"decision": "approve" if approved else "reject"}
            if fields.get("reason"):
                answer["reason"] = str(fields["reason"])
        elif status == "resolved":
            answer = {"input": fields}
        else:
            answer = {"decision": "decline"}
        try:
            tools.answer(call_id, transaction.id, member.user, answer, call_id)
        except ProtocolError as failure:  # answered meanwhile (by a HAIP member) or timed out: it has moved on
            logger.info("AG-UI resume of %s in %s: %s", call_id, transaction.id, failure.message)
