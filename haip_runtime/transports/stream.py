"""HAIP over one HTTP request: ``POST /haip/stream``, NDJSON both ways (PROTOCOL.md section 1).

The request body is read as it arrives, one envelope per line (lines split across chunks are put
back together; a line longer than ``server.max_frame_bytes`` is answered with
``MESSAGE_TOO_LARGE`` and skipped); the response body carries one envelope per line. The client
authenticates like on WebSocket (``Authorization``, ``?token=`` or its ``HAI``). When the request
body ends, the response goes on: the client may close its half once it has said everything, and
it is then judged alive while it keeps the response open. The connection ends when the client
closes the response; the session stays resumable (a new stream, or any transport, with a HAI
carrying ``last_rx_seq``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.session.session import Outbox
from haip_runtime.transports.base import Inbound, Link, cancel_when_stalled, frames_as_text
from haip_runtime.transports.http import (
    ResponseWriter,
    http_credentials,
    refused_origin,
    send_json,
)
from haip_runtime.transports.sse import Asgi

if TYPE_CHECKING:
    from haip_runtime.server.app import Runtime

#: Decoded envelopes waiting for the session; the request body stops being read while it is full.
INBOUND_BUFFER = 64


class StreamTransport:
    """One ``POST /haip/stream`` exchange."""

    def __init__(self, link: Link, send: Send, receive: Receive, *, max_frame_bytes: int) -> None:
        self.link = link
        self.max_frame_bytes = max_frame_bytes
        self._send = send
        self._receive = receive

    @asynccontextmanager
    async def streams(self, outbox: Outbox) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
        send, receive = anyio.create_memory_object_stream[Inbound](INBOUND_BUFFER)
        writer = ResponseWriter(self._send)
        await writer.start(b"application/x-ndjson")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, send, tg.cancel_scope)
                tg.start_soon(self._write, writer, outbox, tg.cancel_scope)
                cancel_when_stalled(outbox, tg)
                async with receive:
                    yield receive
                outbox.close()
        finally:
            send.close()
            outbox.discard()
            with anyio.move_on_after(0.5, shield=True):
                await writer.end()

    async def _read(self, send: ObjectSendStream[Inbound], scope: anyio.CancelScope) -> None:
        lines = LineSplitter(self.max_frame_bytes)
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    break
                for item in lines.feed(message.get("body", b"")):
                    await send.send(item)
                if not message.get("more_body", False):
                    for item in lines.feed(b"\n"):  # a last line without its newline
                        await send.send(item)
                    # The client has said everything; it stays connected while it reads the response.
                    self.link.watches_liveness = True
                    while (await self._receive())["type"] != "http.disconnect":
                        pass
                    break
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        scope.cancel()  # the client closed the connection

    async def _write(self, writer: ResponseWriter, outbox: Outbox, scope: anyio.CancelScope) -> None:
        try:
            async for _, text in frames_as_text(outbox):
                await writer.write(text.encode() + b"\n")
            await writer.end()
        except OSError:
            pass
        finally:
            scope.cancel()


class LineSplitter:
    """NDJSON from body chunks: whole lines, whichever chunks they came in; blank lines skipped."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Inbound]:
        items: list[Inbound] = []
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False
                self._partial.clear()
                continue
            self._partial += line
            whole = bytes(self._partial).strip()
            self._partial.clear()
            if whole:
                items.append(_decode(whole, self.max_line_bytes))
        if self._skipping:
            return items
        self._partial += rest
        if len(self._partial) > self.max_line_bytes:
            self._skipping = True
            self._partial.clear()
            items.append(
                DecodeError(
                    ErrorCode.MESSAGE_TOO_LARGE,
                    f"line longer than {self.max_line_bytes} bytes (skipped to its end)",
                    detail={"where": "frame", "limit": self.max_line_bytes},
                )
            )
        return items


def _decode(line: bytes, max_bytes: int) -> Inbound:
    try:
        return decode(line, max_bytes=max_bytes)
    except DecodeError as error:
        return error


def stream_routes(runtime: Runtime) -> list[BaseRoute]:
    config = runtime.config

    async def exchange(scope: Scope, receive: Receive, send: Send) -> None:
        if refused_origin(scope, config.server.allowed_origins):
            await send_json(send, 403, error_body(ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        link = Link("stream", http_credentials(scope))
        await runtime.serve(StreamTransport(link, send, receive, max_frame_bytes=config.server.max_frame_bytes))

    return [Route("/haip/stream", Asgi(exchange), methods=["POST"])]
