"""Agent turns in flight: each ``Run``, and the ``RunLimit`` on how many one member may start at once.

A run is one hook call of one agent (``on_message``, ``on_audio``, ``on_start``) with its own
cancel scope. The limit (``session.max_concurrent_runs``) counts the runs a member started across
every transaction; transactions claim and release through the one ``RunLimit`` their registry
gives them, so the check and the count live here and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.events import ErrorCode

if TYPE_CHECKING:
    from haip_runtime.conversation.members import Member


class Run:
    """One agent turn in flight: its cancel scope, and a way to wait for its end."""

    __slots__ = ("id", "agent", "member", "scope", "finished", "_done")

    def __init__(self, id: str, agent: str, member: Member | None) -> None:
        self.id = id
        self.agent = agent
        self.member = member
        self.scope = anyio.CancelScope()
        self.finished = False
        self._done: anyio.Event | None = None  # made only if someone waits

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
    """At most ``most`` runs at once started by one member (a session), whichever transactions they are in."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._running: dict[str, int] = {}

    def running(self, member: Member) -> int:
        return self._running.get(member.id, 0)

    def check(self, member: Member, wanted: int, related_id: str) -> None:
        """Room for ``wanted`` more runs of ``member``, or ``RUN_LIMIT_EXCEEDED`` (nothing started)."""
        if wanted and self.running(member) + wanted > self.most:
            raise ProtocolError(
                ErrorCode.RUN_LIMIT_EXCEEDED, f"at most {self.most} runs at once per session", related_id=related_id
            )

    def claim(self, member: Member) -> None:
        self._running[member.id] = self._running.get(member.id, 0) + 1

    def release(self, member: Member) -> None:
        left = self._running.get(member.id, 0) - 1
        if left > 0:
            self._running[member.id] = left
        else:
            self._running.pop(member.id, None)
