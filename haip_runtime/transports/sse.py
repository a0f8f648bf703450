"""HAIP over Server-Sent Events: ``GET /haip/sse`` down, ``POST /haip/sse/{session}`` up (PROTOCOL.md section 1).

The GET needs credentials (``Authorization: Bearer`` or ``?token=``, which a browser's
``EventSource`` can send); its user is the one every POST must authenticate as. The stream
opens with the server ``HAI`` (``id: 1``; its envelope ``session`` names the session), each
envelope an event with ``id: <seq>`` and ``data: <json>``; comments keep proxies from closing an
idle stream. The client sends its ``HAI``, then everything else, as POSTs of one envelope or a
JSON array of them to ``/haip/sse/<session>`` (the HAI's session, or the resumed one). Resume:
``GET /haip/sse?session=<id>`` with ``Last-Event-ID`` (``EventSource`` sends it when it
reconnects to that URL) or ``&last_event_id=`` re-attaches the session without a HAI; a client
may also resume with a HAI carrying ``last_rx_seq`` as on WebSocket. The stream ends with an
``event: close`` whose data is ``{"code", "reason"}`` (the WebSocket close code it stands for).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from starlette.datastructures import Headers, QueryParams
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from haip_runtime.exceptions import DecodeError, ProtocolError
from haip_runtime.protocol.codec import decode
from haip_runtime.protocol.envelope import parse_uint64
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import CloseCode, ErrorCode
from haip_runtime.session.session import Outbox
from haip_runtime.transports.base import Inbound, Link, cancel_when_stalled, frames_as_text
from haip_runtime.transports.http import (
    ResponseWriter,
    end_on_disconnect,
    http_credentials,
    refused_origin,
    send_json,
)

if TYPE_CHECKING:
    from haip_runtime.server.app import Runtime

#: Envelopes from POSTs waiting for the session; a POST waits while it is full.
INBOUND_BUFFER = 64
#: Envelopes one POST may carry.
MAX_BATCH = 64
#: A POST body's bound, in frames of ``server.max_frame_bytes``.
MAX_BODY_FRAMES = 4
#: At most this long between keep-alive comments (shorter with a short heartbeat interval).
KEEPALIVE_SECONDS = 15.0


class SseTransport:
    """One SSE stream and the POSTs that feed it."""

    def __init__(self, link: Link, user: str, send: Send, receive: Receive, registry: SseRegistry) -> None:
        self.link = link
        self.user = user
        self.keepalive_seconds = KEEPALIVE_SECONDS
        self._send = send
        self._receive = receive
        self._registry = registry
        self.inbound: MemoryObjectSendStream[Inbound] | None = None

    @asynccontextmanager
    async def streams(self, outbox: Outbox) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
        send, receive = anyio.create_memory_object_stream[Inbound](INBOUND_BUFFER)
        self.inbound = send
        self._registry.add(self, outbox)
        writer = ResponseWriter(self._send)
        await writer.start(b"text/event-stream; charset=utf-8")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, writer, outbox, tg.cancel_scope)
                tg.start_soon(self._keep_alive, writer)
                tg.start_soon(end_on_disconnect, self._receive, tg.cancel_scope)
                cancel_when_stalled(outbox, tg)
                async with receive:
                    yield receive
                outbox.close()
        finally:
            send.close()
            outbox.discard()
            self._registry.remove(self, outbox)
            with anyio.move_on_after(0.5, shield=True):
                await writer.end()

    async def _write(self, writer: ResponseWriter, outbox: Outbox, scope: anyio.CancelScope) -> None:
        try:
            async for seq, text in frames_as_text(outbox):
                if seq == 1:
                    self._registry.name(self, json.loads(text).get("session", ""))
                await writer.write(b"id: %d\ndata: %s\n\n" % (seq, text.encode()))
            close = {"code": outbox.close_code or CloseCode.NORMAL, "reason": outbox.close_reason}
            await writer.end(b"event: close\ndata: %s\n\n" % json.dumps(close).encode())
        except OSError:
            pass  # the client went away
        finally:
            scope.cancel()

    async def _keep_alive(self, writer: ResponseWriter) -> None:
        with contextlib.suppress(OSError):  # the client went away: the disconnect ends the connection
            while True:
                await anyio.sleep(self.keepalive_seconds)
                await writer.write(b": keep-alive\n\n")


class SseRegistry:
    """The open SSE streams by the session ids they serve (a POST names one)."""

    def __init__(self) -> None:
        self._by_session: dict[str, SseTransport] = {}
        self._by_outbox: dict[Outbox, SseTransport] = {}

    def add(self, transport: SseTransport, outbox: Outbox) -> None:
        self._by_outbox[outbox] = transport
        if transport.link.resume is not None:
            self.name(transport, transport.link.resume[0])

    def name(self, transport: SseTransport, session_id: str) -> None:
        if session_id:
            self._by_session[session_id] = transport

    def remove(self, transport: SseTransport, outbox: Outbox) -> None:
        self._by_outbox.pop(outbox, None)
        for session_id in [key for key, value in self._by_session.items() if value is transport]:
            del self._by_session[session_id]

    def find(self, session_id: str, outbox: Outbox | None) -> SseTransport | None:
        """The stream serving ``session_id``: the one it opened on, or the one its session is attached to."""
        by_outbox = self._by_outbox.get(outbox) if outbox is not None else None
        return by_outbox or self._by_session.get(session_id)


class Asgi:
    """A plain ASGI endpoint for a Starlette ``Route`` (a function would be wrapped as request/response)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def sse_routes(runtime: Runtime) -> list[BaseRoute]:
    registry = SseRegistry()
    config = runtime.config

    async def open_stream(scope: Scope, receive: Receive, send: Send) -> None:
        if refused_origin(scope, config.server.allowed_origins):
            await send_json(send, 403, error_body(ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        credentials = http_credentials(scope)
        try:
            principal = await runtime.authenticator.authenticate(credentials.first(None))
        except ProtocolError as error:
            await send_json(send, 401, error_body(error.code, error.message))
            return
        link = Link("sse", credentials, resume=_resume_hint(scope))
        transport = SseTransport(link, principal.user, send, receive, registry)
        transport.keepalive_seconds = min(KEEPALIVE_SECONDS, config.session.heartbeat_interval_seconds / 2)
        await runtime.serve(transport)

    async def post(scope: Scope, receive: Receive, send: Send) -> None:
        if refused_origin(scope, config.server.allowed_origins):
            await send_json(send, 403, error_body(ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        try:
            principal = await runtime.authenticator.authenticate(http_credentials(scope).first(None))
        except ProtocolError as error:
            await send_json(send, 401, error_body(error.code, error.message))
            return
        session_id = str(scope["path_params"]["session"])
        session = runtime.hub.sessions.sessions.get(session_id)
        transport = registry.find(session_id, session.outbox if session is not None else None)
        if transport is None or transport.user != principal.user or transport.inbound is None:
            message = "no open SSE stream for this session; open GET /haip/sse first"
            await send_json(send, 404, error_body(ErrorCode.RESUME_FAILED, message))
            return
        limit = config.server.max_frame_bytes * MAX_BODY_FRAMES
        status, items = 202, []
        try:
            items = parse_batch(await read_body(receive, limit), config.server.max_frame_bytes)
        except DecodeError as error:
            status, items = 413 if error.code is ErrorCode.MESSAGE_TOO_LARGE else 400, [error]
        try:
            for item in items:
                await transport.inbound.send(item)  # a bad body is answered on the stream too, as on WebSocket
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            await send_json(send, 404, error_body(ErrorCode.RESUME_FAILED, "the stream has closed"))
            return
        if status != 202:
            refused = items[0]
            assert isinstance(refused, ProtocolError)
            await send_json(send, status, error_body(refused.code, refused.message, detail=refused.detail))
            return
        await send_json(send, 202, {"accepted": len(items)})

    return [
        Route("/haip/sse", Asgi(open_stream), methods=["GET"]),
        Route("/haip/sse/{session}", Asgi(post), methods=["POST"]),
    ]


def _resume_hint(scope: Scope) -> tuple[str, int] | None:
    query = QueryParams(scope.get("query_string", b""))
    session = query.get("session")
    last = parse_uint64(Headers(scope=scope).get("last-event-id") or query.get("last_event_id"))
    return (session, last) if session and last is not None else None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ``MESSAGE_TOO_LARGE`` past ``limit`` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise DecodeError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"request body exceeds {limit} bytes",
                detail={"where": "body", "limit": limit},
            )
        if not message.get("more_body", False):
            break
    return bytes(body)


def parse_batch(body: bytes, max_frame_bytes: int) -> list[Inbound]:
    """One envelope or a JSON array of them; each that fails to decode becomes its ``DecodeError``."""
    try:
        raw: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(ErrorCode.INVALID_MESSAGE, f"body is not JSON: {exc}", detail={"where": "body"}) from exc
    if not isinstance(raw, list):
        return [_decode(body, max_frame_bytes)]
    if len(raw) > MAX_BATCH:
        raise DecodeError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"at most {MAX_BATCH} envelopes per request, not {len(raw)}",
            detail={"where": "body", "limit": MAX_BATCH},
        )
    return [_decode(json.dumps(item, ensure_ascii=False), max_frame_bytes) for item in raw]


def _decode(frame: str | bytes, max_frame_bytes: int) -> Inbound:
    try:
        return decode(frame, max_bytes=max_frame_bytes)
    except DecodeError as error:
        return error
