"""An in-memory transport pair: a connection with no socket, for fast tests of the session layer.

``MemoryTransport`` is the server side (it implements the transport seam); ``MemoryPeer`` is the
client side: it sends envelopes (as dicts or raw text) and reads the frames the runtime wrote,
with their binary parts. Closing either side ends the connection like a socket would.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode
from haip_runtime.transports.base import Frame, FrameSource, Inbound, Link

INBOUND_BUFFER = 64


class MemoryPeer:
    """The client end of a ``MemoryTransport``."""

    def __init__(self, send: MemoryObjectSendStream[str], receive: MemoryObjectReceiveStream[Frame]) -> None:
        self._send = send
        self._receive = receive
        #: The close code the runtime ended the connection with, once it has.
        self.close_code: int | None = None

    async def send_text(self, text: str) -> None:
        await self._send.send(text)

    async def send(self, envelope: dict[str, Any]) -> None:
        await self._send.send(json.dumps(envelope))

    async def receive(self) -> Frame:
        """The next frame the runtime wrote; raises ``anyio.EndOfStream`` once it closed."""
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            self._receive.close()
            raise

    async def receive_json(self) -> dict[str, Any]:
        frame = await self.receive()
        data: dict[str, Any] = json.loads(frame)
        return data

    async def aclose(self) -> None:
        """Hang up (the runtime sees the connection end); frames already written can still be read."""
        await self._send.aclose()


class MemoryTransport:
    """The runtime end: decodes what the peer sends, writes the outbox's frames to the peer."""

    def __init__(self, link: Link | None = None, *, max_frame_bytes: int = 1024 * 1024) -> None:
        self.link = link or Link("memory", binary_frames=True, watches_liveness=False)
        self.max_frame_bytes = max_frame_bytes
        self._to_server, self._from_peer = anyio.create_memory_object_stream[str](math.inf)
        self._to_peer, self._for_peer = anyio.create_memory_object_stream[Frame](math.inf)
        self.peer = MemoryPeer(self._to_server, self._for_peer)

    @asynccontextmanager
    async def streams(self, outbox: FrameSource) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
        send, receive = anyio.create_memory_object_stream[Inbound](INBOUND_BUFFER)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, send)
                tg.start_soon(self._write, outbox, tg.cancel_scope)
                async with receive:
                    yield receive
                outbox.close()  # the writer drains what is left, then ends the task group
        finally:
            send.close()
            self._from_peer.close()
            outbox.discard()

    async def _read(self, send: MemoryObjectSendStream[Inbound]) -> None:
        async with send, self._from_peer:
            try:
                async for text in self._from_peer:
                    try:
                        item: Inbound = decode(text, max_bytes=self.max_frame_bytes)
                    except DecodeError as error:
                        item = error
                    await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the connection is over: later frames are not read

    async def _write(self, outbox: FrameSource, scope: anyio.CancelScope) -> None:
        try:
            async for frame in outbox.frames():
                await self._to_peer.send(frame)
            self.peer.close_code = outbox.close_code
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self._to_peer.close()
            scope.cancel()
