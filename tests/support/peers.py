"""A test client per transport with one interface, so one behaviour suite runs over all of them.

``open_peer(kind, live, token)`` yields a peer for ``"websocket"`` (``tests.support.raw.RawPeer``),
``"sse"`` (a streamed GET plus POSTs, with httpx2), ``"stream"`` (one duplex HTTP/1.1 request
over a raw TCP socket, chunked both ways, because HTTP clients send the whole body first) or
``"memory"`` (the in-memory transport pair, to a runtime in the test's own event loop).
Every peer: ``send``, ``hai``, ``receive``, ``receive_type``, ``closed``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from anyio.abc import ByteStream

from haip_runtime.server.app import Runtime
from haip_runtime.transports.memory import MemoryPeer, MemoryTransport
from tests.support.raw import Numbered, raw_peer
from tests.support.serving import LiveServer

KINDS = ["websocket", "sse", "stream"]


class InProcess:
    """A runtime in the test's own event loop, reached over the in-memory transport pair."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def token(self, user: str = "alice", **claims: Any) -> str:
        return self.runtime.authenticator.issue(user, **claims)


class _Peer(Numbered):
    """What the SSE, stream and memory peers share: reading parsed envelopes (numbering and HAI: ``Numbered``)."""

    def __init__(self) -> None:
        self._in, self._out = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self.close_code: int | None = None
        self.ended = anyio.Event()

    def aclose(self) -> None:
        self._in.close()
        self._out.close()

    def _deliver(self, envelope: dict[str, Any]) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):  # a frame still arriving as the test ends
            self._in.send_nowait(envelope)

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            return await self._out.receive()

    async def closed(self, timeout: float = 5) -> int | None:
        with anyio.fail_after(timeout):
            await self.ended.wait()
        return self.close_code


class MemoryClient(_Peer):
    """The client end of the in-memory pair, with the same interface as the other peers."""

    def __init__(self, peer: MemoryPeer) -> None:
        super().__init__()
        self.peer = peer

    async def send_frame(self, frame: str | bytes) -> None:
        await self.peer.send_text(frame if isinstance(frame, str) else frame.decode())

    async def run(self) -> None:
        try:
            while True:
                self._deliver(await self.peer.receive_json())
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.close_code = self.peer.close_code
            self.ended.set()


class SsePeer(_Peer):
    def __init__(self, client: httpx2.AsyncClient, base: str, token: str) -> None:
        super().__init__()
        self.client, self.base, self.token = client, base, token
        self.session = ""
        self.last_event_id: str | None = None
        self.status: int | None = None
        self._started = anyio.Event()

    async def run(self, params: dict[str, str], headers: dict[str, str]) -> None:
        try:
            async with self.client.stream("GET", f"{self.base}/haip/sse", params=params, headers=headers) as response:
                self.status = response.status_code
                self._started.set()
                if response.status_code != 200:
                    return
                event: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line:
                        name, _, value = line.partition(":")
                        event[name] = value.removeprefix(" ")
                        continue
                    self._dispatch(event)
                    event = {}
        except httpx2.HTTPError:
            pass
        finally:
            self._started.set()
            self.ended.set()

    def _dispatch(self, event: dict[str, str]) -> None:
        if event.get("event") == "close":
            self.close_code = json.loads(event["data"])["code"]
        elif "data" in event:
            envelope = json.loads(event["data"])
            self.session = self.session or envelope["session"]
            self.last_event_id = event.get("id")
            self._deliver(envelope)

    async def send_frame(self, frame: str | bytes) -> None:
        await self.post(frame)

    async def post(self, body: str | bytes, token: str | None = None, session: str | None = None) -> httpx2.Response:
        url = f"{self.base}/haip/sse/{session or self.session}"
        headers = {"authorization": f"Bearer {token or self.token}", "content-type": "application/json"}
        return await self.client.post(url, content=body, headers=headers)


class StreamPeer(_Peer):
    """A duplex ``POST /haip/stream``: chunked request body written as we go, response read meanwhile."""

    def __init__(self, stream: ByteStream) -> None:
        super().__init__()
        self.stream = stream
        self.status: int | None = None

    async def send_frame(self, frame: str | bytes) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        await self.send_chunk(data + b"\n")

    async def send_chunk(self, data: bytes) -> None:
        await self.stream.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def end_body(self) -> None:
        await self.stream.send(b"0\r\n\r\n")

    async def run(self) -> None:
        buffer = bytearray()
        try:
            async for data in self.stream:
                buffer += data
                self._parse(buffer)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self.ended.set()

    def _parse(self, buffer: bytearray) -> None:
        if self.status is None:
            head, found, _ = buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.status = int(head.split(b" ")[1])
            del buffer[: len(head) + 4]
            self._lines = bytearray()
        while True:
            size_line, found, _ = buffer.partition(b"\r\n")
            if not found:
                return
            size = int(size_line, 16)
            if len(buffer) < len(size_line) + 2 + size + 2:
                return
            start = len(size_line) + 2
            self._lines += buffer[start : start + size]
            del buffer[: start + size + 2]
            *lines, rest = self._lines.split(b"\n")
            self._lines = bytearray(rest)
            for line in lines:
                if line.strip():
                    self._deliver(json.loads(line))
            if size == 0:
                self.ended.set()  # the response is over (the socket may stay open: keep-alive)
                return


@asynccontextmanager
async def open_peer(
    kind: str,
    live: LiveServer | InProcess,
    token: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Any]:
    """A connected peer of ``kind``. SSE and stream carry ``token`` in the request; WebSocket does not."""
    if kind == "memory":
        assert isinstance(live, InProcess)
        transport = MemoryTransport()
        memory = MemoryClient(transport.peer)
        async with anyio.create_task_group() as tg:
            tg.start_soon(live.runtime.serve, transport)
            tg.start_soon(memory.run)
            try:
                yield memory
            finally:
                await transport.peer.aclose()
        memory.aclose()
    elif kind == "websocket":
        assert isinstance(live, LiveServer)
        async with raw_peer(live.ws_url) as ws_peer:
            yield ws_peer
    elif kind == "sse":
        assert isinstance(live, LiveServer)
        async with httpx2.AsyncClient(timeout=None) as client, anyio.create_task_group() as tg:
            sse = SsePeer(client, live.http_url, token)
            tg.start_soon(sse.run, {"token": token, **(params or {})}, headers or {})
            with anyio.fail_after(5):
                await sse._started.wait()
            try:
                yield sse
            finally:
                tg.cancel_scope.cancel()
                sse.aclose()
    else:
        assert isinstance(live, LiveServer)
        async with await anyio.connect_tcp("127.0.0.1", live.port) as stream, anyio.create_task_group() as tg:
            extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
            head = (
                f"POST /haip/stream HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\n"
                "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
                f"{extra}\r\n"
            )
            await stream.send(head.encode())
            ndjson = StreamPeer(stream)
            tg.start_soon(ndjson.run)
            try:
                yield ndjson
            finally:
                tg.cancel_scope.cancel()
                ndjson.aclose()
