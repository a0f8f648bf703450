"""Sockets of connections the runtime has ended are closed, even when the peer never reads.

When a connection ends (the runtime dropped a client that fell behind, a WebSocket ping timed
out, a stream ended), uvicorn closes its transport, and asyncio's ``close()`` first waits for the
write buffer to drain: a peer that never reads kept its socket ESTABLISHED with megabytes queued
for as long as it liked. ``SocketReaper`` wraps the app: every time a request or WebSocket ends,
it looks at the connection it came on after ``GRACE`` seconds and again after as many; if bytes
are still waiting and none left in between, the peer is not reading, and the socket is aborted
(RST, its buffer freed). A peer that reads, or an idle keep-alive connection, is left alone.

A WebSocket the runtime closed waits for the peer's close frame; uvicorn (its websockets-sansio
protocol) meanwhile reads and discards whatever the peer sends, for up to 10 s (a timeout it does not
let us set): a client flooding a session that was closed for it went on being read. So a WebSocket
whose close frame went out and that is still open at the reaper's first look is closed at once.

uvicorn does not give the app its transport: ``attach(server)`` lets the reaper find the
connection by the client address in the scope, among the server's open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

#: Seconds between the end of a connection and each look at its socket.
GRACE = 2.0


class SocketReaper:
    """Looks at the socket of each ended connection, and aborts it if its peer stopped reading."""

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        #: The server's open connections (uvicorn protocols, with ``client`` and ``transport``).
        self.connections: Callable[[], Iterable[Any]] = tuple

    def attach(self, server: Any) -> None:
        """Watch the connections of ``server`` (a ``uvicorn.Server``)."""
        self.connections = lambda: list(server.server_state.connections)

    def ended(self, client: tuple[str, int]) -> None:
        asyncio.get_running_loop().call_later(self.grace, self._look, client, None)

    def _look(self, client: tuple[str, int], before: int | None) -> None:
        for connection in self.connections():
            transport = getattr(connection, "transport", None)
            if getattr(connection, "client", None) is None or tuple(connection.client) != client or transport is None:
                continue
            waiting = transport.get_write_buffer_size()
            if not waiting:
                if getattr(connection, "close_sent", False) is True and not transport.is_closing():
                    # Our close frame went out and no close came back (uvicorn would read for 10 s). Closed,
                    # not reset: a slow client still reads what was sent (the kernel resets only a peer
                    # that keeps sending).
                    transport.close()
                    logger.info("closed the socket of %s:%d: its peer did not answer the close frame", *client)
                return  # drained (or an idle keep-alive connection): nothing stuck
            if before is None or waiting < before:  # first look, or the peer reads: look again later
                asyncio.get_running_loop().call_later(self.grace, self._look, client, waiting)
                return
            _abort(transport)
            logger.info("aborted the socket of %s:%d: %d bytes unread by a peer that stopped reading", *client, waiting)
            return

    async def patrol(self, head_timeout: float) -> None:
        """Close HTTP connections that sent no complete request head within ``head_timeout`` seconds
        of opening or of their last response (``server.header_timeout_seconds``): slow-header clients."""
        first_seen: dict[tuple[int, int], float] = {}
        while True:
            await anyio.sleep(min(1.0, head_timeout / 4))
            now, seen, closed = time.monotonic(), {}, 0
            for connection in self.connections():
                if not hasattr(connection, "cycle") or connection.transport.is_closing():
                    continue  # a WebSocket, or already going
                cycle = connection.cycle
                if cycle is not None and not cycle.response_complete:
                    continue  # a request is under way: its head is complete
                key = (id(connection), id(cycle))
                seen[key] = since = first_seen.get(key, now)
                if now - since >= head_timeout:
                    connection.transport.close()
                    closed += 1
            first_seen = seen
            if closed:
                logger.info("closed %d connections with no complete request head in %g s", closed, head_timeout)


def _abort(transport: Any) -> None:
    """Close with a reset: the kernel frees at once what it still holds for the peer, both ways."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ReapOnEnd:
    """ASGI middleware: tell ``reaper`` about every request and WebSocket that ends."""

    def __init__(self, app: ASGIApp, reaper: SocketReaper) -> None:
        self.app = app
        self.reaper = reaper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            client = scope.get("client")
            if scope["type"] in ("http", "websocket") and client:
                self.reaper.ended((str(client[0]), int(client[1])))
