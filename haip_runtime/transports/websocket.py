"""HAIP over WebSocket: one JSON envelope per text frame (PROTOCOL.md sections 1 and 9).

``WebSocketTransport.streams`` accepts the socket (echoing the ``haip`` subprotocol when offered)
and yields the decoded inbound stream; the frames of the connection's ``Outbox`` are written out
(an envelope with a binary part as two frames), and the socket is closed with the outbox's close
code. Two-frame input (an envelope with ``bin_len``, then one binary frame of that length) is put
back together here; a mismatch arrives as ``BINARY_FRAME_ERROR``. Dead peers are found by the
server's WebSocket ping/pong (uvicorn's ``ws_ping_interval``/``ws_ping_timeout``, which the CLI sets
from the heartbeat config), so a client that answers pings but sends nothing stays connected.
No protocol decisions here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from starlette.websockets import WebSocket, WebSocketDisconnect

from haip_runtime.auth import Credentials, token_from_subprotocols
from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import CloseCode, ErrorCode
from haip_runtime.session import Outbox
from haip_runtime.transports.base import Inbound, Link, abort_when_stalled

#: Decoded envelopes waiting for the session; the socket stops being read while it is full.
INBOUND_BUFFER = 64


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

    @asynccontextmanager
    async def streams(self, outbox: Outbox) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
        async with websocket_streams(self.ws, outbox, max_frame_bytes=self.max_frame_bytes) as inbound:
            yield inbound


@asynccontextmanager
async def websocket_streams(
    ws: WebSocket, outbox: Outbox, *, max_frame_bytes: int
) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
    offered = list(ws.scope.get("subprotocols", []))
    await ws.accept(subprotocol="haip" if "haip" in offered else None)
    send, receive = anyio.create_memory_object_stream[Inbound](INBOUND_BUFFER)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_frames, ws, send, max_frame_bytes)
            tg.start_soon(_write_frames, ws, outbox, tg.cancel_scope)
            tg.start_soon(abort_when_stalled, outbox, tg.cancel_scope)
            async with receive:
                yield receive
            outbox.close()
    finally:
        send.close()
        outbox.discard()


async def _read_frames(ws: WebSocket, send: ObjectSendStream[Inbound], max_frame_bytes: int) -> None:
    frames = _Reassembler(max_frame_bytes)
    async with send:
        while True:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                for item in frames.feed(message):
                    await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the connection is being closed; later frames are not read


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
    return DecodeError(
        ErrorCode.BINARY_FRAME_ERROR,
        f"{message}; the pair was dropped",
        related_id=envelope.id,
        detail={"where": "/bin_len"},
    )


async def _write_frames(ws: WebSocket, outbox: Outbox, scope: anyio.CancelScope) -> None:
    try:
        async for frame in outbox.frames():
            await ws.send_text(frame)
            if frame.data is not None:
                await ws.send_bytes(frame.data)
        await ws.close(code=outbox.close_code or CloseCode.NORMAL, reason=outbox.close_reason[:120])
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the peer went away; the reader ends the connection
    finally:
        scope.cancel()
