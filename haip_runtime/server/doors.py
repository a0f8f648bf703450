"""The HAIP doors: the routes of the three transports (PROTOCOL.md section 1).

``/haip/websocket`` and ``/`` (WebSocket), ``GET /haip/sse`` with ``POST /haip/sse/{session}``
(SSE), ``POST /haip/stream`` (HTTP streaming). Each checks the ``Origin`` and, where the request
itself must carry credentials (SSE), authenticates in one preamble, then hands its transport to
``Doorway.serve``; everything after that is the session layer's. Routes see a ``Doorway``, not
the runtime: what they use and nothing to reach through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import HaipConfig
from haip_runtime.exceptions import DecodeError, ProtocolError
from haip_runtime.protocol.events import CloseCode, ErrorCode
from haip_runtime.transports.base import FrameSource, Inbound, Link, Transport
from haip_runtime.transports.http import Asgi, http_credentials, http_error_body, refused_origin, send_error, send_json
from haip_runtime.transports.origin import origin_allowed
from haip_runtime.transports.sse import (
    KEEPALIVE_SECONDS,
    MAX_BODY_FRAMES,
    SseRegistry,
    SseTransport,
    parse_batch,
    read_body,
    resume_hint,
)
from haip_runtime.transports.stream import StreamTransport
from haip_runtime.transports.websocket import WebSocketTransport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Doorway:
    """What the transport routes need of the runtime."""

    config: HaipConfig
    #: Who a bearer token belongs to (``HandshakeError`` if nobody).
    authenticate: Callable[[str | None], Awaitable[Principal]]
    #: Serve one connection over a transport until either side ends it.
    serve: Callable[[Transport], Awaitable[None]]
    #: The outbox a session's frames currently go to (``None``: unknown or detached).
    outbox_of: Callable[[str], FrameSource | None]
    #: Serve envelopes POSTed to a user's session that no stream serves now but that is resumable
    #: (``False``: there is none); their answers wait in its window for the next stream.
    serve_detached: Callable[[str, str, list[Inbound]], Awaitable[bool]]
    #: In a cluster: send a POST's body to the node holding the user's session (``False``: no node does).
    forward: Callable[[str, str, bytes], Awaitable[bool]] | None = None
    #: In a cluster: where POSTs forwarded to this node from others go (given the door's own handler).
    on_forwarded: Callable[[Callable[[str, str, list[Inbound]], Awaitable[bool]]], None] | None = None
    #: In a cluster: a new SSE stream of a user opened here for a session (its first POSTs may land elsewhere).
    on_stream: Callable[[str, str], Awaitable[None]] | None = None


def haip_routes(door: Doorway) -> list[BaseRoute]:
    config = door.config
    registry = SseRegistry(door.on_stream)

    async def refused(scope: Scope, send: Send) -> bool:
        """The Origin check of every HTTP door; ``True`` once it has answered 403."""
        if refused_origin(scope, config.server.allowed_origins):
            await send_error(send, 403, ProtocolError(ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return True
        return False

    async def caller(scope: Scope, send: Send) -> Principal | None:
        """The preamble of a door whose request must carry credentials; ``None`` once it has answered."""
        if await refused(scope, send):
            return None
        try:
            return await door.authenticate(http_credentials(scope).first(None))
        except ProtocolError as error:
            await send_error(send, 401, error)
            return None

    async def upgrade_required(scope: Scope, receive: Receive, send: Send) -> None:
        """A plain HTTP request to the WebSocket door (a browser tab, curl): 426, saying what it takes."""
        message = "this path takes a WebSocket (Upgrade: websocket); over plain HTTP use /haip/sse or /haip/stream"
        headers = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
        await send_json(send, 426, http_error_body(ProtocolError(ErrorCode.INVALID_MESSAGE, message)), headers)

    def websocket(ws: WebSocket) -> Awaitable[None]:
        # Not a coroutine itself: Starlette awaits what it returns, so this step keeps no frame of its
        # own for as long as the connection lives (about 230 bytes of each idle connection).
        if not origin_allowed(ws.headers, config.server.allowed_origins):
            logger.warning("refused a WebSocket from origin %r (not in server.allowed_origins)", ws.headers["origin"])
            return ws.close(CloseCode.POLICY)  # before accept: the upgrade is answered with HTTP 403
        return door.serve(WebSocketTransport(ws, max_frame_bytes=config.server.max_frame_bytes))

    async def open_sse(scope: Scope, receive: Receive, send: Send) -> None:
        principal = await caller(scope, send)
        if principal is None:
            return
        link = Link("sse", http_credentials(scope), resume=resume_hint(scope), traceparent=traceparent(scope))
        transport = SseTransport(link, principal.user, send, receive, registry)
        transport.keepalive_seconds = min(KEEPALIVE_SECONDS, config.session.heartbeat_interval_seconds / 2)
        await door.serve(transport)

    async def post_sse(scope: Scope, receive: Receive, send: Send) -> None:
        principal = await caller(scope, send)
        if principal is None:
            return
        session_id = str(scope["path_params"]["session"])
        max_frame = config.server.max_frame_bytes
        refusal: DecodeError | None = None  # the body as a whole, not one of its envelopes
        body: bytes | None = None
        try:
            body = await read_body(receive, max_frame * MAX_BODY_FRAMES, config.server.body_timeout_seconds)
            items = parse_batch(body, max_frame)
        except DecodeError as error:
            refusal, items = error, [error]
        taken = await post_items(principal.user, session_id, items)  # a bad body is answered on the stream too
        if not taken and door.forward is not None and body is not None:
            try:
                taken = await door.forward(session_id, principal.user, body)  # held by another node?
            except ProtocolError as error:  # the cluster's bus is unavailable
                await send_error(send, 503, error)
                return
        if not taken:
            message = "no open SSE stream or resumable session with this id; open GET /haip/sse first"

            await send_error(send, 404, ProtocolError(ErrorCode.RESUME_FAILED, message))
            return
        if refusal is not None:
            await send_error(send, 413 if refusal.code is ErrorCode.MESSAGE_TOO_LARGE else 400, refusal)
            return
        await send_json(send, 202, {"accepted": len(items)})

    async def post_items(user: str, session_id: str, items: list[Inbound]) -> bool:
        """Hand POSTed envelopes to the stream serving the session or, between two streams (or while one
        closes), have them served at once; ``False`` if there is neither."""
        outbox = door.outbox_of(session_id)
        if (outbox is None or outbox.close_code is not None) and await door.serve_detached(session_id, user, items):
            return True
        transport = registry.find(session_id, outbox)
        if transport is None or transport.user != user or transport.inbound is None:
            return False
        try:
            for item in items:
                await transport.inbound.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    if door.on_forwarded is not None:
        door.on_forwarded(post_items)

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        if not await refused(scope, send):
            link = Link("stream", http_credentials(scope), traceparent=traceparent(scope))
            await door.serve(StreamTransport(link, send, receive, max_frame_bytes=config.server.max_frame_bytes))

    return [
        WebSocketRoute("/haip/websocket", websocket),
        WebSocketRoute("/", websocket),
        Route("/haip/websocket", Asgi(upgrade_required)),
        Route("/haip/sse", Asgi(open_sse), methods=["GET"]),
        Route("/haip/sse/{session}", Asgi(post_sse), methods=["POST"]),
        Route("/haip/stream", Asgi(stream), methods=["POST"]),
    ]


def traceparent(scope: Scope) -> str | None:
    """The W3C ``traceparent`` header of an HTTP door's request: a trace the client's messages continue."""
    return Headers(scope=scope).get("traceparent")
