"""The transport seam: what every transport (WebSocket, SSE, HTTP streaming, in-memory) gives a connection.

A transport is an async context manager that, given the connection's ``Outbox``, yields the
stream of decoded inbound envelopes (a frame that fails to decode arrives as a ``DecodeError``
value) and writes every ``Frame`` the outbox yields, in its own framing. It describes itself with
a ``Link``: the credentials it found, whether it carries binary frames, whether it finds a dead
peer itself, and a resume it was asked for outside a ``HAI`` (SSE ``Last-Event-ID``). It makes
no protocol decision: ``Connection`` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ObjectReceiveStream, TaskGroup

from haip_runtime.auth.tokens import Credentials
from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.session.session import Outbox

Inbound = Envelope | DecodeError


@dataclass
class Link:
    """One transport connection as the protocol layer sees it."""

    transport: str
    credentials: Credentials = field(default_factory=Credentials)
    #: Two-frame audio (an envelope with ``bin_len``, then one binary frame) can travel both ways.
    binary_frames: bool = False
    #: The transport finds a dead peer itself (WebSocket ping/pong control frames, a closed HTTP
    #: response), so a peer silent after a ``PING`` is not dropped for that (PROTOCOL.md section 3).
    watches_liveness: bool = False
    #: A resume asked for outside a HAI: ``(session id, last seq received)`` (SSE ``Last-Event-ID``).
    resume: tuple[str, int] | None = None


class Transport(Protocol):
    """What ``Runtime`` needs of a transport: its ``Link`` and its streams around an ``Outbox``."""

    link: Link

    def streams(self, outbox: Outbox) -> AbstractAsyncContextManager[ObjectReceiveStream[Inbound]]: ...


async def frames_as_text(outbox: Outbox) -> AsyncIterator[tuple[int, str]]:
    """``(seq, text)`` of each outbound frame for a text-only transport (binary parts inlined)."""
    async for frame in outbox.frames():
        yield frame.seq, frame.inline()


#: How long a connection closed with 1013 may take to write to a client that does not read.
ABORT_GRACE_SECONDS = 2.0


def cancel_when_stalled(outbox: Outbox, task_group: TaskGroup) -> None:
    """A 1013 close to a peer that does not read cannot be written: end the connection anyway.

    Every transport calls this for the task group that serves the connection: when the outbox is
    closed with 1013, the group is cancelled after ``ABORT_GRACE_SECONDS`` (a task only then).
    """

    def abort() -> None:
        task_group.start_soon(_cancel_after_grace, task_group.cancel_scope)

    outbox.on_abort = abort


async def _cancel_after_grace(scope: anyio.CancelScope) -> None:
    await anyio.sleep(ABORT_GRACE_SECONDS)
    scope.cancel()
