"""A TCP proxy on 127.0.0.1 that tests can cut and heal: "the database went away mid-conversation".

``with netcut(port) as cut:`` forwards ``cut.port`` to ``port``; ``cut.cut()`` resets every connection
through it and refuses new ones (the server died, or a firewall answers with RST); ``cut.cut("hang")``
holds every byte in both directions and leaves new connections unanswered (a network that silently
drops packets: clients only find out through their own timeouts); ``cut.heal()`` lets traffic through
again (bytes held in "hang" flow on, as TCP retransmission would deliver them).

The proxy runs on an event loop of its own in a thread (an anyio blocking portal), so sync tests and
async tests on any loop use it alike.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import anyio
import anyio.to_thread
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

#: At most this many connections at once; more are closed at once (a runaway client must not eat the machine).
MAX_LINKS = 256
#: Seconds the proxy's own operations (closing connections, stopping) may take.
TIMEOUT = 10.0
_CLOSED = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)

Mode = Literal["open", "reset", "hang"]


class _Link:
    """One client connection and its upstream; ``scope`` ends both, ``done`` says they are closed."""

    def __init__(self, client: SocketStream) -> None:
        self.client = client
        self.upstream: SocketStream | None = None
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    def reset(self) -> None:
        """End both sides with a TCP reset (SO_LINGER 0 makes close() send RST), as a dead peer's kernel does."""
        for stream in (self.client, self.upstream):
            if stream is not None:
                raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
                try:
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:  # already closed by its peer
                    pass
        self.scope.cancel()


class _Proxy:
    """The proxy itself, living on the portal's event loop; ``NetCut`` calls into it from other threads."""

    def __init__(self, host: str, port: int, changed: threading.Condition) -> None:
        self.host = host
        self.target = port
        self.port = 0
        self.mode: Mode = "open"
        self.links: set[_Link] = set()
        self.held = 0
        self.accepted = 0
        self._changed = changed
        self._gate = anyio.Event()
        self._gate.set()
        self._listener: SocketListener | None = None
        self._accepting: anyio.CancelScope | None = None
        self._task_group: TaskGroup | None = None
        self._stopped = anyio.CancelScope()

    async def run(self, *, task_status: TaskStatus[int]) -> None:
        with self._stopped:
            async with anyio.create_task_group() as group:
                self._task_group = group
                await self._listen()
                task_status.started(self.port)
                await anyio.sleep_forever()

    async def stop(self) -> None:
        await self._close_listener()
        for link in list(self.links):
            link.reset()
        self._stopped.cancel()

    async def cut(self, mode: Literal["reset", "hang"]) -> None:
        self.mode = mode
        if mode == "hang":
            self._gate = anyio.Event()
            return
        await self._close_listener()
        links = list(self.links)
        for link in links:
            link.reset()
        with anyio.fail_after(TIMEOUT):
            for link in links:
                await link.done.wait()

    async def heal(self) -> None:
        self.mode = "open"
        self._gate.set()
        if self._listener is None:
            await self._listen()

    async def _listen(self) -> None:
        assert self._task_group is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # listen again on our port after a cut
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        listener = await SocketListener.from_socket(sock)
        self.port = listener.extra(SocketAttribute.local_port)
        self._listener = listener
        await self._task_group.start(self._accept, listener)

    async def _close_listener(self) -> None:
        """Stop listening, so new connections are refused (the port stays ours to listen on again at heal)."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None

    async def _accept(self, listener: SocketListener, *, task_status: TaskStatus[None]) -> None:
        assert self._task_group is not None
        with anyio.CancelScope() as scope:
            self._accepting = scope
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except _CLOSED:
                    return
                if len(self.links) >= MAX_LINKS:
                    await stream.aclose()
                    continue
                self._task_group.start_soon(self._handle, stream)

    async def _handle(self, client: SocketStream) -> None:
        link = _Link(client)
        self._update(lambda: self.links.add(link))
        self._update(lambda: setattr(self, "accepted", self.accepted + 1))
        try:
            with link.scope:
                await self._pass_gate()  # "hang": a new connection is not even passed on
                link.upstream = await anyio.connect_tcp(self.host, self.target)
                async with link.upstream, anyio.create_task_group() as group:
                    group.start_soon(self._pump, client, link.upstream, group.cancel_scope)
                    group.start_soon(self._pump, link.upstream, client, group.cancel_scope)
        except OSError:  # the target refused: the client sees its connection closed
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
            self._update(lambda: self.links.discard(link))
            link.done.set()

    async def _pump(self, source: SocketStream, sink: SocketStream, both: anyio.CancelScope) -> None:
        """Copy ``source`` to ``sink`` chunk by chunk, each chunk waiting at the gate; either side ending ends both."""
        try:
            while True:
                data = await source.receive()
                await self._pass_gate(held=True)
                await sink.send(data)
        except _CLOSED:
            pass
        finally:
            both.cancel()

    async def _pass_gate(self, held: bool = False) -> None:
        while not self._gate.is_set():
            gate = self._gate
            if held:
                self._update(lambda: setattr(self, "held", self.held + 1))
            try:
                await gate.wait()
            finally:
                if held:
                    self._update(lambda: setattr(self, "held", self.held - 1))

    def _update(self, change: Callable[[], Any]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()


class NetCut:
    """The test's handle on a running proxy: its ``port``, ``cut()``, ``heal()`` and what passes through it."""

    def __init__(self, portal: BlockingPortal, proxy: _Proxy, changed: threading.Condition) -> None:
        self._portal = portal
        self._proxy = proxy
        self._changed = changed

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def mode(self) -> Mode:
        return self._proxy.mode

    @property
    def active(self) -> int:
        """Connections open through the proxy now."""
        return len(self._proxy.links)

    @property
    def accepted(self) -> int:
        """Connections the proxy has accepted so far."""
        return self._proxy.accepted

    @property
    def held(self) -> int:
        """Chunks of bytes waiting at the closed gate (``cut("hang")``)."""
        return self._proxy.held

    def cut(self, mode: Literal["reset", "hang"] = "reset") -> None:
        """Cut the line. "reset": every connection is reset now and new ones are refused; "hang": every byte
        is held and new connections get no answer. Returns once done (all resets sent)."""
        self._portal.call(self._proxy.cut, mode)

    def heal(self) -> None:
        """Let traffic through again: listen again after "reset", release the held bytes after "hang"."""
        self._portal.call(self._proxy.heal)

    def wait_until(self, condition: Callable[[NetCut], bool], timeout: float = 10) -> None:
        """Block until ``condition(self)`` holds (checked at every change), or raise TimeoutError."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self), timeout):
                raise TimeoutError(f"the proxy's state did not reach the condition within {timeout} s")

    async def until(self, condition: Callable[[NetCut], bool], timeout: float = 10) -> None:
        """``wait_until`` for async tests: waits in a worker thread, so the test's event loop runs on."""
        await anyio.to_thread.run_sync(self.wait_until, condition, timeout)


@contextmanager
def netcut(target_port: int, target_host: str = "127.0.0.1") -> Iterator[NetCut]:
    """A cuttable proxy on 127.0.0.1 (a free port) to ``target_host:target_port`` until the block ends."""
    changed = threading.Condition()
    with start_blocking_portal("asyncio") as portal:
        proxy = _Proxy(target_host, target_port, changed)
        future, _ = portal.start_task(proxy.run)
        try:
            yield NetCut(portal, proxy, changed)
        finally:
            portal.call(proxy.stop)
            future.result(timeout=TIMEOUT)
