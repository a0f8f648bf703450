"""The last line of every HTTP route: an exception nothing else answered becomes a JSON error.

Starlette answers an unhandled exception with a plain-text ``Internal Server Error`` and re-raises
it for uvicorn to log a second time. ``JsonFailsafe`` wraps the whole app instead: it logs the
exception once, with its traceback, and answers the one HTTP error shape (``{"error": {"code",
"message"}}``): ``STORAGE_ERROR`` (503) for a store that could not read, ``INTERNAL_ERROR`` (500)
for anything else. A response already under way (a stream) can only be ended; WebSocket and
lifespan messages pass through untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from haip_runtime.exceptions import ProtocolError, StorageError
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.transports.http import send_error

logger = logging.getLogger(__name__)


class JsonFailsafe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: a WebSocket is handed the app's own awaitable, so this layer keeps
        # no frame for as long as the connection lives (about 370 bytes of each idle connection).
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = answered = False

        async def sending(message: Message) -> None:
            nonlocal started, answered
            started = started or message["type"] == "http.response.start"
            await send(message)
            answered = answered or (message["type"] == "http.response.body" and not message.get("more_body"))

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            error: ProtocolError
            if answered:  # the client has its whole answer: what failed after costs it nothing
                # (an integrator's find: the MCP SDK, answering a notification of a client that had just closed
                # its session, tried to answer it again: an ERROR traceback each time, for a normal cancel)
                logger.warning(
                    "%s %s: an error after its response was sent: %s: %s",
                    scope.get("method"),
                    scope.get("path"),
                    type(exc).__name__,
                    exc,
                )
                return
            if isinstance(exc, StorageError):
                logger.error("%s %s: %s", scope.get("method"), scope.get("path"), exc.message)
                status, error = 503, exc
            else:
                logger.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
                status, error = 500, ProtocolError(ErrorCode.INTERNAL_ERROR, "internal error; see the server log")
            if not started:
                await send_error(send, status, error)
