"""The transport seam: what every transport (WebSocket, SSE, HTTP streaming, in-memory) gives a connection.

A transport is an async context manager that, given the connection's ``FrameSource`` (the
session's outbox), yields the stream of decoded inbound envelopes (a frame that fails to decode
arrives as a ``DecodeError`` value) and writes every ``Frame`` the source yields, in its own
framing. It describes itself with a ``Link``: the ``Credentials`` it found, whether it carries
binary frames, whether it finds a dead peer itself, and a resume it was asked for outside a
``HAI`` (SSE ``Last-Event-ID``). It makes no protocol decision and knows nothing above it:
authentication and sessions are the session layer's (``session/connection.py``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ObjectReceiveStream, TaskGroup

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.envelope import Envelope

Inbound = Envelope | DecodeError


@dataclass(frozen=True)
class Credentials:
    """Credentials a transport found outside the HAI payload, in priority order."""

    authorization: str | None = None
    subprotocol_token: str | None = None
    query_token: str | None = None

    def first(self, hai_token: str | None) -> str | None:
        for candidate in (self.authorization, self.subprotocol_token, self.query_token, hai_token):
            token = _strip_bearer(candidate)
            if token:
                return token
        return None


def _strip_bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return value.strip() or None


def token_from_subprotocols(offered: list[str]) -> str | None:
    """``Sec-WebSocket-Protocol: haip, token.<jwt>`` carries a token in the second entry."""
    for item in offered:
        if item.startswith("token."):
            return item.removeprefix("token.")
    return None


class Frame(str):
    """One outbound envelope as the window hands it out: its JSON text, its ``seq``, the session it
    belongs to and, in two-frame mode, its binary part. Made when read; the window keeps plain text (a
    ``str`` subclass carries a ``__dict__``, several hundred bytes a frame)."""

    seq: int
    data: bytes | None
    session: str

    @classmethod
    def make(cls, text: str, seq: int, data: bytes | None = None, session: str = "") -> Frame:
        frame = cls(text)
        frame.seq, frame.data, frame.session = seq, data, session
        return frame

    @property
    def size(self) -> int:
        return len(self) + (len(self.data) if self.data is not None else 0)

    def inline(self) -> str:
        """The envelope as one text frame (a binary part goes back into ``payload.data`` as base64)."""
        if self.data is None:
            return str(self)
        envelope = json.loads(self)
        envelope.pop("bin_len", None)
        envelope.pop("bin_mime", None)
        envelope["payload"]["data"] = base64.b64encode(self.data).decode("ascii")
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


class FrameSource(Protocol):
    """What a transport reads its connection's outbound frames from, and learns the close from.

    The session's ``Outbox`` (``session/window.py``) is the one implementation; a transport only
    iterates ``frames``, ends it, and installs the two callbacks it needs.
    """

    close_code: int | None
    close_reason: str
    #: Called when the connection must go at once (1013): the transport stops waiting on a stalled peer.
    on_abort: Callable[[], None] | None
    #: Called whenever there may be something to write.
    on_wake: Callable[[], None] | None

    def frames(self, linger: float | None = None) -> AsyncIterator[Frame]: ...

    def close(self, code: int = ..., reason: str = ...) -> None: ...

    def discard(self) -> None: ...


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
    resume: tuple[str, int | str] | None = None
    #: A W3C ``traceparent`` the request that opened it carried (SSE, HTTP streaming): the client's trace.
    traceparent: str | None = None


class Transport(Protocol):
    """What a connection needs of a transport: its ``Link`` and its streams around a ``FrameSource``."""

    link: Link

    def streams(self, outbox: FrameSource) -> AbstractAsyncContextManager[ObjectReceiveStream[Inbound]]: ...


async def frames_as_text(outbox: FrameSource) -> AsyncIterator[tuple[int, str]]:
    """``(seq, text)`` of each outbound frame for a text-only transport (binary parts inlined)."""
    async for frame in outbox.frames():
        yield frame.seq, frame.inline()


#: How long a connection closed with 1013 may take to write to a client that does not read.
ABORT_GRACE_SECONDS = 2.0


def cancel_when_stalled(outbox: FrameSource, task_group: TaskGroup) -> None:
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
