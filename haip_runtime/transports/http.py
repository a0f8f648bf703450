"""What the two HTTP transports (SSE, HTTP streaming) share: credentials, the Origin check, a
response writer that several tasks may use, ending a connection when the client goes, and the
one shape of an HTTP error (``{"error": {"code", "message", "detail"?}}``, PROTOCOL.md section 1).

Both are plain ASGI endpoints rather than Starlette responses: they read the request and write
the response at the same time, and must see ``http.disconnect`` themselves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from starlette.datastructures import Headers, QueryParams
from starlette.types import Message, Receive, Scope, Send

from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.errors import error_body
from haip_runtime.transports.base import Credentials, FrameSource, Inbound, cancel_when_stalled
from haip_runtime.transports.origin import origin_allowed

#: Decoded envelopes waiting for the session; the request (body or POSTs) waits while it is full.
INBOUND_BUFFER = 64
#: Headers of a streamed response: no caching, no proxy buffering, no compression.
STREAM_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
    (b"content-encoding", b"identity"),
]


def http_credentials(scope: Scope) -> Credentials:
    headers, query = Headers(scope=scope), QueryParams(scope.get("query_string", b""))
    return Credentials(authorization=headers.get("authorization"), query_token=query.get("token"))


def refused_origin(scope: Scope, allowed: Sequence[str]) -> bool:
    return not origin_allowed(Headers(scope=scope), allowed)


def replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app after the body was read: the body once, then the connection's own messages."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


def http_error_body(error: ProtocolError) -> dict[str, Any]:
    """The body of every HTTP error the runtime answers (REST, SSE, HTTP streaming, health)."""
    return {"error": error_body(error.code, error.message, detail=error.detail)}


def http_error_headers(status: int) -> dict[str, str]:
    """The headers an error answer carries: a 401 names the scheme the credentials must use."""
    return {"www-authenticate": "Bearer"} if status == 401 else {}


async def send_error(send: Send, status: int, error: ProtocolError) -> None:
    """Answer a plain ASGI request with ``status`` and the error's body."""
    headers = [(name.encode(), value.encode()) for name, value in http_error_headers(status).items()]
    await send_json(send, status, http_error_body(error), headers)


class Asgi:
    """A plain ASGI endpoint for a Starlette ``Route`` (a function would be wrapped as request/response)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class ResponseWriter:
    """One streamed response body, written by the frame writer and the keep-alive in turn."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = anyio.Lock()
        self.ended = False

    async def start(self, content_type: bytes) -> None:
        headers = [(b"content-type", content_type), *STREAM_HEADERS]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def write(self, data: bytes) -> None:
        async with self._lock:
            if not self.ended:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        async with self._lock:
            if not self.ended:
                self.ended = True
                await self._send({"type": "http.response.body", "body": data, "more_body": False})


@asynccontextmanager
async def streamed_response(
    send: Send,
    content_type: bytes,
    outbox: FrameSource,
    start: Callable[[ResponseWriter, MemoryObjectSendStream[Inbound], TaskGroup], None],
) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
    """A connection over one streamed response: ``start`` starts the transport's tasks (its writer,
    and its reader or keep-alive) in a group that ends with the connection; the group is cancelled
    as for any transport when a 1013 close cannot be written. Yields the inbound envelopes."""
    inbound, receive = anyio.create_memory_object_stream[Inbound](INBOUND_BUFFER)
    writer = ResponseWriter(send)
    await writer.start(content_type)
    try:
        async with anyio.create_task_group() as tg:
            start(writer, inbound, tg)
            cancel_when_stalled(outbox, tg)
            async with receive:
                yield receive
            outbox.close()
    finally:
        inbound.close()
        outbox.discard()
        with anyio.move_on_after(0.5, shield=True):
            await writer.end()


async def end_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """The client went away (or its request is over and it closes): end the connection."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
