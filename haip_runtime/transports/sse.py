"""HAIP over Server-Sent Events: ``GET /haip/sse`` down, ``POST /haip/sse/{session}`` up (PROTOCOL.md section 1).

The GET needs credentials (``Authorization: Bearer`` or ``?token=``, which a browser's
``EventSource`` can send); its user is the one every POST must authenticate as. The stream
opens with the server ``HAI`` (its envelope ``session`` names the session), each envelope an
event with ``id: <session>:<seq>`` and ``data: <json>``; comments keep proxies from closing an
idle stream. The client sends its ``HAI``, then everything else, as POSTs of one envelope or a
JSON array of them to ``/haip/sse/<session>`` (the HAI's session, or the resumed one). Resume: a
GET with ``Last-Event-ID: <session>:<seq>`` (what a plain ``EventSource`` sends when it reconnects
to the URL it was made with) re-attaches the session without a HAI, as do ``?session=<id>`` with a
bare seq in ``Last-Event-ID`` or ``&last_event_id=``; a client may also resume with a HAI carrying
``last_rx_seq`` as on WebSocket. POSTs to a session between two streams are the router's to route
(``server/doors.py``). The stream ends with an ``event: close`` whose data is ``{"code", "reason"}``
(the WebSocket close code it stands for).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from starlette.datastructures import Headers, QueryParams
from starlette.types import Receive, Scope, Send

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.codec import decode, load_json
from haip_runtime.protocol.envelope import parse_uint64
from haip_runtime.protocol.events import CloseCode, ErrorCode
from haip_runtime.transports.base import FrameSource, Inbound, Link
from haip_runtime.transports.http import (
    ResponseWriter,
    end_on_disconnect,
    streamed_response,
)

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
    async def streams(self, outbox: FrameSource) -> AsyncIterator[ObjectReceiveStream[Inbound]]:
        def start(writer: ResponseWriter, inbound: MemoryObjectSendStream[Inbound], tg: TaskGroup) -> None:
            self.inbound = inbound
            self._registry.add(self, outbox)  # POSTs find it from now on, with somewhere to put what they carry
            tg.start_soon(self._write, writer, outbox, tg.cancel_scope)
            tg.start_soon(self._keep_alive, writer)
            tg.start_soon(end_on_disconnect, self._receive, tg.cancel_scope)

        try:
            async with streamed_response(self._send, b"text/event-stream; charset=utf-8", outbox, start) as receive:
                yield receive
        finally:
            self._registry.remove(self, outbox)

    async def _write(self, writer: ResponseWriter, outbox: FrameSource, scope: anyio.CancelScope) -> None:
        try:
            session = ""
            async for frame in outbox.frames():
                if frame.session != session:  # the first frame, or a HAI's resume moved the stream
                    fresh, session = not session, frame.session
                    self._registry.name(self, session)
                    asked = self.link.resume[0] if self.link.resume is not None else ""
                    if fresh and asked and asked != session:
                        # Its resume failed: the old id is not served here. (A tester's find: a POST to it
                        # became the new session's first frame, HANDSHAKE_REQUIRED, and a close 1008.)
                        self._registry.unname(self, asked)
                    if fresh and self._registry.on_opened is not None and self.link.resume is None:
                        await self._registry.on_opened(session, self.user)  # before the client learns its id
                event_id = f"{session}:{frame.seq}".encode()
                await writer.write(b"id: %s\ndata: %s\n\n" % (event_id, frame.inline().encode()))
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

    def __init__(self, on_opened: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        #: Awaited with (session id, user) when a new stream learns its session, before it writes anything.
        self.on_opened = on_opened
        self._by_session: dict[str, SseTransport] = {}
        self._by_outbox: dict[FrameSource, SseTransport] = {}

    def add(self, transport: SseTransport, outbox: FrameSource) -> None:
        self._by_outbox[outbox] = transport
        if transport.link.resume is not None:
            self.name(transport, transport.link.resume[0])

    def name(self, transport: SseTransport, session_id: str) -> None:
        if session_id:
            self._by_session[session_id] = transport

    def unname(self, transport: SseTransport, session_id: str) -> None:
        if self._by_session.get(session_id) is transport:
            del self._by_session[session_id]

    def remove(self, transport: SseTransport, outbox: FrameSource) -> None:
        self._by_outbox.pop(outbox, None)
        for session_id in [key for key, value in self._by_session.items() if value is transport]:
            del self._by_session[session_id]

    def find(self, session_id: str, outbox: FrameSource | None) -> SseTransport | None:
        """The stream serving ``session_id``: the one it opened on, or the one its session is attached to."""
        by_outbox = self._by_outbox.get(outbox) if outbox is not None else None
        return by_outbox or self._by_session.get(session_id)


def resume_hint(scope: Scope) -> tuple[str, int | str] | None:
    """The resume a GET asks for: ``Last-Event-ID`` (or ``?last_event_id=``) as ``<session>:<seq>``, or a
    bare seq with ``?session=``; ``None`` if none (a fresh session). A seq that is not one is kept as
    given: the resume fails with ``RESUME_FAILED`` saying so, rather than starting a session unasked."""
    query = QueryParams(scope.get("query_string", b""))
    last_event_id = Headers(scope=scope).get("last-event-id") or query.get("last_event_id") or ""
    if not last_event_id:
        return None
    named, _, seq = last_event_id.rpartition(":")
    session = named or query.get("session") or ""  # (none: not an id this runtime sent, which fails too)
    last = parse_uint64(seq)
    return (session, last if last is not None else seq)


async def read_body(receive: Receive, limit: int, timeout: float = math.inf) -> bytes:
    """The whole request body; ``MESSAGE_TOO_LARGE`` past ``limit`` bytes, ``INVALID_MESSAGE`` if it
    has not all arrived within ``timeout`` seconds (``server.body_timeout_seconds``)."""
    with anyio.move_on_after(timeout):
        return await _read_body(receive, limit)
    raise DecodeError(
        ErrorCode.INVALID_MESSAGE,
        f"request body not received within {timeout:g} s (server.body_timeout_seconds)",
        detail={"where": "body", "limit": timeout},
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise DecodeError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"request body exceeds {limit} bytes: none of it was taken; send its envelopes again in smaller"
                " requests, with the same seqs",
                detail={"where": "body", "limit": limit},
            )
        if not message.get("more_body", False):
            break
    return bytes(body)


def parse_batch(body: bytes, max_frame_bytes: int) -> list[Inbound]:
    """One envelope or a JSON array of them; each that fails to decode becomes its ``DecodeError``."""
    raw: Any = load_json(body, where="body")  # not JSON, too deep, unkeepable: the body as a whole
    if not isinstance(raw, list):
        return [_decode(body, max_frame_bytes)]
    if len(raw) > MAX_BATCH:
        raise DecodeError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"at most {MAX_BATCH} envelopes per request, not {len(raw)}: none was taken; send them again in"
            " smaller requests, with the same seqs (a seq left unsent is a gap the later ones wait for)",
            detail={"where": "body", "limit": MAX_BATCH},
        )
    # Each measured as its compact JSON (what a client sends, and at most its own text but for a rare
    # number written longer): with json's default spaces, one at the limit was refused in a batch only.
    return [_decode(json.dumps(item, ensure_ascii=False, separators=(",", ":")), max_frame_bytes) for item in raw]


def _decode(frame: str | bytes, max_frame_bytes: int) -> Inbound:
    try:
        return decode(frame, max_bytes=max_frame_bytes)
    except DecodeError as error:
        return error
