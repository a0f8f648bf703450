"""The hub: routes what clients ask of sessions and transactions to its handler.

Owns the task group in which agent turns and maintenance run, and the two registries
(``SessionRegistry``, ``TransactionRegistry``); each inbound envelope of an authenticated session
goes to one handler here, which checks that the sender may act on the transaction it names.
Protocol failures are raised as ``ProtocolError`` and answered by the connection as ``ERROR``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from haip_runtime.agents.api import Agent
from haip_runtime.agents.registry import AgentSpec
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.transaction import AgentSlot, Member, Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.audio import receive_audio
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, Event, new_id, secret_id
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.session.limits import Limits
from haip_runtime.session.registry import SessionRegistry
from haip_runtime.session.session import Session, parse_seq
from haip_runtime.store.base import Store
from haip_runtime.store.memory import MemoryStore

if TYPE_CHECKING:
    from haip_runtime.tools.proxy import ToolProxy, ToolView

logger = logging.getLogger(__name__)

Handler = Callable[[Session, Envelope], Awaitable[None]]

#: How often expired sessions and idle transactions are looked for, at most.
MAINTENANCE_INTERVAL = 30.0


class Hub:
    """Sessions, transactions, agents; the handlers of every transaction-level event."""

    def __init__(
        self,
        config: HaipConfig,
        agents: dict[str, AgentSpec],
        tools: ToolProxy | None = None,
        store: Store | None = None,
        *,
        epoch: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.agents = agents
        self.tools = tools
        self.store: Store = store or MemoryStore()
        #: This process's run of the runtime; a client that sees it change knows the runtime restarted.
        self.epoch = epoch or secret_id()
        self.sessions = SessionRegistry(config.session, self.store, self.epoch)
        self.transactions = TransactionRegistry(config.transactions, agents, self.store, self.spawn, tools)
        self.limits = Limits(config.limits)
        self.metrics = metrics or Metrics()
        self.transactions.on_run_end = self.metrics.run_finished
        self.started_at = time.monotonic()
        #: Called after sessions or transactions left memory (the server gives the freed heap back).
        self.on_freed: Callable[[], None] = lambda: None
        self.total_connections = 0
        self.active_connections = 0
        self._stack = AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._handlers: dict[str, Handler] = {
            EventType.TRANSACTION_START: self._transaction_start,
            EventType.TRANSACTION_JOIN: self._transaction_join,
            EventType.TRANSACTION_END: self._transaction_end,
            EventType.MESSAGE: self._message,
            EventType.MESSAGE_UPDATE: self._message_update,
            EventType.RUN_CANCEL: self._run_cancel,
            EventType.TOOL_LIST: self._tool_list,
            EventType.TOOL_SCHEMA: self._tool_schema,
            EventType.TOOL_CALL: self._tool_call,
            EventType.TOOL_UPDATE: self._tool_update,
            EventType.TOOL_CANCEL: self._tool_cancel,
            EventType.AUDIO: self._audio,
            EventType.AUDIO_CHUNK: self._audio,
        }

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(self._maintain)
            self._tasks = set()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._task_group is not None
        with anyio.move_on_after(10, shield=True):
            for transaction in list(self.transactions.live.values()):
                if self.store.durable:
                    await self._stop_for_restart(transaction)  # to be continued after the restart
                else:
                    await transaction.end("runtime shutting down")
        with anyio.CancelScope(shield=True):
            await self._cancel_tasks()
        self._task_group.cancel_scope.cancel()
        return await self._stack.__aexit__(*exc_info)

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` as a task of the hub (agent turns, tool calls, ends of transactions).

        A plain asyncio task, not one of an anyio task group: a turn per message made spawning a
        measurable part of every round trip (about 32 µs against 7 µs). The runtime runs on
        asyncio (uvicorn); the hub cancels what is left when it stops, and a task that fails is
        logged (every task spawned here handles its own errors; this is the last resort).
        """
        if self._tasks is None:
            raise RuntimeError("the hub is not running")
        task = asyncio.get_running_loop().create_task(func(*args))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        assert self._tasks is not None
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("a hub task failed", exc_info=error)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks or ())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # --- sessions and upkeep ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        interval = min(MAINTENANCE_INTERVAL, self.config.session.resume_timeout_seconds / 2)
        interval = min(interval, self.config.transactions.idle_seconds / 2)
        self.sessions.prune_records()
        while True:
            await anyio.sleep(interval)
            self.upkeep()

    def upkeep(self) -> None:
        """Drop expired sessions and let idle transactions leave memory (and the process give it back)."""
        expired, idle = self.sessions.expired(), self.transactions.idle()
        for session in expired:
            self.drop_session(session)
        for transaction in idle:
            self.transactions.evict(transaction)
        if expired or idle:
            self.on_freed()

    def drop_session(self, session: Session) -> None:
        self.sessions.remove(session)
        for transaction_id in list(session.transactions):
            transaction = self.transactions.live.get(transaction_id)
            if transaction is not None:
                transaction.remove_member(session)

    async def _stop_for_restart(self, transaction: Transaction) -> None:
        """The runtime is stopping: cancel what runs; the transaction stays open in the store."""
        for run in list(transaction.runs.values()):
            run.scope.cancel()
        if self.tools is not None:
            self.tools.cancel_transaction(transaction.id, "the runtime is shutting down")
        for run in list(transaction.runs.values()):
            await run.wait()
        transaction.save()

    # --- dispatch ----------------------------------------------------------------------------------

    async def handle(self, session: Session, envelope: Envelope) -> None:
        handler = self._handlers.get(envelope.type)
        if handler is None:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_TYPE, f"this runtime does not handle {envelope.type!r}", related_id=envelope.id
            )
        await handler(session, envelope)

    def member_transaction(self, session: Session, envelope: Envelope) -> Transaction:
        """The transaction the envelope names, if the sender is a member (else not found)."""
        transaction = self.transactions.get_member(envelope.transaction, session)
        if transaction is None:
            raise ProtocolError(
                ErrorCode.TRANSACTION_NOT_FOUND,
                f"no transaction {envelope.transaction!r} for this session",
                related_id=envelope.id,
            )
        return transaction

    # --- transactions ------------------------------------------------------------------------------

    async def _transaction_start(self, session: Session, envelope: Envelope) -> None:
        request = parse_payload(envelope, p.TransactionStart)
        spec = self.agents.get(request.agent_name or "")
        if spec is not None and not session.principal.permissions.may_start(spec.name):
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                f"you may not start {spec.name!r}",
                related_id=envelope.transaction or envelope.id,
            )
        if spec is None:
            raise ProtocolError(
                ErrorCode.AGENT_NOT_FOUND,
                f"no agent named {request.agent_name!r}",
                related_id=envelope.transaction or envelope.id,
            )
        self.limits.check_transactions(self.transactions.live.values(), session.user, envelope.id)
        transaction = self.transactions.new(session.user, request.thread_id or envelope.thread_id)
        slot = self.transactions.slot(spec, transaction, session.user, request.params)  # a failing plugin costs nothing
        logger.info("transaction %s started by %r with agent %r", transaction.id, session.user, spec.name)
        transaction.add_member(session)
        transaction.add_agent(slot)
        self.transactions.add(transaction)
        reply = p.TransactionStarted(referenceId=envelope.transaction, agent=spec.name, thread_id=transaction.thread_id)
        transaction.publish(Event(EventType.TRANSACTION_START, reply.dump()))
        self.send_tool_list(transaction)
        self._greet(transaction, slot, session)

    @staticmethod
    def _greet(transaction: Transaction, slot: AgentSlot, session: Session) -> None:
        if type(slot.instance).on_start is not Agent.on_start:
            transaction.start_run(slot, session, "", {}, "on_start")

    async def _transaction_join(self, session: Session, envelope: Envelope) -> None:
        """Join a transaction (one's own, one joined before, or another's with ``may_join_others``):
        the reply, the history after ``since``, then the live stream. ``{agent}`` adds an agent."""
        request = parse_payload(envelope, p.TransactionJoin)
        since = 0 if request.since is None else parse_seq(request.since, "since", envelope.id)
        found = await self.transactions.find(envelope.transaction or "", session.principal)
        if found is None:
            raise ProtocolError(
                ErrorCode.TRANSACTION_NOT_FOUND, f"no transaction {envelope.transaction!r}", related_id=envelope.id
            )
        if not isinstance(found, Transaction) or found.ended:
            raise ProtocolError(
                ErrorCode.TRANSACTION_NOT_FOUND,
                f"transaction {envelope.transaction} has ended; its history is at "
                f"GET /haip/transactions/{envelope.transaction}/events",
                related_id=envelope.id,
            )
        transaction = found
        if request.agent:
            await self._add_agent(session, envelope, transaction, request.agent)
            return
        self.limits.check_members(transaction, session, envelope.id)
        history, omitted = await transaction.catch_up(since)
        # No await from here on: the member is added exactly after the history it was sent.
        new_user = transaction.add_member(session)
        joined = p.TransactionJoined(members=transaction.member_users, agents=list(transaction.agents))
        reply = {**joined.dump(), "tseq": str(transaction.tseq), "omitted": omitted}
        session.send(EventType.TRANSACTION_JOIN, reply, transaction=transaction.id)
        for event in history:
            session.deliver(event)
        if new_user:
            announce = {**joined.dump(), "joined": session.user}
            transaction.publish(Event(EventType.TRANSACTION_JOIN, announce, exclude=frozenset({session.id})))
        self.send_tool_list(transaction, only=session)

    async def _add_agent(self, session: Session, envelope: Envelope, transaction: Transaction, name: str) -> None:
        spec = self.agents.get(name)
        if spec is None:
            raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {name!r}", related_id=envelope.id)
        if not session.principal.permissions.may_start(name):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {name!r}", related_id=envelope.id)
        if not transaction.is_member(session):
            raise ProtocolError(
                ErrorCode.TRANSACTION_NOT_FOUND,
                f"join transaction {transaction.id} before adding an agent to it",
                related_id=envelope.id,
            )
        slot = None if name in transaction.agents else self.transactions.slot(spec, transaction, session.user, {})
        if slot is not None:
            transaction.add_agent(slot)
        joined = p.TransactionJoined(members=transaction.member_users, agents=list(transaction.agents))
        transaction.publish(Event(EventType.TRANSACTION_JOIN, joined.dump()))
        if slot is not None:
            self.send_tool_list(transaction)
            self._greet(transaction, slot, session)

    async def _transaction_end(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        reason = parse_payload(envelope, p.TransactionEnd).reason or f"ended by {session.user}"
        logger.info("transaction %s ended by %r: %s", transaction.id, session.user, reason)
        self.spawn(self._end, transaction, reason)  # it waits for turns to stop; the connection reads on meanwhile

    async def _end(self, transaction: Transaction, reason: str) -> None:
        await transaction.end(reason)
        for member in list(transaction.members.values()):
            member.transactions.discard(transaction.id)
        self.transactions.forget(transaction)

    # --- messages and runs -------------------------------------------------------------------------

    async def _message(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        self._check_open(transaction, envelope)
        message = parse_payload(envelope, p.Message)
        for slot in transaction.agents.values():
            schema = slot.instance.input_schema
            if schema is not None and isinstance(envelope.payload, dict):
                parse_payload(envelope, schema)
        wanted = len(transaction.agents)
        if session.active_runs + wanted > self.config.session.max_concurrent_runs:
            raise ProtocolError(
                ErrorCode.RUN_LIMIT_EXCEEDED,
                f"at most {self.config.session.max_concurrent_runs} runs at once per session",
                related_id=envelope.id,
            )
        transaction.user_message(session, message.text, envelope.payload_dict)

    async def _audio(self, session: Session, envelope: Envelope) -> None:
        await receive_audio(self, session, envelope)

    async def _message_update(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        update = parse_payload(envelope, p.MessageUpdate)
        if not transaction.edit_message(session, update.message_id, update.text):
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                "you can only edit your own messages",
                related_id=envelope.id,
                detail={"where": "/payload/message_id"},
            )
        update_payload = {**update.dump(), "author": session.user}
        transaction.publish(
            Event(EventType.MESSAGE_UPDATE, update_payload, channel=Channel.USER, exclude=frozenset({session.id}))
        )

    async def _run_cancel(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        request = parse_payload(envelope, p.RunCancel)
        if not transaction.cancel_run(request.run_id):
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"no running run {request.run_id!r}",
                related_id=envelope.id,
                detail={"where": "/payload/run_id"},
            )

    @staticmethod
    def _check_open(transaction: Transaction, envelope: Envelope) -> None:
        if transaction.ended:
            raise ProtocolError(
                ErrorCode.TRANSACTION_NOT_FOUND, f"transaction {transaction.id} has ended", related_id=envelope.id
            )

    # --- tools ------------------------------------------------------------------------------------

    async def _tool_list(self, session: Session, envelope: Envelope) -> None:
        if envelope.transaction is None:
            permissions = session.principal.permissions
            tools = [
                p.ToolEntry(name=name, description=spec.description)
                for name, spec in sorted(self.agents.items())
                if permissions.may_start(name)
            ]
            session.send(EventType.TOOL_LIST, p.ToolList(tools=tools).dump())
            return
        self.send_tool_list(self.member_transaction(session, envelope), only=session)

    def send_tool_list(self, transaction: Transaction, only: Member | None = None) -> None:
        """TOOL_LIST of the MCP tools the transaction's agents may call, as each member may see them."""
        for member in [only] if only is not None else list(transaction.members.values()):
            tools = [tool.entry() for tool in self.transaction_tools(transaction, member)]
            member.deliver(Event(EventType.TOOL_LIST, p.ToolList(tools=tools).dump(), transaction=transaction.id))

    def transaction_tools(self, transaction: Transaction, session: Member) -> list[ToolView]:
        if self.tools is None:
            return []
        servers = sorted({server for slot in transaction.agents.values() for server in slot.tool_servers})
        return self.tools.visible_tools(servers, session.principal.permissions)

    async def server_changed(self, server: str, state: str, error: str | None) -> None:
        """An MCP server (re)connected, dropped or changed its tools: tell every transaction using it.

        Members get ``INFO {"event": "mcp.server", "server", "state", "error"}`` and a fresh TOOL_LIST.
        Yields to other tasks every 100 transactions, so thousands of them never stall the loop.
        """
        for count, transaction in enumerate(list(self.transactions.live.values()), 1):
            if count % 100 == 0:
                await anyio.lowlevel.checkpoint()
            if not transaction.ended and any(server in slot.tool_servers for slot in transaction.agents.values()):
                info = {"event": "mcp.server", "server": server, "state": state, "error": error}
                transaction.publish(Event(EventType.INFO, info))
                self.send_tool_list(transaction)

    def _visible_tool(self, session: Session, envelope: Envelope, name: str) -> tuple[Transaction, ToolView]:
        transaction = self.member_transaction(session, envelope)
        for tool in self.transaction_tools(transaction, session):
            if tool.name == name:
                return transaction, tool
        code = ErrorCode.TOOL_NOT_FOUND
        if self.tools is not None and not session.principal.permissions.may_use_tool(name):
            code = ErrorCode.UNAUTHORIZED
        message = f"you may not use {name!r}" if code == ErrorCode.UNAUTHORIZED else f"no tool {name!r} here"
        raise ProtocolError(code, message, related_id=envelope.id)

    async def _tool_schema(self, session: Session, envelope: Envelope) -> None:
        request = parse_payload(envelope, p.ToolSchemaRequest)
        if envelope.transaction is None:
            spec = self.agents.get(request.tool)
            if spec is None or not session.principal.permissions.may_start(request.tool):
                raise ProtocolError(ErrorCode.TOOL_NOT_FOUND, f"no agent {request.tool!r}", related_id=envelope.id)
            schema = {"name": spec.name, "description": spec.description, "inputSchema": _agent_input(spec)}
            session.send(EventType.TOOL_SCHEMA, {"tool": request.tool, "schema": schema})
            return
        transaction, tool = self._visible_tool(session, envelope, request.tool)
        session.send(EventType.TOOL_SCHEMA, {"tool": tool.name, "schema": tool.schema()}, transaction=transaction.id)

    async def _tool_call(self, session: Session, envelope: Envelope) -> None:
        """A member calls a tool directly (PROTOCOL.md section 8), through the same proxy as agents."""
        request = parse_payload(envelope, p.ToolCall)
        transaction, server = self._callable_tool(session, envelope, request.tool)
        self._check_open(transaction, envelope)
        assert self.tools is not None
        request = request.model_copy(update={"call_id": request.call_id or new_id()})
        self.limits.claim_tool_call(session, envelope.id)
        if not self.tools.reserve(transaction.id, str(request.call_id)):
            self.limits.release_tool_call(session)
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"call_id {request.call_id!r} is already in use",
                related_id=envelope.id,
                detail={"where": "/payload/call_id"},
            )
        self.spawn(self._direct_call, transaction, session, server, request)

    def _callable_tool(self, session: Session, envelope: Envelope, name: str) -> tuple[Transaction, str]:
        """The transaction and server of a tool a member may call: one it sees, or one of a server that is
        down (that call ends in TOOL_DONE SERVER_UNAVAILABLE, exactly as an agent's call would)."""
        try:
            transaction, tool = self._visible_tool(session, envelope, name)
            return transaction, tool.server
        except ProtocolError as error:
            transaction = self.member_transaction(session, envelope)
            server = name.partition(".")[0]
            used = {each for slot in transaction.agents.values() for each in slot.tool_servers}
            if error.code != ErrorCode.TOOL_NOT_FOUND or self.tools is None or not self.tools.is_down(server, used):
                raise
            return transaction, server

    async def _direct_call(self, transaction: Transaction, session: Session, server: str, request: p.ToolCall) -> None:
        def emit(type: str, payload: dict[str, Any] | str, *, channel: str = Channel.SYSTEM) -> None:
            transaction.publish(Event(type, payload, channel=channel))

        assert self.tools is not None
        try:
            await self.tools.call(
                request.tool,
                request.params,
                transaction_id=transaction.id,
                run_id=None,
                allowed_servers=[server],
                caller=session.user,
                emit=emit,
                permissions=session.principal.permissions,
                call_id=request.call_id,
            )
        finally:
            self.limits.release_tool_call(session)

    async def _tool_update(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        update = parse_payload(envelope, p.ToolUpdate)
        answer = {k: v for k, v in update.dump().items() if k in ("decision", "reason", "input")}
        if self.tools is None or not answer:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                "TOOL_UPDATE from a client needs decision or input",
                related_id=envelope.id,
                detail={"where": "/payload"},
            )
        self.tools.answer(update.call_id, transaction.id, session.user, answer, envelope.id)

    async def _tool_cancel(self, session: Session, envelope: Envelope) -> None:
        transaction = self.member_transaction(session, envelope)
        request = parse_payload(envelope, p.ToolCancel)
        if self.tools is None:
            raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "no tool calls here", related_id=envelope.id)
        self.tools.cancel(request.call_id, transaction.id, session.user, request.reason, envelope.id)


def _agent_input(spec: AgentSpec) -> dict[str, Any]:
    schema = spec.cls.input_schema
    return {"type": "string"} if schema is None else schema.model_json_schema()
