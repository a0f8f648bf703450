"""The hub: routes what clients ask of sessions and transactions to its handler, and owns their lifetime.

Owns the task set in which agent turns and maintenance run, and the two registries
(``SessionRegistry``, ``TransactionRegistry``). Each inbound envelope of an authenticated session
goes to one handler by its type: ``lifecycle.py``, ``messages.py``, ``audio.py``, ``tool_requests.py``,
each a function of the hub's narrow ``HubContext``. Protocol failures are raised as
``ProtocolError`` and answered by the connection as ``ERROR``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, Self

import anyio
from anyio.abc import TaskGroup

from haip_runtime.agents.registry import AgentSpec
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.members import Member, remote_member
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.relay import Relay
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub import audio, lifecycle, messages, tool_requests
from haip_runtime.hub.context import Handler, HubContext, bind
from haip_runtime.hub.voice import speech_desk
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol.envelope import Envelope, secret_id
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.session.registry import SessionRegistry
from haip_runtime.session.session import Session
from haip_runtime.store.base import Store
from haip_runtime.store.memory import MemoryStore

if TYPE_CHECKING:
    from haip_runtime.cluster import Bus
    from haip_runtime.tools.proxy import ToolProxy
    from haip_runtime.tools.readiness import Readiness

logger = logging.getLogger(__name__)

#: Types whose ``transaction`` is not an existing transaction to rejoin (a reference id; one joined explicitly).
_OWN_TRANSACTION_FIELD = frozenset({EventType.TRANSACTION_START, EventType.TRANSACTION_JOIN})
#: Envelopes with size limits of their own (``hub/audio.py``): every other is checked for room to be forwarded.
_AUDIO = frozenset({EventType.AUDIO, EventType.AUDIO_CHUNK})
#: How often expired sessions and idle transactions are looked for, at most.
MAINTENANCE_INTERVAL = 30.0


#: Why a run or a tool call the runtime's stop cancelled ended (``RUN_FINISHED.reason``, ``TOOL_DONE``).
SHUTTING_DOWN = "the runtime is shutting down; the conversation goes on after its restart"


class Hub:
    """Sessions, transactions, agents; the handlers of every transaction-level event."""

    def __init__(
        self,
        config: HaipConfig,
        agents: Mapping[str, AgentSpec],
        tools: ToolProxy | None = None,
        store: Store | None = None,
        *,
        epoch: str | None = None,
        metrics: Metrics | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.config = config
        self.agents = agents
        self.tools = tools
        self.store: Store = store or MemoryStore()
        #: This process's run of the runtime; a client that sees it change knows the runtime restarted.
        self.epoch = epoch or secret_id()
        self.sessions = SessionRegistry(config.session, self.store, self.epoch, config.limits)
        self.sessions.on_drop = self._leave_transactions
        self.sessions.on_give_up = self._let_go
        self.transactions = TransactionRegistry(
            config.transactions,
            agents,
            self.store,
            self.spawn,
            tools,
            limits=config.limits,
            max_runs=config.session.max_concurrent_runs,
            max_queued=config.session.max_queued_messages,
            ready=readiness.wait if readiness is not None else None,
            max_frame_bytes=config.server.max_frame_bytes,
        )
        self.metrics = metrics or Metrics()
        self.transactions.on_run_end = self.metrics.run_finished
        self.started_at = time.monotonic()
        #: Called after sessions or transactions left memory (the server gives the freed heap back).
        self.on_freed: Callable[[], None] = lambda: None
        self._task_group: TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._stack = AsyncExitStack()
        ready = readiness.wait if readiness is not None else None
        #: Agents that listen and answer aloud (``agents.<name>.speech``), if any do.
        self.speech = speech_desk(config, agents, self.spawn)
        if self.speech is not None:
            self.transactions.on_new = self.speech.attach
        self.context = HubContext(
            config, agents, tools, self.transactions, self.spawn, ready, self.speech, joined=self._joined
        )
        if self.speech is not None:
            self.speech.answered = partial(messages.answered_if_asked, self.context)
        by_type = {
            EventType.TRANSACTION_START: lifecycle.transaction_start,
            EventType.TRANSACTION_JOIN: lifecycle.transaction_join,
            EventType.TRANSACTION_END: lifecycle.transaction_end,
            EventType.MESSAGE: messages.message,
            EventType.MESSAGE_UPDATE: messages.message_update,
            EventType.RUN_CANCEL: messages.run_cancel,
            EventType.AUDIO: audio.receive_audio,
            EventType.AUDIO_CHUNK: audio.receive_audio,
            EventType.TOOL_LIST: tool_requests.tool_list,
            EventType.TOOL_SCHEMA: tool_requests.tool_schema,
            EventType.TOOL_CALL: tool_requests.tool_call,
            EventType.TOOL_UPDATE: tool_requests.tool_update,
            EventType.TOOL_CANCEL: tool_requests.tool_cancel,
        }
        self._handlers: dict[str, Handler] = {kind: bind(self.context, handler) for kind, handler in by_type.items()}

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._task_group.start_soon(self._maintain)
            if self.speech is not None:
                self._task_group.start_soon(self.speech.load)
            self._tasks = set()
            self._stack = stack.pop_all()
        return self

    def share(self, bus: Bus) -> Relay:
        """Join the cluster's conversations through ``bus`` (``[cluster]``): every transaction made from
        now on is shared with the other nodes (``conversation/relay.py``)."""
        relay = Relay(bus, self.store, self.spawn)
        relay.on_end_asked = lambda transaction, reason: self.spawn(lifecycle.end, self.context, transaction, reason)
        relay.on_ended = self._ended_elsewhere
        relay.on_tools_changed = partial(tool_requests.tools_changed_elsewhere, self.context)
        relay.on_agents = partial(lifecycle.mirror_agents, self.context)
        relay.on_add_agent = self._add_agent_asked
        if self.speech is not None:
            relay.on_silence = self.speech.silence
        self.transactions.relay = relay
        return relay

    def _add_agent_asked(self, transaction: Transaction, about: dict[str, Any], name: str) -> None:
        """A member on another node added an agent, checked there: add it here, where the turns run."""
        spec = self.agents.get(name)
        if spec is not None:
            lifecycle.attach_agent(self.context, remote_member(about), transaction, spec)

    def _ended_elsewhere(self, transaction: Transaction) -> None:
        """A transaction's end came through the log: its members here leave it, and it leaves memory."""
        for member in list(transaction.members.values()):
            member.transactions.discard(transaction.id)
        self.transactions.forget(transaction)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._task_group is not None
        with anyio.move_on_after(10, shield=True):
            for transaction in list(self.transactions.live.values()):
                if self.store.durable:
                    await self._stop_for_restart(transaction)  # to be continued after the restart
                else:
                    await transaction.end("runtime shutting down")
            if self.transactions.relay is not None:
                await self.transactions.relay.close()
        with anyio.CancelScope(shield=True):
            await self._cancel_tasks()
        if self.store.durable:  # what the cancelled tasks published last (a member's own tool call's end)
            for transaction in list(self.transactions.live.values()):
                if transaction.reserved != transaction.tseq:
                    transaction.put_away()
        self._task_group.cancel_scope.cancel()
        if self.speech is not None:
            with anyio.CancelScope(shield=True):
                await self.speech.aclose()
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
            logger.info(
                "session %s of user %r ended: not resumed within %g s",
                session.id,
                session.user,
                self.config.session.resume_timeout_seconds,
            )
            self.sessions.drop(session)
        for transaction in idle:
            self.transactions.evict(transaction)
        if expired or idle:
            self.on_freed()

    def _joined(self, member: Member) -> None:
        """A session here joined a transaction: its record is saved now, not only when it disconnects
        (an operator's find: after a crash, RESUME_FAILED "restarted" listed nothing to rejoin)."""
        if isinstance(member, Session) and self.sessions.get(member.id) is member:
            self.sessions.save(member)

    def _leave_transactions(self, session: Session) -> None:
        """A session was dropped: it leaves every transaction it was a member of."""
        if self.speech is not None:
            self.speech.forget_session(session.id)
        for transaction_id in list(session.transactions):
            transaction = self.transactions.live.get(transaction_id)
            if transaction is not None:
                transaction.remove_member(session)

    def _let_go(self, session: Session) -> None:
        """A session moved to another node: it leaves this node's transactions without a ``member.left``
        (its user is still there, through the other node)."""
        if self.speech is not None:
            self.speech.forget_session(session.id)
        for transaction_id in list(session.transactions):
            transaction = self.transactions.live.get(transaction_id)
            if transaction is not None:
                transaction.remove_member(session, quietly=True)

    async def _stop_for_restart(self, transaction: Transaction) -> None:
        """The runtime is stopping: cancel what runs, saying why; the transaction stays open in the store.

        The messages waiting their turn are not started as the runs end (a reviewer's find: each cancelled
        run started the next, which nothing waited for and nothing ended). In a cluster they are the next
        owner's to answer (the log has them); on one node they are given up, ``INFO run.unqueued`` saying why."""
        transaction.stopping = True
        if transaction.shared is not None:
            transaction.drop_queue()
        else:
            transaction.unqueue_all(SHUTTING_DOWN)
        if self.tools is not None:  # (first: a call the run's cancel reached first said only "cancelled")
            self.tools.cancel_transaction(transaction.id, SHUTTING_DOWN)
        for run in list(transaction.runs.values()):
            run.cancel(SHUTTING_DOWN)
        for run in list(transaction.runs.values()):
            await run.wait()
        transaction.put_away()

    # --- dispatch ----------------------------------------------------------------------------------

    async def handle(self, session: Session, envelope: Envelope) -> None:
        handler = self._handlers.get(envelope.type)
        if handler is None:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_TYPE, f"this runtime does not handle {envelope.type!r}", related_id=envelope.id
            )
        if envelope.type not in _AUDIO:
            messages.check_forwardable(envelope, self.context.config.server.max_frame_bytes)
        if envelope.transaction is not None and envelope.type not in _OWN_TRANSACTION_FIELD:
            await lifecycle.rejoin(self.context, session, envelope)
        await handler(session, envelope)

    async def server_changed(self, server: str, state: str, error: str | None, *, tools_changed: bool = False) -> None:
        """An MCP server (re)connected, dropped or changed its tools: tell every transaction using it."""
        await tool_requests.server_changed(self.context, server, state, error, tools_changed=tools_changed)
