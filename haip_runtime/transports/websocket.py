"""HAIP over WebSocket: one JSON envelope per text frame (PROTOCOL.md section 1).

``websocket_streams`` accepts the socket (echoing the ``haip`` subprotocol when offered) and
yields the decoded inbound stream; the frames queued in the connection's ``Outbox`` are written
out, and the socket is closed with the outbox's close code. No protocol decisions here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from starlette.websockets import WebSocket, WebSocketDisconnect

from haip_runtime.auth import Credentials, token_from_subprotocols
from haip_runtime.connection import Inbound
from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.events import CloseCode, ErrorCode
from haip_runtime.session import Outbox

#: Decoded envelopes waiting for the session; the socket stops being read while it is full.
INBOUND_BUFFER = 64
#: How long a connection closed with 1013 may take to write its close frame to a peer that does not read.
ABORT_GRACE_SECONDS = 2.0


def websocket_credentials(ws: WebSocket) -> Credentials:
    return Credentials(
        authorization=ws.headers.get("authorization"),
        subprotocol_token=token_from_subprotocols(list(ws.scope.get("subprotocols", []))),
        query_token=ws.query_params.get("token"),
    )


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
            tg.start_soon(_abort_when_stalled, outbox, tg.cancel_scope)
            async with receive:
                yield receive
            outbox.close()
    finally:
        send.close()
        outbox.discard()


async def _read_frames(ws: WebSocket, send: ObjectSendStream[Inbound], max_frame_bytes: int) -> None:
    async with send:
        while True:
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                await send.send(_decode_message(message, max_frame_bytes))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the connection is being closed; later frames are not read


def _decode_message(message: Mapping[str, Any], max_frame_bytes: int) -> Inbound:
    text, data = message.get("text"), message.get("bytes")
    if isinstance(text, str):
        try:
            return decode(text, max_bytes=max_frame_bytes)
        except DecodeError as error:
            return error
    size = len(data) if isinstance(data, bytes) else 0
    return DecodeError(
        ErrorCode.BINARY_FRAME_ERROR,
        f"unexpected binary frame of {size} bytes (no envelope announced it)",
        detail={"where": "frame"},
    )


async def _abort_when_stalled(outbox: Outbox, scope: anyio.CancelScope) -> None:
    """A 1013 close to a peer that does not read cannot be written: end the connection anyway."""
    await outbox.aborted.wait()
    await anyio.sleep(ABORT_GRACE_SECONDS)
    scope.cancel()


async def _write_frames(ws: WebSocket, outbox: Outbox, scope: anyio.CancelScope) -> None:
    try:
        async for frame in outbox.frames():
            await ws.send_text(frame)
        await ws.close(code=outbox.close_code or CloseCode.NORMAL, reason=outbox.close_reason[:120])
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the peer went away; the reader ends the connection
    finally:
        scope.cancel()
