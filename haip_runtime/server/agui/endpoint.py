"""The AG-UI route: ``POST /ag-ui/{agent}``. Checks the caller as the HAIP doors do, finds or starts
the thread's transaction through the hub's own paths, opens the AG-UI run (a message, answers to
interrupts, or both) and streams the member's journal as SSE.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from ag_ui.core import RunAgentInput
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from haip_runtime.auth.tokens import Principal
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import DecodeError, ProtocolError, StorageError
from haip_runtime.hub import lifecycle
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import check_text_fits, load_json
from haip_runtime.protocol.envelope import Event, new_id, parse_uint64
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.server.agui.mapping import (
    MAX_ID,
    AguiMember,
    check_ids,
    check_resume,
    user_text,
)
from haip_runtime.transports.http import http_credentials, http_error_headers, refused_origin
from haip_runtime.transports.sse import read_body

if TYPE_CHECKING:
    from haip_runtime.hub.router import Hub
    from haip_runtime.server.doors import Doorway

logger = logging.getLogger(__name__)

#: AG-UI members kept (one per thread and user); the least recently used leaves its transaction past this.
MAX_MEMBERS = 4096
#: The largest RunAgentInput taken (it carries the client's whole message history).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: How long a new run waits for the client of the run still open on its thread to be seen gone (a
#: "stop", then a new message: the aborted request's connection may close a moment after the new one opens).
ABANDON_WAIT = 1.0
#: The HTTP status of each error a request is refused with (others: 400).
STATUS = {
    ErrorCode.UNAUTHORIZED: 403,
    ErrorCode.AGENT_NOT_FOUND: 404,
    ErrorCode.TRANSACTION_NOT_FOUND: 404,
    ErrorCode.RESUME_FAILED: 404,
    ErrorCode.REPLAY_TOO_OLD: 410,
    ErrorCode.RUN_LIMIT_EXCEEDED: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.STORAGE_ERROR: 503,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
}


def error(status: int, code: str, message: str, where: str | None = None, detail: Any = None) -> JSONResponse:
    """The one HTTP error shape (``transports/http.py``), with its headers (a 401 names the scheme)."""
    fields = {**(detail or {}), **({"where": where} if where is not None else {})}
    body = {"error": error_body(code, message, detail=fields or None)}
    return JSONResponse(body, status_code=status, headers=http_error_headers(status))


def body_path(body: Any, loc: tuple[int | str, ...]) -> str:
    """A validation error's place as a path into the body the client sent (parsed): pydantic's ``loc`` also
    names the union members it tried (``/messages/0/user/content/str``: a re-tester's find), left out."""
    node = body
    parts: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif node is not None and not (isinstance(node, dict) and index == len(loc) - 1):
            continue  # a union member's name, not a place in the body (the last, in an object: a missing key)
        parts.append(str(part))
    return "/" + "/".join(parts)


class AguiDoor:
    """The AG-UI route and the AG-UI members of every thread."""

    def __init__(self, door: Doorway, hub: Hub) -> None:
        self.door = door
        self.hub = hub
        self.members: OrderedDict[tuple[str, str], AguiMember] = OrderedDict()

    def routes(self) -> list[BaseRoute]:
        return [Route("/ag-ui/{agent}", self.run, methods=["POST"])]

    def close_runs(self, why: str) -> None:
        """The server is stopping: every open AG-UI run ends now with ``RUN_ERROR`` (code ``SHUTTING_DOWN``),
        so its response ends and its client may run again once the server is back (a reviewer's find: the
        stream held the stop for uvicorn's 5 s and was cut without an end)."""
        for member in list(self.members.values()):
            if member.run_id is not None:
                member.failure = {"code": "SHUTTING_DOWN", "message": why}
                member.close()

    async def run(self, request: Request) -> Response:
        if refused_origin(request.scope, self.door.config.server.allowed_origins):
            return error(403, ErrorCode.UNAUTHORIZED, "origin not allowed")
        try:
            principal = await self.door.authenticate(http_credentials(request.scope).first(None))
        except ProtocolError as failure:
            return error(401, failure.code, failure.message)
        try:  # refused as it comes, never held whole, and within server.body_timeout_seconds
            body = await read_body(request.receive, MAX_BODY_BYTES, self.door.config.server.body_timeout_seconds)
        except DecodeError as refusal:
            if refusal.code is ErrorCode.MESSAGE_TOO_LARGE:
                message = (
                    f"the request body exceeds {MAX_BODY_BYTES} bytes: the runtime keeps the thread's history,"
                    " so only the newest user message need be sent"
                )
                return error(413, refusal.code, message)
            return error(400, refusal.code, refusal.message, detail=refusal.detail)
        try:  # (the depth and values HAIP keeps: a body 1,000 deep was a 500 and a traceback: a prober's find)
            parsed = load_json(body, where="/")
        except DecodeError as refusal:
            return error(400, ErrorCode.INVALID_PAYLOAD, refusal.message, detail=refusal.detail)
        try:
            run = RunAgentInput.model_validate(parsed)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            where = body_path(parsed, first["loc"])
            return error(400, ErrorCode.INVALID_PAYLOAD, f"not an AG-UI RunAgentInput: {first['msg']}", where)
        agent = request.path_params["agent"]
        reconnecting = request.headers.get("last-event-id") is not None
        try:
            check_ids(run)
            said = user_text(run)
            if said is not None:
                check_text_fits(said[1], self.door.config.server.max_frame_bytes, f"/messages/{said[0]}/content")
            member = await self._member(principal, agent, run, said, new_run=not reconnecting)
            after = self._last_event_id(request, member)
            if after is None:
                if member.run_id is not None:
                    await self._until_unread(member)
                    # Again: the wait let the thread move on (the run ended, and its member may have left
                    # the transaction, idle: the new run's events then reached nobody: the suite's find).
                    member = await self._member(principal, agent, run, said, new_run=True)
                self._admit(member, run, said, agent)  # (a refusal changes nothing: the open run goes on)
                if member.run_id is not None:  # its client went away: given up, its turns cancelled
                    transaction = self.hub.transactions.live[member.thread_id]
                    for run_id in member.abandon():
                        transaction.cancel_run(run_id, by=member.user)
                after = member.last_id
                await self._with_agent(member, agent, run)
                self._start(member, run, said, request.headers.get("traceparent"))
        except ProtocolError as failure:
            return error(STATUS.get(failure.code, 400), failure.code, failure.message, detail=failure.detail)

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
        thread, _, digits = header.rpartition(":")
        number = parse_uint64(digits)  # (a 5,000-digit one was a 500, past int()'s limit: a prober)
        if number is None or not 1 <= number <= member.last_id or thread not in ("", member.thread_id):
            raise ProtocolError(ErrorCode.RESUME_FAILED, f"Last-Event-ID {header[:200]!r} is not one this thread sent")
        oldest = member.journal[0][0] if member.journal else member.last_id + 1
        if number + 1 < oldest:
            raise ProtocolError(ErrorCode.REPLAY_TOO_OLD, f"events after {header!r} are no longer kept")
        return number

    async def _until_unread(self, member: AguiMember) -> None:
        """A run of this user's is open on the thread: until its client has gone (a "stop" in the
        front-end, then a new message: the caller gives it up), or it ended; ``RUN_LIMIT_EXCEEDED`` if
        a client still reads it (a second tab), or another request took the thread meanwhile."""
        open_run = member.run_id
        gone = await member.unread(ABANDON_WAIT)
        if member.run_id is not None and (not gone or member.run_id != open_run):
            raise ProtocolError(
                ErrorCode.RUN_LIMIT_EXCEEDED,
                f"a run is already open on thread {member.thread_id!r}, and its client reads it",
            )

    def _admit(self, member: AguiMember, run: RunAgentInput, said: tuple[int, str] | None, agent: str) -> None:
        """The new message's checks, before anything is done: the user's message rate, the run queue (with
        the run's agent counted if it is still to join: a reviewer's find, it joined, then was refused)."""
        if run.resume or said is None:
            return
        self.hub.sessions.check_rate(member.user, run.run_id)  # the user's messages a second, every door together
        transaction = self.hub.transactions.live[member.thread_id]
        joining = int(agent not in transaction.agents)
        transaction.check_message(member, run.run_id, joining=joining)  # refused (nothing sent yet), or runs, or waits

    async def _member(
        self, principal: Principal, agent: str, run: RunAgentInput, said: tuple[int, str] | None, *, new_run: bool
    ) -> AguiMember:
        """The AG-UI member of this thread for this user, with the thread's transaction live and open.
        ``said``: the run's newest user message, its index and text; ``new_run``: not a client reconnecting
        with ``Last-Event-ID`` (whose body is its run's again)."""
        hub = self.hub
        spec = hub.agents.get(agent)
        if spec is None:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {agent!r}")
        if not principal.permissions.may_start(agent):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {agent!r}")
        thread = run.thread_id
        if not thread or len(thread) > MAX_ID or not thread.isprintable():
            # (It becomes the transaction's id and each event's SSE ``id:`` line: a line break in it
            # would let its creator write events into the stream of everyone following the thread.)
            message = f"threadId must be 1 to {MAX_ID} printable characters"
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, message, detail={"where": "/threadId"})
        try:
            found = await hub.transactions.find(thread, principal)
            taken = found is None and await hub.store.transaction(thread) is not None
        except StorageError as error:  # (a re-tester's find: HAIP and /mcp said this plainly, AG-UI did not)
            refused = StorageError(
                f"thread {thread!r} cannot be looked up now, so a run on it cannot start: the store failed"
                f" ({error.message})"
            )
            raise refused from error
        async with AsyncExitStack() as starting:
            if found is None and not taken:  # the quota, around the step that makes it
                await starting.enter_async_context(lifecycle.room_made(hub.context, principal, run.run_id))
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
            if not new_run and member is None:  # (a prober's find: it made the thread, and a stream of nothing)
                raise ProtocolError(ErrorCode.RESUME_FAILED, f"no run of yours on thread {thread!r} to follow")
            check_resume(member, run)  # before anything is made or joined: a bad resume changes nothing
            if new_run:
                self._check_new_message(member, run, said, found, principal)
            if member is None:
                member = AguiMember(principal, thread)
                member.on_idle = self._idle
                self.members[key] = member
                while len(self.members) > MAX_MEMBERS:
                    self._forget(self.members.popitem(last=False)[1])
            if found is None:
                member.greeting_due = True
                lifecycle.create(hub.context, member, spec, None, {}, thread, id=thread)
            elif isinstance(found, Transaction):
                if not found.is_member(member):
                    found.check_room(member, run.run_id)
                    if found.add_member(member):
                        joined = p.TransactionJoined(members=found.member_users, agents=found.agent_names)
                        announce = {**joined.dump(), "joined": member.user}
                        found.publish(Event(EventType.TRANSACTION_JOIN, announce, exclude=frozenset({member.id})))
        return member

    async def _with_agent(self, member: AguiMember, agent: str, run: RunAgentInput) -> None:
        """The request's agent into the thread's conversation if it is not there yet: once the run is admitted
        (an integrator's find: a run refused for one still open had added its agent, which then answered
        every later message)."""
        transaction = self.hub.transactions.live[member.thread_id]
        if agent not in transaction.agents:
            member.greeting_due = True
            await lifecycle.add_agent(self.hub.context, member, run.run_id, transaction, agent)

    @staticmethod
    def _check_new_message(
        member: AguiMember | None, run: RunAgentInput, said: tuple[int, str] | None, found: object, principal: Principal
    ) -> None:
        """A run brings a new user message, or a ``resume``, or follows runs of this user's still going;
        a user message sent in an earlier run is not sent again (an AG-UI client sends the whole
        conversation each time: a retry, or a run after a front-end tool's result, would repeat it)."""
        if run.resume:
            return
        if said is None:
            if member is None or member.run_id is not None or not (member.runs or member.waiting):
                raise ProtocolError(
                    ErrorCode.INVALID_PAYLOAD,
                    "the run has no user message to answer (and no `resume`)",
                    detail={"where": "/messages"},
                )
            return
        message_id = run.messages[said[0]].id
        author = found.message_author(message_id) if message_id and isinstance(found, Transaction) else None
        if author is not None:  # (another member's, shown to this client as a user message, is not new either)
            whose = "you" if author == principal.user else repr(author)
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"the newest user message ({message_id!r}) is not new: {whose} sent it in an earlier run. A run"
                " needs a new user message (with an id of its own), or a `resume`; to follow a run again, POST"
                " it with Last-Event-ID",
                detail={"where": f"/messages/{said[0]}/id"},
            )

    def _idle(self, member: AguiMember) -> None:
        """Between runs the AG-UI user leaves the transaction (so an idle one can leave memory), and
        joins again with the next run. After the event being published now: the hub runs it next."""

        async def leave() -> None:
            if member.idle:
                self._forget(member)

        self.hub.spawn(leave)

    def _forget(self, member: AguiMember) -> None:
        member.left()
        for transaction_id in list(member.transactions):
            transaction = self.hub.transactions.live.get(transaction_id)
            if transaction is not None:
                transaction.remove_member(member)

    def _start(
        self, member: AguiMember, run: RunAgentInput, said: tuple[int, str] | None, traceparent: str | None = None
    ) -> None:
        """Open an AG-UI run: answer the interrupts it resumes, send its user message (``said``: its index
        and text), or both. A run with neither follows runs of this user's still going (``_member`` saw
        that it has some)."""
        transaction = self.hub.transactions.live[member.thread_id]
        resuming = bool(run.resume)
        answers = [(entry, member.interrupts.get(entry.interrupt_id)) for entry in run.resume or ()]
        member.open(run.run_id)
        for entry, asked in answers:
            if asked is None:
                continue
            member.interrupts.pop(entry.interrupt_id, None)
            self._answer(transaction, member, entry.interrupt_id, asked["reason"], entry.status, entry.payload)
        if said is not None and not resuming:
            # Under the client's own message id (one the thread holds was refused: ``_check_new_message``):
            # the client has the message already, members see it.
            index, text = said
            message_id = run.messages[index].id or new_id()
            user_message = {"text": text, "message_id": message_id, "via": "ag-ui"}
            try:
                runs = transaction.user_message(member, text, user_message, traceparent=traceparent)
            except ProtocolError:  # (admitted a moment ago: the room went meanwhile) the run opened is not read
                member.reader_due = False
                member.close()
                raise
            member.runs.update(each.id for each in runs)
            if not runs and (user_message["message_id"] in transaction.queued or not transaction.runs_here):
                member.waiting.add(str(user_message["message_id"]))  # its runs start when the queue reaches it
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
            self.hub.context.answer_call(transaction, call_id, member.user, answer, call_id)
        except ProtocolError as failure:  # answered meanwhile (by a HAIP member) or timed out: it has moved on
            logger.info("AG-UI resume of %s in %s: %s", call_id, transaction.id, failure.message)
