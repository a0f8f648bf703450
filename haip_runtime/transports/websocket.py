"""HAIP over WebSocket: one JSON envelope per text frame (PROTOCOL.md sections 1 and 9).

``WebSocketTransport.streams`` accepts the socket (echoing the ``haip`` subprotocol when offered)
and yields the decoded inbound stream; the frames of the connection's ``FrameSource`` are written out
(an envelope with a binary part as two frames), and the socket is closed with the outbox's close
code. Two-frame input (an envelope with ``bin_len``, then one binary frame of that length) is put
back together here; a mismatch arrives as ``BINARY_FRAME_ERROR``. Dead peers are found by the
server's WebSocket ping/pong (uvicorn's ``ws_ping_interval``/``ws_ping_timeout``, which the CLI sets
from the heartbeat config), so a client that answers pings but sends nothing stays connected.
No protocol decisions here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream
from starlette.websockets import WebSocket, WebSocketDisconnect

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.transports.base import (
    Credentials,
    FrameSource,
    Inbound,
    Link,
    cancel_when_stalled,
    token_from_subprotocols,
)


def websocket_credentials(ws: WebSocket) -> Credentials:
    return Credentials(
        authorization=ws.headers.get("authorization"),
        subprotocol_token=token_from_subprotocols(list(ws.scope.get("subprotocols", []))),
        query_token=ws.query_params.get("token"),
    )


class WebSocketTransport:
    def __init__(self, ws: WebSocket, *, max_frame_bytes: int) -> None:
        self.ws = ws
        self.max_frame_bytes = max_frame_bytes
        self.link = Link("websocket", websocket_credentials(ws), binary_frames=True, watches_liveness=True)

    def streams(self, outbox: FrameSource) -> AbstractAsyncContextManager[ObjectReceiveStream[Inbound]]:
        return _Streams(self.ws, outbox, self.max_frame_bytes)


class _Streams:
    """Accepts the socket (echoing the ``haip`` subprotocol when offered), serves it inside a task group
    whose scope the writer (and a stalled 1013 close) cancels, and gives the inbound stream; on the way
    out the writer sends what is left, then the close frame.

    A class rather than an ``@asynccontextmanager`` generator: every idle connection holds its context
    manager for as long as it lives, and the generator, its frame and contextlib's wrapper were about
    600 bytes of it. ``__aexit__`` does what the generator's ``async with`` and ``finally`` did.
    """

    __slots__ = ("_group", "_inbound", "_writer", "max_frame_bytes", "outbox", "ws")

    def __init__(self, ws: WebSocket, outbox: FrameSource, max_frame_bytes: int) -> None:
        self.ws = ws
        self.outbox = outbox
        self.max_frame_bytes = max_frame_bytes

    async def __aenter__(self) -> ObjectReceiveStream[Inbound]:
        ws, outbox = self.ws, self.outbox
        offered = list(ws.scope.get("subprotocols", []))
        await ws.accept(subprotocol="haip" if "haip" in offered else None)
        try:
            group = self._group = anyio.create_task_group()
            await group.__aenter__()
        except BaseException:
            self._release(None)
            raise
        self._writer = _Writer(ws, outbox, group.cancel_scope)
        cancel_when_stalled(outbox, group)
        self._inbound = _Inbound(ws, self.max_frame_bytes)
        return self._inbound

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            await self._inbound.aclose()
            if exc is None:
                try:
                    self.outbox.close()  # the writer sends what is left, then the close frame
                    await self._writer.finished()
                except BaseException as error:
                    if not await self._group.__aexit__(type(error), error, error.__traceback__):
                        raise
                    return None
            return await self._group.__aexit__(exc_type, exc, tb)
        finally:
            self._release(self._writer)

    def _release(self, writer: _Writer | None) -> None:
        self.outbox.on_wake = None
        if writer is not None:
            writer.stop()
        self.outbox.discard()


class _Inbound(ObjectReceiveStream[Inbound]):
    """The socket's frames as envelopes, read by the connection itself.

    No reader task and no queue between the socket and the connection: each hop through an anyio
    memory stream cost two extra trips through the event loop per message. While the connection
    is busy with a message the socket is not read (uvicorn stops reading it), which is the
    back-pressure a queue of 64 used to give.
    """

    def __init__(self, ws: WebSocket, max_frame_bytes: int) -> None:
        self.ws = ws
        self._frames = _Reassembler(max_frame_bytes)
        self._ready: list[Inbound] = []  # one or two items at a time
        self._ended = False

    async def receive(self) -> Inbound:
        ready = self._ready
        while not ready:
            if self._ended:
                raise anyio.EndOfStream
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                message = {"type": "websocket.disconnect"}
            if message["type"] == "websocket.disconnect":
                self._ended = True
                raise anyio.EndOfStream
            ready.extend(self._frames.feed(message))
        return ready.pop(0)

    async def aclose(self) -> None:
        self._ended = True
        self._ready.clear()


class _Reassembler:
    """Text frames to envelopes; an envelope announcing ``bin_len`` waits for its binary frame."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.pending: Envelope | None = None

    def feed(self, message: Mapping[str, Any]) -> list[Inbound]:
        text, data = message.get("text"), message.get("bytes")
        items: list[Inbound] = []
        pending, self.pending = self.pending, None
        if isinstance(text, str):
            if pending is not None:
                items.append(_binary_error(pending, f"expected a binary frame of {pending.bin_len} bytes, got text"))
            try:
                envelope = decode(text, max_bytes=self.max_frame_bytes)
            except DecodeError as error:
                return [*items, error]
            if envelope.bin_len is not None:
                self.pending = envelope
            else:
                items.append(envelope)
            return items
        size = len(data) if isinstance(data, bytes) else 0
        if pending is None:
            unexpected = DecodeError(
                ErrorCode.BINARY_FRAME_ERROR,
                f"unexpected binary frame of {size} bytes (no envelope announced it)",
                detail={"where": "frame"},
            )
            return [unexpected]
        if size != pending.bin_len:
            return [_binary_error(pending, f"bin_len says {pending.bin_len} bytes, the binary frame has {size}")]
        assert isinstance(data, bytes)
        pending.attach_binary(data)
        return [pending]


def _binary_error(envelope: Envelope, message: str) -> DecodeError:
    error = DecodeError(
        ErrorCode.BINARY_FRAME_ERROR,
        f"{message}; the pair was dropped",
        related_id=envelope.id,
        detail={"where": "/bin_len"},
    )
    error.seq = envelope.seq  # it arrived: its place in the client's seqs is taken
    return error


#: A connection's writer task ends after this long with nothing to write (the next frame starts one).
WRITER_LINGER_SECONDS = 1.0


class _Writer:
    """Writes the outbox's frames to the socket, as a task that runs only while the connection is
    in use: an idle connection holds no writer (its task and frames were about a tenth of an idle
    connection's memory). The outbox starts it when frames wait; it retires after
    ``WRITER_LINGER_SECONDS`` with nothing to write (``FrameSource.frames``). On close it writes the close
    frame and ends the connection, as it does when the peer is gone."""

    def __init__(self, ws: WebSocket, outbox: FrameSource, scope: anyio.CancelScope) -> None:
        self.ws = ws
        self.outbox = outbox
        self.scope = scope
        self.task: asyncio.Task[None] | None = None
        outbox.on_wake = self.start

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def finished(self) -> None:
        if self.task is not None:
            await asyncio.shield(self.task)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        ws, outbox = self.ws, self.outbox
        try:
            async for frame in outbox.frames(WRITER_LINGER_SECONDS):
                await ws.send_text(frame)
                if frame.data is not None:
                    await ws.send_bytes(frame.data)
            if outbox.close_code is not None:
                await ws.close(code=outbox.close_code, reason=outbox.close_reason[:120])
                self.scope.cancel()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.scope.cancel()  # the peer went away: the connection ends
        finally:
            self.task = None
