"""The MCP door: haip-runtime's agents offered to MCP clients at `[mcp_server] path` (PROTOCOL.md section 15).

Each agent the caller may start is a tool; a `tools/call` is one turn in an ordinary transaction,
started (or continued, by `conversation_id`) through the hub's own paths, with the caller a member
(`McpMember`) for the length of the call: humans who joined over HAIP see the turn live and answer
its approvals. The answer is the run's messages as text plus structured content (conversation id,
the tool calls and their outcomes); progress notifications carry the streamed text and the tool
calls; an MCP cancellation cancels the run. The MCP SDK's side is `bridge.facade`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from typing import Any

import anyio
import anyio.abc
from starlette.types import Receive, Scope, Send

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import DecodeError, HandshakeError, ProtocolError
from haip_runtime.hub import lifecycle
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import check_text_fits
from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.events import ALL_EVENTS, ErrorCode, EventType, RunOutcome, ToolStatus
from haip_runtime.server.mcp_relay import (
    FORWARDED,
    McpRelay,
    session_header,
    tagging,
    untagged,
    with_session,
)
from haip_runtime.transports.http import http_credentials, refused_origin, replaying, send_error
from haip_runtime.transports.sse import read_body

logger = logging.getLogger(__name__)

Report = Callable[[str], Awaitable[None]]
Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


#: How many times an MCP client is asked an input request whose answers do not fit it, before it is declined.
ASKS = 3
#: The HAIP events an MCP caller is said to accept (the transaction asks, e.g. before it speaks an answer).
_NO_AUDIO = frozenset(ALL_EVENTS) - {EventType.AUDIO, EventType.AUDIO_CHUNK}


class McpMember:
    """An MCP caller, a member of the transaction while its `tools/call` runs (the `Member` protocol)."""

    def __init__(self, principal: Principal) -> None:
        self.id = f"mcp-{new_id()}"
        self.principal = principal
        self.transactions: set[str] = set()
        self._send, self.events = anyio.create_memory_object_stream[Event](math.inf)

    @property
    def accepted(self) -> frozenset[str]:
        """What an MCP caller takes: every event but audio (its answer is text), so none is spoken for it."""
        return _NO_AUDIO

    @property
    def user(self) -> str:
        return self.principal.user

    def deliver(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.ClosedResourceError:
            pass  # the call has returned; it no longer listens

    def close(self) -> None:
        self._send.close()
        self.events.close()


class McpDoor:
    """The `AgentHost` of `bridge.facade`: who may start which agent, and one run per call.

    A call counts against the caller's quotas like a HAIP message: the message rate of all their
    sessions together (``check_message``), and at most ``session.max_concurrent_runs`` calls at once.
    """

    def __init__(self, ctx: HubContext, check_message: Callable[[str, str], None]) -> None:
        self._ctx = ctx
        self._check_message = check_message
        self._running: dict[str, int] = {}

    def agents(self, caller: Any) -> list[Any]:
        from haip_runtime.bridge.facade import AgentTool

        if not isinstance(caller, Principal):
            return []
        permissions = caller.permissions
        return [
            AgentTool(name, spec.description)
            for name, spec in sorted(self._ctx.agents.items())
            if permissions.may_start(name)
        ]

    async def run(
        self,
        caller: Any,
        agent: str,
        message: str,
        conversation_id: str | None,
        report: Report,
        ask: Ask | None = None,
        *,
        on_run: Callable[[_Run], None] | None = None,
        slot: RunSlot | None = None,
    ) -> Any:
        """One turn of `agent`, to its answer; `on_run` is handed the run as it starts (a task keeps it
        to say what the run did if the task is cancelled). With a `slot` (from `reserve`), the run
        was admitted already and gives the slot back when it ends."""
        from haip_runtime.bridge.facade import AgentAnswer

        assert isinstance(caller, Principal), "the door authenticates every request"
        member = McpMember(caller)
        run = _Run(agent, report, ask, self._answer)
        if on_run is not None:
            on_run(run)
        try:
            check_text_fits(message, self._ctx.config.server.max_frame_bytes, "/arguments/message")
            with self._counted(member) if slot is None else _giving_back(slot):
                return await self._run(member, run, message, conversation_id)
        except ProtocolError as error:  # refused before it started
            run.failed(error.code, error.message)
            return AgentAnswer(run.text(), run.structured(), is_error=True)
        finally:
            member.close()

    def reserve(self, caller: Any, agent: str) -> RunSlot:
        """Admit a run of `agent` for `caller` now (it may start it, its message rate, its runs at
        once), before anything is promised to the client (a task); `ProtocolError` if not."""
        assert isinstance(caller, Principal), "the door authenticates every request"
        if agent not in self._ctx.agents:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {agent!r}")
        if not caller.permissions.may_start(agent):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {agent!r}")
        return self._take(caller.user, new_id())

    def _take(self, user: str, related_id: str) -> RunSlot:
        self._check_message(user, related_id)
        limit = self._ctx.config.session.max_concurrent_runs
        if self._running.get(user, 0) >= limit:
            raise ProtocolError(ErrorCode.RUN_LIMIT_EXCEEDED, f"you already have {limit} MCP calls running")
        self._running[user] = self._running.get(user, 0) + 1
        return RunSlot(self._running, user)

    @contextmanager
    def _counted(self, member: McpMember) -> Iterator[None]:
        with _giving_back(self._take(member.user, member.id)):
            yield

    async def _run(self, member: McpMember, run: _Run, message: str, conversation_id: str | None) -> Any:
        from haip_runtime.bridge.facade import AgentAnswer

        try:
            transaction = await self._conversation(member, run.agent, conversation_id)
            run.conversation_id = transaction.id
            message_id = new_id()
            transaction.user_message(member, message, {"text": message, "message_id": message_id}, message_id)
            await run.follow(member, transaction, message_id)
        except ProtocolError as error:
            run.failed(error.code, error.message)
        finally:
            for transaction_id in list(member.transactions):
                live = self._ctx.transactions.live.get(transaction_id)
                if live is not None:
                    live.remove_member(member)
        return AgentAnswer(run.text(), run.structured(), is_error=run.status not in ("OK", "CANCELLED"))

    def _answer(
        self, member: McpMember, transaction: Transaction, call_id: str, content: dict[str, Any] | None
    ) -> str | None:
        """The MCP client's answer to a call's input request, unless a human answered it first; why it
        was refused, if it does not fit the request (the client is asked again)."""
        answer: dict[str, Any] = {"input": content} if content is not None else {"decision": "decline"}
        if self._ctx.tools is not None:
            try:
                self._ctx.answer_call(transaction, call_id, member.user, answer, new_id())
            except ProtocolError as error:
                where = str((error.detail or {}).get("where", ""))
                if where != "/payload/call_id":  # (its input: it waits still)
                    return _in_mcps_words(error.message, where)
                logger.info("call %s was answered before the MCP client answered it", call_id)
        return None

    async def _conversation(self, member: McpMember, agent: str, conversation_id: str | None) -> Transaction:
        related = new_id()
        if conversation_id is None:
            return await lifecycle.start(self._ctx, member, p.TransactionStart(agent=agent), related)
        found = await self._ctx.transactions.find(conversation_id, member.principal)
        if not isinstance(found, Transaction) or found.ended:
            raise ProtocolError(ErrorCode.TRANSACTION_NOT_FOUND, f"no open conversation {conversation_id!r}")
        lifecycle.enter(found, member, related)
        if agent not in found.agents:  # added, as AG-UI and TRANSACTION_JOIN {agent} do (a front-end developer's
            # find: only this door refused), once the message has room with it (a reviewer's find: it joined,
            # then the message was refused, and it answered every later one)
            found.check_message(member, related, joining=1)
            await lifecycle.add_agent(self._ctx, member, related, found, agent)
        return found


def _in_mcps_words(refusal: str, where: str) -> str:
    """A refused answer's reason as its MCP client sent it: the field it names, not the HAIP envelope's
    path, which that client never sent (a re-tester's find)."""
    field = where.removeprefix("/payload/input").strip("/").replace("/", ".")
    said = refusal.replace(f" at {where}", f" in {field!r}" if field else "").removesuffix("; the request still waits")
    return said.replace("the input request", "the question")


class _Run:
    """What one call saw of its run: the agent's text, its tool calls, how it ended."""

    def __init__(self, agent: str, report: Report, ask: Ask | None, answer: Callable[..., str | None]) -> None:
        self.agent = agent
        self.report = report
        self.ask = ask
        self.answer = answer
        self.asking: dict[str, anyio.CancelScope] = {}
        self.conversation_id = ""
        self.status = "RUNNING"
        self.error: str | None = None
        self.run_id: str | None = None
        self.parts: dict[str, list[str]] = {}
        self.calls: dict[str, dict[str, Any]] = {}

    async def follow(self, member: McpMember, transaction: Transaction, message_id: str) -> None:
        try:
            async with anyio.create_task_group() as questions:
                async for event in member.events:
                    await self._see(event, message_id)
                    self._relay_question(event, questions, member, transaction)
                    if self.status != "RUNNING":
                        break
                questions.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            transaction.cancel_run(self.run_id or message_id, member.user)  # the MCP client cancelled
            raise

    async def _see(self, event: Event, message_id: str) -> None:
        body = event.payload if isinstance(event.payload, dict) else {}
        if (
            event.type == EventType.RUN_STARTED
            and body.get("message_id") == message_id
            and body.get("agent") == self.agent
        ):
            self.run_id = str(body["run_id"])
            return
        if self.run_id is None and body.get("event") == "run.unqueued" and body.get("message_id") == message_id:
            self.status = RunOutcome.CANCELLED  # taken out of the queue before it ran
            return
        if self.run_id is None and body.get("event") == "run.queued" and body.get("message_id") == message_id:
            # Said as progress: the caller's client sees the call alive while it waits (a reviewer's find).
            await self.report(f"[waiting for its turn: {body.get('position')} in the queue]")
            return
        if event.type == EventType.TRANSACTION_END and self.run_id is None:
            self.failed(ErrorCode.TRANSACTION_NOT_FOUND, "the conversation ended before the message ran")
            return
        if self.run_id is None or event.run_id != self.run_id:
            return
        if event.type == EventType.MESSAGE_PART:
            self.parts.setdefault(str(body.get("message_id")), []).append(str(body.get("text", "")))
            await self.report(str(body.get("text", "")))
        elif event.type == EventType.TOOL_CALL:
            self.calls[str(body["call_id"])] = {
                "call_id": body["call_id"],
                "tool": body["tool"],
                "params": body.get("params"),
            }
            await self.report(f"[calling {body['tool']}]")
        elif event.type == EventType.TOOL_UPDATE and body.get("status") == ToolStatus.AWAITING_APPROVAL:
            await self.report(f"[{self._tool(body)} waits for a member's approval]")
        elif event.type == EventType.TOOL_UPDATE and body.get("status") == ToolStatus.INPUT_REQUIRED and not self.ask:
            # A client that cannot be asked is told that a member must answer (an integrator's find: its
            # progress stopped at "[calling ...]" for as long as the question waited).
            await self.report(f"[{self._tool(body)} waits for a member's answer]")
        elif event.type == EventType.TOOL_DONE:
            call = self.calls.setdefault(str(body["call_id"]), {"call_id": body["call_id"], "tool": ""})
            call.update({key: body[key] for key in ("status", "result", "error") if key in body})
            await self.report(f"[{call['tool']}: {body.get('status')}]")
        elif event.type == EventType.RUN_FINISHED:
            self.status = str(body.get("status", "OK"))
        elif event.type == EventType.RUN_ERROR:
            self.failed(str(body.get("code", ErrorCode.INTERNAL_ERROR)), str(body.get("message", "")))

    def _relay_question(
        self, event: Event, questions: anyio.abc.TaskGroup, member: McpMember, transaction: Transaction
    ) -> None:
        """An input request of a call in this run goes to the MCP client too, if it can be asked; any
        later news of the call (a human answered, it timed out, it ended) withdraws the question."""
        body = event.payload if isinstance(event.payload, dict) else {}
        call_id = str(body.get("call_id"))
        if event.type not in (EventType.TOOL_UPDATE, EventType.TOOL_DONE) or call_id not in self.calls:
            return
        if call_id in self.asking:
            self.asking.pop(call_id).cancel()
        request = body.get("request")
        if self.ask is None or body.get("status") != ToolStatus.INPUT_REQUIRED or not isinstance(request, dict):
            return
        scope = self.asking[call_id] = anyio.CancelScope()
        ask = self.ask

        async def relay() -> None:
            # An answer that does not fit is asked again, saying why, ``ASKS`` times at most, then declined
            # (an integrator's find: it was dropped, and the call waited out its approval timeout).
            message, schema = str(request.get("message", "")), dict(request.get("schema") or {})
            with scope:
                for _ in range(ASKS):
                    content = await ask(message, schema)
                    self.asking.pop(call_id, None)  # (the call's news that the answer brings is not a withdrawal)
                    refused = self.answer(member, transaction, call_id, content)
                    if refused is None:
                        return
                    self.asking[call_id] = scope
                    message = f"{request.get('message', '')}\n\n(Your answer was refused: {refused}.)"
                logger.info("call %s: the MCP client's answers did not fit %d times: declined", call_id, ASKS)
                self.asking.pop(call_id, None)
                self.answer(member, transaction, call_id, None)

        questions.start_soon(relay)

    def _tool(self, body: dict[str, Any]) -> str:
        return str(self.calls.get(str(body.get("call_id")), {}).get("tool", "a tool"))

    def failed(self, code: str, message: str) -> None:
        self.status, self.error = code, message

    def text(self) -> str:
        said = "\n\n".join("".join(parts) for parts in self.parts.values())
        if self.error is not None:
            return f"{self.status}: {self.error}" + (f"\n\n{said}" if said else "")
        return said

    def structured(self, *, cancelled: bool = False) -> dict[str, Any]:
        """The answer's structured content; ``cancelled``: the caller cancelled the run (a task), whose
        calls not seen ending here end with it (their TOOL_DONE comes after the caller has left: a
        tester's task result listed a cancelled call with no status)."""
        calls = list(self.calls.values())
        if cancelled:
            stopped = {"code": "CANCELLED", "message": "the run was cancelled before the call ended"}
            calls = [call if "status" in call else {**call, "status": "CANCELLED", "error": stopped} for call in calls]
        body: dict[str, Any] = {
            "conversation_id": self.conversation_id,
            "agent": self.agent,
            "status": "CANCELLED" if cancelled else self.status,
            "tool_calls": calls,
        }
        if self.error is not None:
            body["error"] = {"code": self.status, "message": self.error}
        return body


class RunSlot:
    """One of a user's runs at once (`session.max_concurrent_runs`), held until given back (once)."""

    def __init__(self, running: dict[str, int], user: str) -> None:
        self._running, self._user, self._held = running, user, True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._running[self._user] -= 1
            if not self._running[self._user]:
                del self._running[self._user]


@contextmanager
def _giving_back(slot: RunSlot) -> Iterator[None]:
    try:
        yield
    finally:
        slot.give_back()


class McpEndpoint:
    """The ASGI app at `[mcp_server] path`: the Origin and the bearer token are checked, then the SDK serves."""

    def __init__(
        self,
        config: HaipConfig,
        ctx: HubContext,
        authenticate: Callable[[str | None], Awaitable[Principal]],
        check_message: Callable[[str, str], None],
        tasks: Callable[[McpDoor], Any] | None = None,
    ) -> None:
        from haip_runtime import __version__
        from haip_runtime.bridge.facade import MAX_BODY_BYTES, agent_server

        self._origins = config.server.allowed_origins
        self._body_timeout = config.server.body_timeout_seconds
        self._max_body = MAX_BODY_BYTES
        self._authenticate = authenticate
        door = McpDoor(ctx, check_message)
        self.tasks = tasks(door) if tasks is not None else None  # `mcp_tasks.AgentTasks`: runs outliving calls
        self._server = agent_server(door, name="haip-runtime", version=__version__, tasks=self.tasks)
        #: In a cluster: carries requests for MCP sessions other nodes hold (``mcp_relay.py``).
        self.relay: McpRelay | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken

        from haip_runtime.bridge.facade import CALLER

        if scope["type"] != "http":
            return
        if refused_origin(scope, self._origins):
            await send_error(send, 403, ProtocolError(ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        try:
            principal = await self._authenticate(http_credentials(scope).first(None))
        except HandshakeError as error:
            await send_error(send, 401, ProtocolError(error.code, error.message))
            return
        # Any method may send a body, and the SDK reads it with no deadline: read it here (a GET or
        # DELETE without one reads an empty body at once).
        try:
            body = await read_body(receive, self._max_body, self._body_timeout)
        except DecodeError as refusal:
            if refusal.code is ErrorCode.MESSAGE_TOO_LARGE:  # (said in MCP's words: a HAIP client's were its wording)
                said = f"request body exceeds {self._max_body} bytes: none of it was taken; send a smaller request"
                refusal = DecodeError(refusal.code, said, detail=refusal.detail)
            await send_error(send, 413 if refusal.code is ErrorCode.MESSAGE_TOO_LARGE else 400, refusal)
            return
        relay = self.relay
        if relay is not None:  # a cluster: the session may be another node's, and its id names this one
            named = session_header(scope)
            if named is not None:
                session_id, node = untagged(named)
                if node is not None and node != relay.node and not scope.get(FORWARDED):  # another node's
                    if await relay.forward(node, scope, body, receive, send):
                        return
                scope = with_session(scope, session_id)
            send = tagging(send, relay.node)
        receive = replaying(body, receive)
        # The SDK binds a session to the user that made it: another user's request naming it is "Session
        # not found", as if there were none (the MCP spec's security advice). No token is kept in it.
        user = AuthenticatedUser(AccessToken(token="", client_id="haip-runtime", scopes=[], subject=principal.user))
        scope = {**scope, CALLER: principal, "user": user, "path": "/", "root_path": ""}
        await self._server.app(scope, receive, send)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Enter for as long as the app serves (the SDK's session manager runs meanwhile)."""
        async with self._server.lifespan(), self.tasks.running() if self.tasks is not None else nullcontext():
            yield
