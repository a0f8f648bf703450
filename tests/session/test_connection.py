"""The connection on its own, over the in-memory transport: handshake, the one resume path, the read loop.

No runtime and no hub: the connection gets a ``Gateway`` whose ``dispatch`` records what reached it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.auth.tokens import Authenticator
from haip_runtime.config.models import HaipConfig
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.session.connection import Connection, Gateway
from haip_runtime.session.registry import SessionRegistry
from haip_runtime.session.session import Session
from haip_runtime.session.timers import Timers
from haip_runtime.session.window import Outbox
from haip_runtime.store.memory import MemoryStore
from haip_runtime.transports.base import Credentials, Link
from haip_runtime.transports.memory import MemoryTransport
from tests.support.peers import MemoryClient

pytestmark = pytest.mark.anyio


class Door:
    """A gateway whose dispatch records what the connection handed on."""

    def __init__(self) -> None:
        self.config = HaipConfig()
        self.metrics = Metrics()
        self.sessions = SessionRegistry(self.config.session, MemoryStore(), "epoch-1", self.config.limits)
        self.authenticator = Authenticator(self.config.auth, self.config.roles)
        self.dispatched: list[tuple[Session, Envelope]] = []
        self.got_one = anyio.Event()
        self.gateway = Gateway(
            self.config, self.sessions, self.authenticator.authenticate, self.dispatch, Timers(), self.metrics
        )

    async def dispatch(self, session: Session, envelope: Envelope) -> None:
        self.dispatched.append((session, envelope))
        self.got_one.set()

    @asynccontextmanager
    async def connect(self, link: Link | None = None) -> AsyncIterator[MemoryClient]:
        transport = MemoryTransport(link)
        client = MemoryClient(transport.peer)

        async def serve() -> None:
            outbox = Outbox(self.config.session.max_buffered_messages)
            async with transport.streams(outbox) as inbound:
                await Connection(self.gateway, transport.link, outbox).serve(inbound)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            tg.start_soon(client.run)
            try:
                yield client
            finally:
                await transport.peer.aclose()
        client.aclose()


async def ready(client: MemoryClient) -> dict[str, Any]:
    info = await client.receive_type("INFO")
    assert info["payload"]["event"] == "session.ready"
    return info


async def test_the_handshake_sends_the_server_hai_first_then_session_ready_and_dispatches_the_rest() -> None:
    door = Door()
    async with door.connect() as client:
        hai = await client.receive()
        await client.hai(door.authenticator.issue("ann"))
        info = await ready(client)
        await client.send("PING", {"nonce": "n"})
        pong = await client.receive_type("PONG")
        await client.send("MESSAGE", {"text": "hi"}, transaction="t1")
        with anyio.fail_after(5):
            await door.got_one.wait()
    assert (hai["seq"], hai["type"], hai["payload"]["epoch"]) == ("1", "HAI", "epoch-1")
    assert info["payload"] == {"event": "session.ready", "user": "ann", "resumed": False, "epoch": "epoch-1"}
    assert pong["payload"]["nonce"] == "n"
    assert [(s.user, e.type) for s, e in door.dispatched] == [("ann", "MESSAGE")]  # PING was the connection's own
    assert door.sessions.total_connections == 1 and door.sessions.active_connections == 0


async def test_a_hai_with_last_rx_seq_resumes_the_session_and_replays_what_came_after() -> None:
    door = Door()
    token = door.authenticator.issue("ann")
    async with door.connect() as first:
        session_id = (await first.receive())["session"]
        await first.hai(token)
        await ready(first)
        await first.send("PING", {"nonce": "a"})
        pong = await first.receive_type("PONG")
        sent = first.seq
    async with door.connect() as second:
        await second.receive()  # this connection's own server HAI
        second.seq = sent  # a resuming client numbers on from where it was
        hai_seq = second.seq + 1
        await second.hai(token, session=session_id, last_rx_seq=str(int(pong["seq"]) - 1))
        replayed = await second.receive_type("PONG")
        info = await ready(second)
    assert replayed["seq"] == pong["seq"] and replayed["session"] == session_id
    assert info["ack"] == str(hai_seq)  # session.ready acknowledges the HAI that resumed it
    assert info["payload"]["resumed"] is True and info["session"] == session_id
    assert door.sessions.total_connections == 2


async def test_a_transport_resume_needs_no_hai_and_a_failed_one_falls_back_to_a_handshake() -> None:
    door = Door()
    token = door.authenticator.issue("ann")
    async with door.connect() as first:
        session_id = (await first.receive())["session"]
        await first.hai(token)
        last_seq = int((await ready(first))["seq"])
    credentials = Credentials(authorization=f"Bearer {token}")
    async with door.connect(Link("memory", credentials, resume=(session_id, last_seq))) as resumed:
        info = await ready(resumed)  # no HAI sent: the transport named the session
    async with door.connect(Link("memory", credentials, resume=("no-such-session", 1))) as refused:
        hai = await refused.receive()
        error = await refused.receive_type("ERROR")
        await refused.hai(token)
        fresh = await ready(refused)
    assert info["payload"]["resumed"] is True and info["session"] == session_id
    assert hai["type"] == "HAI" and error["payload"]["code"] == "RESUME_FAILED"
    assert error["payload"]["detail"]["reason"] == "unknown" and fresh["payload"]["resumed"] is False
    resumes = dict(door.metrics._resumes.values)
    assert resumes == {("resumed", ""): 1, ("failed", "unknown"): 1}  # both paths count the same way


async def test_a_first_frame_that_is_not_hai_closes_the_connection_with_1008() -> None:
    door = Door()
    async with door.connect() as client:
        await client.receive()
        await client.send("PING", {"nonce": "n"})
        error = await client.receive_type("ERROR")
        code = await client.closed()
    assert error["payload"]["code"] == "HANDSHAKE_REQUIRED" and code == 1008
    assert door.dispatched == [] and len(door.sessions) == 0
