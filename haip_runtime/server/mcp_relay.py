"""`/mcp` sessions in a cluster: a request for an MCP session another node holds is carried to that node.

The 2025-11-25 handshake makes a session (`Mcp-Session-Id`) that lives in the memory of the node that
answered `initialize`: the SDK's session, its streams, the elicitations a call waits on, the cancels
it takes. Behind a balancer without stickiness, or under `serve --workers N` (the kernel spreads
connections over the workers), the client's next request may reach another node, whose SDK does not
know the session ("Session not found"). So in a cluster the id a client is given names the node:
``<SDK's id>~<node>``. A request naming another node is sent to it on its channel (``Bus.tell``);
that node serves it as if it had come in itself (the door's Origin and token checks included) and
sends the response back in order, its start and each part of its body, on the asking node's
channel; the asking node streams them to the client. The 2026-07-28 protocol has no sessions: any
node serves any of its requests, and nothing here is involved.

Either side may go: a client that goes away is a disconnect at the serving node too (``mcp!``); the
serving node asks every ``PING_SECONDS`` whether the asking node still waits (``mcp?``), and stops
serving when it does not (it died, or forgot the request); the asking node ends a response when the
serving node has said nothing for ``3 × PING_SECONDS`` (it died). A session whose node is gone is
the SDK's own "Session not found" (404): the client starts a new session, as the MCP spec says.

Notices (on a node's channel, after ``roaming.py``'s): ``mcp> <head>\\n<body>`` a request,
``mcp< <head>\\n<bytes>`` a response's start or a part of its body, ``mcp! <id>`` cancel,
``mcp? <id> <node>`` still waiting?
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from haip_runtime.exceptions import ClusterError, ProtocolError
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.transports.http import send_error

if TYPE_CHECKING:  # (redis is imported by a cluster only)
    from haip_runtime.cluster import Bus

logger = logging.getLogger(__name__)

HEADER = b"mcp-session-id"
#: Between the SDK's session id and the node's (node ids are ``[A-Za-z0-9_.-]``; MCP allows visible ASCII).
SEPARATOR = "~"
#: How often the node serving a forwarded request checks that the asking node still waits for it.
PING_SECONDS = 5.0
#: Marks a scope carried from another node: it is served here, never sent on.
FORWARDED = "haip.mcp_forwarded"
_SCOPE_KEYS = ("method", "path", "raw_path", "query_string", "scheme", "http_version", "client", "server")


def tagged(session_id: str, node: str) -> str:
    """The id a client is given for the SDK's ``session_id`` on ``node``."""
    return f"{session_id}{SEPARATOR}{node}"


def untagged(value: str) -> tuple[str, str | None]:
    """The SDK's session id and the node named in a client's ``Mcp-Session-Id`` (``None``: no node named)."""
    session_id, separator, node = value.rpartition(SEPARATOR)
    return (session_id, node) if separator and session_id and node else (value, None)


def session_header(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == HEADER:
            return bytes(value).decode("latin-1")
    return None


def with_session(scope: Scope, session_id: str) -> Scope:
    """``scope`` with its ``Mcp-Session-Id`` header set to ``session_id``."""
    headers = [(name, value) for name, value in scope["headers"] if name.lower() != HEADER]
    return {**scope, "headers": [*headers, (HEADER, session_id.encode("latin-1"))]}


def tagging(send: Send, node: str) -> Send:
    """``send`` with the session id of the response's start (an ``initialize`` answered) naming ``node``."""

    async def tag(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(name, _tag(name, value, node)) for name, value in message.get("headers", ())]
            message = {**message, "headers": headers}
        await send(message)

    return tag


def _tag(name: bytes, value: bytes, node: str) -> bytes:
    return tagged(bytes(value).decode("latin-1"), node).encode("latin-1") if name.lower() == HEADER else value


class McpRelay:
    """Carries `/mcp` requests between this node and the node holding their MCP session (see the module)."""

    def __init__(self, bus: Bus, app: ASGIApp) -> None:
        self._bus = bus
        self._app = app
        self.node = bus.node_id
        #: Requests sent to another node, waiting for its response here: by request id.
        self._waiting: dict[str, MemoryObjectSendStream[tuple[dict[str, Any], bytes]]] = {}
        #: Requests from other nodes served here: by request id, what tells them their client went away.
        self._serving: dict[str, anyio.Event] = {}
        self._tg: TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While entered, requests from other nodes are served here."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    # --- the asking side ---------------------------------------------------------------------------

    async def forward(self, node: str, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Have ``node`` serve this request and stream its response to ``send``; ``False`` if ``node`` does
        not listen (the session is gone with it: the caller serves the request, the SDK says so)."""
        request = secrets.token_hex(8)
        carried = {key: _plain(scope[key]) for key in _SCOPE_KEYS if key in scope}
        carried["headers"] = [[bytes(k).decode("latin-1"), bytes(v).decode("latin-1")] for k, v in scope["headers"]]
        head = json.dumps({"id": request, "from": self.node, "scope": carried}).encode()
        inbox, self._waiting[request] = _channel()
        try:
            try:
                if not await self._bus.tell(node, b"mcp> " + head + b"\n" + body):
                    return False
            except ClusterError as error:
                await send_error(send, 503, ProtocolError(ErrorCode.STORAGE_UNAVAILABLE, error.message))
                return True
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_disconnect, receive, node, request, tg)
                await self._relay(inbox, send, node)
                tg.cancel_scope.cancel()
        finally:
            self._waiting.pop(request).close()
            inbox.close()
        return True

    async def _relay(self, inbox: Any, send: Send, node: str) -> None:
        """The response's messages as they come, until its last part (or the serving node goes quiet)."""
        started = False
        while True:
            with anyio.move_on_after(3 * PING_SECONDS):
                head, data = await inbox.receive()
                if "status" in head:
                    started = True
                    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]]
                    await send({"type": "http.response.start", "status": head["status"], "headers": headers})
                elif "more" in head:
                    await send({"type": "http.response.body", "body": data, "more_body": head["more"]})
                    if not head["more"]:
                        return
                continue  # (a ping: the serving node still serves)
            logger.warning("mcp: node %s stopped answering a request it serves; ending its response", node)
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send_error(send, 502, ProtocolError(ErrorCode.NODE_LOST, f"node {node} stopped answering"))
            return

    async def _until_disconnect(self, receive: Receive, node: str, request: str, tg: TaskGroup) -> None:
        """The client went away: the serving node is told (its SDK sees the disconnect), and this ends."""
        while (await receive())["type"] != "http.disconnect":
            pass
        try:
            await self._bus.tell(node, f"mcp! {request}".encode())
        except ClusterError:
            pass  # the serving node's ping finds the request gone
        tg.cancel_scope.cancel()

    # --- notices ------------------------------------------------------------------------------------

    def notice(self, verb: bytes, rest: bytes) -> None:
        """A notice of this module's (see the module) on this node's channel; must not block."""
        if verb == b"mcp<":
            head_text, _, data = rest.partition(b"\n")
            head = json.loads(head_text)
            waiting = self._waiting.get(str(head["id"]))
            if waiting is not None:
                waiting.send_nowait((head, data))
        elif verb == b"mcp>":
            if self._tg is not None:
                self._tg.start_soon(self._serve, rest)
        elif verb == b"mcp!":
            cancelled = self._serving.get(rest.decode(errors="replace"))
            if cancelled is not None:
                cancelled.set()
        elif verb == b"mcp?":
            request, _, asker = rest.decode(errors="replace").partition(" ")
            waiting = self._waiting.get(request)
            if waiting is not None:
                waiting.send_nowait(({}, b""))  # the serving node is alive
            elif self._tg is not None:
                self._tg.start_soon(self._tell, asker, f"mcp! {request}".encode())

    # --- the serving side --------------------------------------------------------------------------

    async def _serve(self, message: bytes) -> None:
        head_text, _, body = message.partition(b"\n")
        try:
            head = json.loads(head_text)
            request, asker, carried = str(head["id"]), str(head["from"]), dict(head["scope"])
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carried.pop("headers")]
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("mcp: a forwarded request with a bad head %r", head_text[:80])
            return
        scope = {"type": "http", "asgi": {"version": "3.0"}, "root_path": "", **_scope(carried)}
        scope.update(headers=headers, **{FORWARDED: True})
        gone = self._serving[request] = anyio.Event()
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            if pending:
                return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply = {"status": message["status"], "headers": _plain(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                reply = {"more": bool(message.get("more_body", False))}
            else:
                return
            data = bytes(message.get("body", b""))
            if not await self._tell(asker, b"mcp< " + json.dumps({"id": request, **reply}).encode() + b"\n" + data):
                gone.set()
                tg.cancel_scope.cancel()  # the asking node went: nobody reads this response

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ping, asker, request, gone, tg)
                await self._app(scope, receive, send)
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("mcp: serving a request forwarded by node %s failed", asker)
        finally:
            del self._serving[request]

    async def _ping(self, asker: str, request: str, gone: anyio.Event, tg: TaskGroup) -> None:
        while not gone.is_set():
            await anyio.sleep(PING_SECONDS)
            if not await self._tell(asker, f"mcp? {request} {self.node}".encode()):
                gone.set()
                tg.cancel_scope.cancel()

    async def _tell(self, node: str, notice: bytes) -> bool:
        """``Bus.tell``; ``True`` while Redis does not answer (the node may well be waiting still)."""
        try:
            return await self._bus.tell(node, notice)
        except ClusterError as error:
            logger.warning("mcp: could not reach node %s: %s", node, error)
            return True


def _channel() -> tuple[Any, MemoryObjectSendStream[tuple[dict[str, Any], bytes]]]:
    send, receive = anyio.create_memory_object_stream[tuple[dict[str, Any], bytes]](math.inf)
    return receive, send


def _plain(value: Any) -> Any:
    """An ASGI scope's or message's value as JSON carries it (bytes as latin-1 text, tuples as lists)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _scope(carried: dict[str, Any]) -> dict[str, Any]:
    """The carried scope's values back as ASGI has them."""
    scope = dict(carried)
    for key in ("raw_path", "query_string"):
        if isinstance(scope.get(key), str):
            scope[key] = scope[key].encode("latin-1")
    for key in ("client", "server"):
        if isinstance(scope.get(key), list):
            scope[key] = tuple(scope[key])
    return scope
