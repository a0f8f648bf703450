"""What the two HTTP transports (SSE, HTTP streaming) share: credentials, the Origin check, a
response writer that several tasks may use, and ending a connection when the client goes.

Both are plain ASGI endpoints rather than Starlette responses: they read the request and write
the response at the same time, and must see ``http.disconnect`` themselves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
from starlette.datastructures import Headers, QueryParams
from starlette.types import Receive, Scope, Send

from haip_runtime.auth.tokens import Credentials
from haip_runtime.transports.origin import origin_allowed

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


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


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


async def end_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """The client went away (or its request is over and it closes): end the connection."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
