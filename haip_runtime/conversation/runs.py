"""Agent turns in flight: each ``Run``, and the ``RunLimit`` on how many one member may start at once.

A run is one hook call of one agent (``on_message``, ``on_audio``, ``on_start``) with its own
cancel scope. The limit (``session.max_concurrent_runs``) counts the runs a member started across
every transaction; transactions claim and release through the one ``RunLimit`` their registry
gives them, so the check and the count live here and nowhere else. A message that finds no room
waits in its transaction's queue (at most ``session.max_queued_messages``); the limit wakes the
transactions waiting for a member when one of its runs ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.agents.api import Turn, TurnServices
from haip_runtime.auth.permissions import UNRESTRICTED
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.codec import DEFAULT_MAX_FRAME_BYTES, ENVELOPE_ROOM
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import Channel, ErrorCode

if TYPE_CHECKING:
    from haip_runtime.agents.api import Agent
    from haip_runtime.conversation.history import History
    from haip_runtime.conversation.members import Member
    from haip_runtime.tools.proxy import ToolProxy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSlot:
    """One agent of a transaction: its name, its instance (per transaction), the MCP servers it uses."""

    name: str
    instance: Agent[Any]
    tool_servers: tuple[str, ...]


class Run:
    """One agent turn in flight: its cancel scope, and a way to wait for its end."""

    __slots__ = ("id", "agent", "member", "message_id", "scope", "finished", "reason", "_done")

    def __init__(self, id: str, agent: str, member: Member | None, message_id: str | None = None) -> None:
        self.id = id
        self.agent = agent
        self.member = member
        #: The message it answers (its RUN_STARTED names it): a RUN_CANCEL may name the run by it.
        self.message_id = message_id
        self.scope = anyio.CancelScope()
        self.finished = False
        #: Why it was cancelled, when the members should know more than "cancelled" (a shutdown).
        self.reason: str | None = None
        self._done: anyio.Event | None = None  # made only if someone waits

    def cancel(self, reason: str | None = None) -> None:
        self.reason = self.reason or reason
        self.scope.cancel()

    def finish(self) -> None:
        self.finished = True
        if self._done is not None:
            self._done.set()

    async def wait(self) -> None:
        """Until the turn has ended (at once if it has)."""
        if not self.finished:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()


class RunLimit:
    """At most ``most`` runs at once started by one member (a session), whichever transactions they are in;
    at most ``queued`` messages waiting for room in one transaction."""

    def __init__(self, most: int, queued: int = 16) -> None:
        self.most = most
        self.queued = queued
        self._running: dict[str, int] = {}
        #: By member id: the transactions with messages of that member waiting for room (their drains).
        self._waiting: dict[str, dict[str, Callable[[], None]]] = {}

    def running(self, member: Member) -> int:
        return self._running.get(member.id, 0)

    def room(self, member: Member, wanted: int) -> bool:
        """Whether ``member`` may start ``wanted`` more runs now."""
        return self.running(member) + wanted <= self.most

    def check(self, member: Member, wanted: int, related_id: str) -> None:
        """Room for ``wanted`` more runs of ``member``, or ``RUN_LIMIT_EXCEEDED`` (nothing started)."""
        if wanted and not self.room(member, wanted):
            raise self._refusal(f"at most {self.most} runs at once per session", related_id, "max_concurrent_runs")

    def check_queue(self, waiting: int, wanted: int, related_id: str, *, agents_busy: bool = False) -> None:
        """Room in a transaction's queue that holds ``waiting`` messages, for a message that needs
        ``wanted`` runs; ``RUN_LIMIT_EXCEEDED`` past the bound (or if the message could never run).
        ``agents_busy``: it would wait for its agents' turn, not for its member's room (said so)."""
        if wanted > self.most:
            message = f"this message needs {wanted} runs; at most {self.most} run at once"
            raise self._refusal(message, related_id, "max_concurrent_runs")
        if waiting >= self.queued:
            why = "the agents are answering" if agents_busy else f"at most {self.most} runs at once per session"
            message = f"{why}, and {waiting} messages are already waiting their turn"
            raise self._refusal(message, related_id, "max_queued_messages")

    @staticmethod
    def _refusal(message: str, related_id: str, limit: str) -> ProtocolError:
        """``RUN_LIMIT_EXCEEDED``; ``detail.limit`` names the setting, as ``RATE_LIMITED``'s does."""
        detail = {"limit": f"session.{limit}"}
        return ProtocolError(ErrorCode.RUN_LIMIT_EXCEEDED, message, related_id=related_id, detail=detail)

    def wait(self, member: Member, transaction_id: str, drain: Callable[[], None]) -> None:
        """Call ``drain`` when a run of ``member`` ends (once; wait again if still blocked)."""
        self._waiting.setdefault(member.id, {})[transaction_id] = drain

    def claim(self, member: Member) -> None:
        self._running[member.id] = self._running.get(member.id, 0) + 1

    def release(self, member: Member) -> None:
        left = self._running.get(member.id, 0) - 1
        if left > 0:
            self._running[member.id] = left
        else:
            self._running.pop(member.id, None)
        for drain in self._waiting.pop(member.id, {}).values():
            drain()


def make_turn(
    transaction_id: str,
    owner: str,
    publish: Callable[[Event], object],
    history: History,
    tools: ToolProxy | None,
    slot: AgentSlot,
    run: Run,
    text: str,
    payload: dict[str, Any],
    member: Member | None,
    pace: Callable[[], Awaitable[None] | None] | None = None,
    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES - ENVELOPE_ROOM,
) -> Turn:
    """What an agent's hook gets for ``run``: the message, and services bound to its transaction
    (``pace``: the back-pressure of its streams, ``TurnServices.pace``)."""

    def emit(type: str, payload: dict[str, Any] | str, *, channel: str = Channel.AGENT) -> None:
        if run.finished:  # (an agent author's find: a task the hook left running spoke after RUN_FINISHED)
            logger.warning("agent %s sent %s after its run %s ended: not sent", slot.name, type, run.id)
            raise RuntimeError(
                f"the turn of agent {slot.name!r} (run {run.id}) has ended: what it sends now reaches nobody "
                "(await the work the hook starts before it returns)"
            )
        publish(Event(type, payload, channel=channel, run_id=run.id))

    services = TurnServices(
        emit=emit,
        history=history,
        record=history.append,
        tools=tools,
        tool_servers=slot.tool_servers,
        permissions=member.principal.permissions if member else UNRESTRICTED,
        llm=slot.instance.context.llm,
        pace=pace,
        max_message_bytes=max_message_bytes,
    )
    return Turn(
        agent=slot.name,
        transaction_id=transaction_id,
        run_id=run.id,
        text=text,
        payload=payload,
        author=member.user if member else owner,
        services=services,
    )
