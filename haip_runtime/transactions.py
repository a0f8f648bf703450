"""Transactions: conversations shared by member sessions and agents, with their runs and event log.

A ``Transaction`` belongs to the runtime, not to a socket. It records every event it publishes
in its own log (with a transaction sequence ``tseq``) and fans it out to the member sessions,
which never block it. Agent turns run as ``Run``s in the hub's task group, each with its own
cancel scope, so one failing or cancelled turn costs only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.agents.api import Agent, HistoryEntry, Turn, TurnServices
from haip_runtime.exceptions import LlmError
from haip_runtime.permissions import UNRESTRICTED
from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.events import Channel, ErrorCode, EventType

if TYPE_CHECKING:
    from haip_runtime.session import Session
    from haip_runtime.tools import ToolProxy

logger = logging.getLogger(__name__)

#: How long ending a transaction waits for cancelled turns and ``on_end`` hooks.
END_GRACE_SECONDS = 5.0


@dataclass
class Run:
    """One agent turn in flight."""

    id: str
    agent: str
    session: Session | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(frozen=True)
class AgentSlot:
    name: str
    instance: Agent
    tool_servers: tuple[str, ...]


class Transaction:
    """One conversation: members, agents, runs, history and the append-only event log."""

    def __init__(
        self, *, owner: str, thread_id: str | None, spawn: Callable[..., object], tools: ToolProxy | None = None
    ) -> None:
        self.id = new_id()
        self.owner = owner
        self.thread_id = thread_id
        self.members: dict[str, Session] = {}
        self.agents: dict[str, AgentSlot] = {}
        self.runs: dict[str, Run] = {}
        self.log: list[Event] = []
        self.history: list[HistoryEntry] = []
        self.ended = False
        self.tools = tools
        self._spawn = spawn

    # --- membership and fan-out ------------------------------------------------------------------

    def add_member(self, session: Session) -> None:
        self.members[session.id] = session
        session.transactions.add(self.id)

    def remove_member(self, session: Session) -> None:
        self.members.pop(session.id, None)
        session.transactions.discard(self.id)

    def is_member(self, session: Session) -> bool:
        return session.id in self.members

    def add_agent(self, slot: AgentSlot) -> None:
        self.agents[slot.name] = slot

    def publish(self, event: Event) -> Event:
        """Record ``event`` in the log and deliver it to every member it is meant for."""
        stamped = event.with_changes(transaction=self.id, tseq=len(self.log) + 1, thread_id=self.thread_id)
        self.log.append(stamped)
        for session_id, session in list(self.members.items()):
            if session_id not in stamped.exclude:
                session.deliver(stamped)
        return stamped

    def events_after(self, tseq: int) -> list[Event]:
        return self.log[tseq:]

    # --- messages and runs -----------------------------------------------------------------------

    def user_message(self, session: Session, text: str, payload: dict[str, Any]) -> list[Run]:
        """Forward a user's message to the other members and start a turn for every agent."""
        message_id = str(payload.get("message_id") or new_id())
        forwarded = {**payload, "text": text, "author": session.user, "message_id": message_id}
        self.publish(Event(EventType.MESSAGE, forwarded, channel=Channel.USER, exclude=frozenset({session.id})))
        self.history.append(HistoryEntry("user", session.user, text, message_id))
        runs = []
        for slot in self.agents.values():
            runs.append(self.start_run(slot, session, text, {**payload, "message_id": message_id}, "on_message"))
        return runs

    def start_run(self, slot: AgentSlot, session: Session | None, text: str, payload: dict[str, Any], hook: str) -> Run:
        run = Run(id=new_id(), agent=slot.name, session=session)
        self.runs[run.id] = run
        if session is not None:
            session.active_runs += 1
        turn = self._turn(slot, run, text, payload, session)
        self._spawn(self._execute, run, getattr(slot.instance, hook), turn)
        return run

    def _turn(self, slot: AgentSlot, run: Run, text: str, payload: dict[str, Any], session: Session | None) -> Turn:
        def emit(type: str, payload: dict[str, Any] | str, *, channel: str = Channel.AGENT) -> None:
            self.publish(Event(type, payload, channel=channel, run_id=run.id))

        services = TurnServices(
            emit=emit,
            history=self.history,
            record=self.history.append,
            tools=self.tools,
            tool_servers=slot.tool_servers,
            permissions=session.principal.permissions if session else UNRESTRICTED,
            llm=slot.instance.context.llm,
        )
        return Turn(
            agent=slot.name,
            transaction_id=self.id,
            run_id=run.id,
            text=text,
            payload=payload,
            author=session.user if session else self.owner,
            services=services,
        )

    async def _execute(self, run: Run, hook: Callable[[Turn], Awaitable[None]], turn: Turn) -> None:
        self.publish(
            Event(EventType.RUN_STARTED, {"run_id": run.id, "agent": run.agent}, channel=Channel.AGENT, run_id=run.id)
        )
        try:
            with run.scope:
                await hook(turn)
        except LlmError as exc:  # the provider failed: tell the user why, in words they can act on
            logger.warning("agent %r: LLM error %s in run %s: %s", run.agent, exc.code, run.id, exc.message)
            self._finish(run, EventType.RUN_ERROR, {"code": exc.code.value, "message": exc.message})
        except Exception as exc:
            logger.exception("agent %r failed in run %s of transaction %s", run.agent, run.id, self.id)
            message = f"agent {run.agent!r} failed: {type(exc).__name__}"
            self._finish(run, EventType.RUN_ERROR, {"code": ErrorCode.INTERNAL_ERROR.value, "message": message})
        else:
            status = "CANCELLED" if run.scope.cancel_called else "OK"
            self._finish(run, EventType.RUN_FINISHED, {"status": status})

    def _finish(self, run: Run, type: str, body: dict[str, Any]) -> None:
        self.runs.pop(run.id, None)
        if run.session is not None:
            run.session.active_runs -= 1
        self.publish(Event(type, {"run_id": run.id, **body}, channel=Channel.AGENT, run_id=run.id))
        run.done.set()

    def cancel_run(self, run_id: str) -> bool:
        run = self.runs.get(run_id)
        if run is None:
            return False
        run.scope.cancel()
        return True

    async def end(self, reason: str) -> None:
        """Cancel running turns, call every agent's ``on_end``, tell the members. Idempotent."""
        if self.ended:
            return
        self.ended = True
        runs = list(self.runs.values())
        for run in runs:
            run.scope.cancel()
        calls = self.tools.cancel_transaction(self.id, f"the transaction ended: {reason}") if self.tools else []
        with anyio.move_on_after(END_GRACE_SECONDS, shield=True):
            for run in runs:
                await run.done.wait()
            for call in calls:
                await call.finished.wait()
            for slot in self.agents.values():
                await self._call_end_hook(slot, reason)
        self.publish(Event(EventType.TRANSACTION_END, {"reason": reason}))

    async def _call_end_hook(self, slot: AgentSlot, reason: str) -> None:
        try:
            await slot.instance.on_end(reason)
        except Exception:
            logger.exception("agent %r failed in on_end of transaction %s", slot.name, self.id)
