"""`/mcp` sessions in a cluster: a request for an MCP session another node holds is carried to that node.

The 2025-11-25 handshake makes a session (`Mcp-Session-Id`) that lives in the memory of the node that
answered `initialize`: the SDK's session, its streams, the elicitations a call waits on, the cancels
it takes. Behind a balancer without stickiness, or under `serve --workers N` (the kernel spreads
connections over the workers), the client's next request may reach another node, whose SDK does not
know the session ("Session not found"). So in a cluster the id a client is given names the node:
``<SDK's id>~<node>``. A request naming another node is sent to it on its channel (``Bus.tell``);
that node serves it as if it had come in itself (the door's Origin and token checks included) and
sends the response back, its start and each part of its body numbered, on the asking node's
channel; the asking node streams them to the client. The 2026-07-28 protocol has no sessions: any
node serves any of its requests, and nothing here is involved.

What cannot be carried whole is cut short, never passed on with a hole: a part missing, or one
whose publish failed (Redis lost it, or cannot say; one sent twice is dropped), more than
``MAX_WAITING_BYTES`` waiting (a client reading slower than the node answers), the serving node not
knowing the request, or silent for ``3 × PING_SECONDS``, end the response where it stands (a 502
``NODE_LOST`` if it had not started). After each ``PING_SECONDS`` without a word the asking node
asks (``mcp?``): Redis says at once when nobody listens on a node's channel (for ``LISTEN_GRACE``
seconds: a node resubscribes after a Redis restart), the node's heartbeat says when its host
vanished, and the node answers ``mcp!`` for a request it never got. A serving node
gone before answering anything, or one that stops and sends the request back (``closed``), leaves it
to the asking node: the SDK's "Session not found" (404), after which a client starts a new session,
as the MCP spec says. A serving node that fails ends its response itself (a 500 if nothing was
sent); one that stops ends those under way (a 503 ``NODE_LOST`` if nothing was sent). A client that
goes away is a disconnect at the serving node too (``mcp!``); the serving node asks every
``PING_SECONDS`` whether the asking node still waits (``mcp?``) and stops when nobody listens there.
A request published twice (redis-py retries a publish whose answer was lost) is served once.

Notices (on a node's channel, beside ``roaming.py``'s): ``mcp> <head>\\n<body>`` a request,
``mcp< <head>\\n<bytes>`` a response's start (part 0) or a part of its body (or ``closed``: sent
back), ``mcp! <id>`` the client went away, ``mcp? <id> <node>`` still there? Parts are cut to
``PART_BYTES`` at most: a pub/sub message past Redis's output buffer limit (32 MB by default)
would cost the asking node its subscription, which carries its conversations too.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from haip_runtime.exceptions import ClusterError, ProtocolError
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.transports.http import http_error_body, replaying, send_error

if TYPE_CHECKING:  # (redis is imported by a cluster only)
    from haip_runtime.cluster import Bus

logger = logging.getLogger(__name__)

HEADER = b"mcp-session-id"
#: Between the SDK's session id and the node's (MCP allows visible ASCII in a session id).
SEPARATOR = "~"
_NODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # (``cluster.node_id``'s pattern)
#: How often the node serving a forwarded request checks that the asking node still waits for it.
PING_SECONDS = 5.0
#: The largest part of a response body one notice carries.
PART_BYTES = 256 * 1024
#: Bytes of a response that may wait at the asking node for its client (a client reading slower than
#: the node answers is cut there), and parts (small ones count too).
MAX_WAITING_BYTES = 16 * 1024 * 1024
MAX_WAITING_PARTS = 4096
#: Requests served here remembered after their end, so that one published twice is not run again.
FINISHED_KEPT = 4096
#: How long a node's channel may have no listener before the node is taken for gone (it resubscribes
#: within a second of a Redis restart; a dead node's sessions wait this long for their 404).
LISTEN_GRACE = 2.0
#: Marks a scope carried from another node: it is served here, never sent on.
FORWARDED = "haip.mcp_forwarded"
_SCOPE_KEYS = ("method", "path", "raw_path", "query_string", "scheme", "http_version", "client", "server")

Part = tuple[dict[str, Any], bytes]
#: Starts ``func(*args)`` in a task of the node's (``Roaming.spawn``).
Spawn = Callable[..., object]


def tagged(session_id: str, node: str) -> str:
    """The id a client is given for the SDK's ``session_id`` on ``node``."""
    return f"{session_id}{SEPARATOR}{node}"


def untagged(value: str) -> tuple[str, str | None]:
    """The SDK's session id and the node named in a client's ``Mcp-Session-Id`` (``None``: none named)."""
    session_id, separator, node = value.rpartition(SEPARATOR)
    return (session_id, node) if separator and session_id and _NODE.fullmatch(node) else (value, None)


def session_header(scope: Scope) -> str | None:
    return Headers(scope=scope).get("mcp-session-id")


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


@dataclass(eq=False)
class _Waiting:
    """A request sent to another node: its response's parts as they come, and the next one expected."""

    parts: MemoryObjectSendStream[Part]
    #: Why the parts stopped coming before the last (too many waiting; the serving node does not know the
    #: request): what waits is passed on, then the response ends.
    cut: str | None = None
    #: Bytes queued and not yet passed on.
    size: int = 0
    #: The serving node said it still serves (``mcp?``) since the asking node last looked.
    heard: bool = False


@dataclass(eq=False)
class _Serving:
    """A request from another node served here."""

    asker: str
    #: Set when the client went away (or the asking node did): the app sees a disconnect.
    gone: anyio.Event = field(default_factory=anyio.Event)
    #: Cancelled when this node stops serving `/mcp`: the response ends where it stands.
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class McpRelay:
    """Carries `/mcp` requests between this node and the node holding their MCP session (see the module)."""

    def __init__(self, bus: Bus, app: ASGIApp, spawn: Spawn) -> None:
        self._bus = bus
        self._app = app
        #: Starts a task that lives as long as this node follows the bus (``Roaming.spawn``).
        self._spawn = spawn
        self.node = bus.node_id
        self._waiting: dict[str, _Waiting] = {}
        self._serving: dict[str, _Serving] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        #: Set once this node stops serving `/mcp`: requests still coming are sent back at once.
        self._closed = False

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """While entered, requests from other nodes are served here; on leaving (the node stops), those
        under way end where they stand and those still coming are sent back (the asking node answers
        "Session not found": the session goes with this node)."""
        try:
            yield
        finally:
            self._closed = True
            for served in self._serving.values():
                served.scope.cancel()

    # --- the asking side ---------------------------------------------------------------------------

    async def forward(self, node: str, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Have ``node`` serve this request and stream its response to ``send``; ``False`` if ``node`` does
        not listen (the session is gone with it: the caller serves the request, the SDK says so)."""
        request = secrets.token_hex(8)
        carried = {key: _plain(scope[key]) for key in _SCOPE_KEYS if key in scope}
        head = {"id": request, "from": self.node, "scope": {**carried, "headers": _plain(scope["headers"])}}
        parts, inbox = anyio.create_memory_object_stream[Part](MAX_WAITING_PARTS)
        waiting = self._waiting[request] = _Waiting(parts)
        try:
            try:
                if not await self._listening(node, _notice(b"mcp>", head, body)):
                    return False
            except ClusterError as error:  # (a ProtocolError: STORAGE_UNAVAILABLE)
                await send_error(send, 503, error)
                return True
            served = True  # (unless that node sends it back: then it is served here)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._until_disconnect, receive, node, request, tg)
                served = await self._relay(waiting, inbox, send, node, request)
                tg.cancel_scope.cancel()
        finally:
            del self._waiting[request]
            parts.close()
            inbox.close()
        return served

    async def _relay(
        self, waiting: _Waiting, inbox: MemoryObjectReceiveStream[Part], send: Send, node: str, request: str
    ) -> bool:
        """The response's parts in order as they come, until its last; cut short on a part missing,
        too much waiting, or the serving node gone or silent. ``False``: nothing was answered, and that
        node sent the request back or is gone (the caller serves it: "Session not found")."""
        expected, silent = 0, 0
        while True:
            part: Part | None = None
            with anyio.move_on_after(PING_SECONDS):
                try:
                    part = await inbox.receive()
                except anyio.EndOfStream:
                    why = waiting.cut or "stopped"
                    break
            if part is None:  # quiet: is the node still there?
                silent = 0 if waiting.heard else silent + 1
                waiting.heard = False
                if silent and not await self._still_there(node, request):
                    if not expected:
                        return False
                    why = "is gone"
                    break
                if silent >= 3:
                    why = "stopped answering"
                    break
                continue
            head, data = part
            waiting.size -= len(data)
            silent = 0
            if head.get("lost"):  # the serving node could not tell whether a part got here: it stopped
                why = "lost part of its response on the way"
                break
            if head["n"] < expected:
                continue  # a part sent again (a publish retried after it had run)
            if head.get("closed") and not expected:
                return False
            if head["n"] > expected:
                why = f"lost part {expected} of its response on the way"
                break
            expected += 1
            if "status" in head:
                await send({"type": "http.response.start", "status": head["status"], "headers": _raw(head["headers"])})
            else:
                await send({"type": "http.response.body", "body": data, "more_body": head["more"]})
                if not head["more"]:
                    return True
        logger.warning("mcp: a request served by node %s is cut short: it %s", node, why)
        await self._tell(node, f"mcp! {request}".encode())
        if expected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send_error(send, 502, ProtocolError(ErrorCode.NODE_LOST, f"node {node} {why}"))
        return True

    async def _still_there(self, node: str, request: str) -> bool:
        """Whether ``node`` may still be serving ``request``: it listens on its channel (Redis knows at
        once when its connection closed) and its heartbeat has not run out (a host that vanished keeps
        its connection open in Redis for minutes). Redis not answering proves nothing: yes."""
        try:
            if not await self._listening(node, f"mcp? {request} {self.node}".encode()):
                return False
            until, now = await self._bus.nodes.alive_until(node)
        except ClusterError:
            return True
        return not 0 < until < now  # (0: not in the set, which a Redis that restarted has yet to fill)

    async def _listening(self, node: str, notice: bytes) -> bool:
        """Tell ``node``; ``False`` if nobody listens on its channel for ``LISTEN_GRACE`` seconds: a node
        resubscribes within a second of Redis coming back, and a session must not be given up meanwhile."""
        waited = 0.0
        while not await self._bus.tell(node, notice):
            if waited >= LISTEN_GRACE:
                return False
            delay = min(max(waited, 0.1), LISTEN_GRACE - waited)  # 0.1, 0.1, 0.2, 0.4, 0.8, then the rest
            await anyio.sleep(delay)
            waited += delay
        return True

    async def _until_disconnect(self, receive: Receive, node: str, request: str, tg: TaskGroup) -> None:
        """The client went away: the serving node is told (its SDK sees the disconnect), and this ends."""
        while (await receive())["type"] != "http.disconnect":
            pass
        await self._tell(node, f"mcp! {request}".encode())  # (if not heard, its next ping finds us gone)
        tg.cancel_scope.cancel()

    # --- notices ------------------------------------------------------------------------------------

    def notice(self, verb: bytes, rest: bytes) -> None:
        """A notice of this module's (see the module) on this node's channel; must not block."""
        if verb == b"mcp<":
            head_text, _, data = rest.partition(b"\n")
            head = json.loads(head_text)
            self._queue(str(head["id"]), head, data)
        elif verb == b"mcp>":
            head_text, _, body = rest.partition(b"\n")
            head = json.loads(head_text)
            request, asker = str(head["id"]), str(head["from"])
            if self._closed:
                self._spawn(self._tell, asker, _notice(b"mcp<", {"id": request, "n": 0, "closed": True}, b""))
            elif request not in self._serving and request not in self._finished:  # (not one published twice)
                # Known at once: a cancel in the same batch of notices finds it.
                serving = self._serving[request] = _Serving(asker)
                self._spawn(self._serve, request, serving, head["scope"], body)
        elif verb == b"mcp!":
            request = rest.decode(errors="replace")
            cancelled, waiting = self._serving.get(request), self._waiting.get(request)
            if cancelled is not None:  # its client went away
                cancelled.gone.set()
            elif waiting is not None and waiting.cut is None:  # the answer to a probe: it never got there
                self._cut(waiting, "does not know the request (it was lost on its way)")
        elif verb == b"mcp?":
            request, _, server = rest.decode(errors="replace").partition(" ")
            waiting = self._waiting.get(request)
            if waiting is not None:
                waiting.heard = True  # the serving node is alive
            elif request not in self._serving:  # (a probe of the asking node's: this one serves it)
                self._spawn(self._tell, server, f"mcp! {request}".encode())

    def _queue(self, request: str, head: dict[str, Any], data: bytes) -> None:
        waiting = self._waiting.get(request)
        if waiting is None or waiting.cut is not None:
            return
        if waiting.size + len(data) > MAX_WAITING_BYTES:
            self._cut(waiting, "had more of its response waiting than the client took")
            return
        try:
            waiting.parts.send_nowait((head, data))
        except anyio.WouldBlock:
            self._cut(waiting, "had more of its response waiting than the client took")
            return
        waiting.size += len(data)

    @staticmethod
    def _cut(waiting: _Waiting, why: str) -> None:
        waiting.cut = why
        waiting.parts.close()  # what waits is read, then the response ends

    # --- the serving side --------------------------------------------------------------------------

    async def _serve(self, request: str, serving: _Serving, carried: dict[str, Any], body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "root_path": "", **_scope(carried), FORWARDED: True}
        numbered, ended, lost = 0, False, False

        async def disconnected() -> Message:
            await serving.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal numbered, ended, lost
            if message["type"] == "http.response.start":
                parts = [({"status": message["status"], "headers": _plain(message.get("headers", []))}, b"")]
            elif message["type"] == "http.response.body":
                ended = not message.get("more_body", False)
                parts = _cut(bytes(message.get("body", b"")), ended)
            else:
                return
            for head, data in parts:
                if serving.gone.is_set():
                    return  # nobody reads it
                with anyio.CancelScope(shield=True):  # sent or not, never unknown: ``_end`` numbers after it
                    told = await self._tell(
                        serving.asker, _notice(b"mcp<", {"id": request, "n": numbered, **head}, data)
                    )
                if told is not True:
                    lost = told is None  # (Redis failed: it may have got there) the asking node is told
                    serving.gone.set()  # the app stops
                    return
                numbered += 1

        try:
            with serving.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._ping, request, serving)
                    await self._app(scope, replaying(body, disconnected), send)
                    tg.cancel_scope.cancel()
        except Exception:
            logger.exception("mcp: serving a request forwarded by node %s failed", serving.asker)
        finally:
            with anyio.move_on_after(2, shield=True):
                if lost:  # a part that may not have got there: the asking node cuts the response
                    notice = _notice(b"mcp<", {"id": request, "n": numbered, "lost": True}, b"")
                    await self._tell(serving.asker, notice)
                elif not ended and not serving.gone.is_set():  # failed, or this node stops: end it there
                    await self._end(request, serving.asker, numbered)
            self._serving.pop(request, None)
            self._finished[request] = None
            if len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)

    async def _end(self, request: str, asker: str, numbered: int) -> None:
        """The last parts of a response the app did not end: it failed (500), or this node stops (503)."""
        parts: list[Part] = [({"more": False}, b"")]
        if not numbered:
            status, error = (
                (503, ProtocolError(ErrorCode.NODE_LOST, f"node {self.node} stopped while serving this request"))
                if self._closed
                else (500, ProtocolError(ErrorCode.INTERNAL_ERROR, f"node {self.node} could not serve this request"))
            )
            start = {"status": status, "headers": [["content-type", "application/json"]]}
            parts = [(start, b""), ({"more": False}, json.dumps(http_error_body(error)).encode())]
        for n, (head, data) in enumerate(parts, start=numbered):
            await self._tell(asker, _notice(b"mcp<", {"id": request, "n": n, **head}, data))

    async def _ping(self, request: str, serving: _Serving) -> None:
        while not serving.gone.is_set():
            await anyio.sleep(PING_SECONDS)
            if await self._tell(serving.asker, f"mcp? {request} {self.node}".encode()) is False:
                serving.gone.set()  # (Redis failing is no proof: it asks again)

    async def _tell(self, node: str, notice: bytes) -> bool | None:
        """``Bus.tell``: ``True`` delivered, ``False`` nobody listens on ``node``'s channel, ``None`` Redis
        failed (it may or may not have got there)."""
        try:
            return await self._bus.tell(node, notice)
        except ClusterError as error:
            logger.warning("mcp: could not reach node %s: %s", node, error)
            return None


def _notice(verb: bytes, head: dict[str, Any], data: bytes) -> bytes:
    return verb + b" " + json.dumps(head).encode() + b"\n" + data


def _cut(body: bytes, last: bool) -> list[tuple[dict[str, Any], bytes]]:
    """A body message as parts of at most ``PART_BYTES``; only the last of the response's last says so."""
    pieces = [body[at : at + PART_BYTES] for at in range(0, len(body), PART_BYTES)] or [b""]
    return [({"more": not (last and i == len(pieces) - 1)}, piece) for i, piece in enumerate(pieces)]


def _plain(value: Any) -> Any:
    """An ASGI scope's or message's value as JSON carries it (bytes as latin-1 text, tuples as lists)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _raw(headers: Sequence[Sequence[str]]) -> list[tuple[bytes, bytes]]:
    """Headers carried as text, as ASGI has them."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _scope(carried: dict[str, Any]) -> dict[str, Any]:
    """The carried scope's values back as ASGI has them."""
    scope = dict(carried)
    scope["headers"] = _raw(scope.get("headers", []))
    for key in ("raw_path", "query_string"):
        if isinstance(scope.get(key), str):
            scope[key] = scope[key].encode("latin-1")
    for key in ("client", "server"):
        if isinstance(scope.get(key), list):
            scope[key] = tuple(scope[key])
    return scope
