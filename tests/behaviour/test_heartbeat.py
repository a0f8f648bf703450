"""Liveness by the rule of PROTOCOL.md section 3 on every transport: a healthy client that cannot
answer PING (the reference SDK, out of its own credit) stays; a dead peer is dropped."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import anyio
import httpx2
import pytest

from tests.support.peers import open_peer
from tests.support.raw import raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

INTERVAL, TIMEOUT = 0.05, 0.15
SDK_CREDIT = 10
SDK_CAPABILITIES = {"binary_frames": True, "flow_control": {"initial_credit_messages": SDK_CREDIT}}


@pytest.fixture(scope="module")
def quick() -> Iterator[LiveServer]:
    session = {"heartbeat_interval_seconds": INTERVAL, "heartbeat_timeout_seconds": TIMEOUT}
    with live_server(make_config({"session": session})) as live:
        yield live


async def test_a_client_out_of_its_own_credit_stays_connected_and_gets_its_replies(quick: LiveServer) -> None:
    """The reference SDK's dialect: 10 credits, FLOW_UPDATE never applied, WebSocket pings answered."""
    async with raw_peer(quick.ws_url) as peer:
        credit = SDK_CREDIT
        await peer.receive()
        await peer.hai(quick.token(), capabilities=SDK_CAPABILITIES)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        credit -= 2
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        pings = 0
        while pings < 20:
            envelope = await peer.receive(timeout=5)
            if envelope["type"] == "PING":
                pings += 1
                if credit > 1:  # like the SDK: PONG while credit lasts (one kept for the message below)
                    await peer.send("PONG", envelope["payload"])
                    credit -= 1
        assert credit == 1  # silent at the HAIP level for the last 13 intervals, many times the timeout
        await peer.send("MESSAGE", "still there?", transaction=tx, channel="USER")
        reply = await peer.receive_type("MESSAGE")
        assert peer.ws.close_code is None
    assert reply["payload"] == "you said: still there?"


async def test_a_dead_websocket_peer_is_dropped_within_the_timeout(quick: LiveServer) -> None:
    """A socket that stops answering WebSocket pings (a pulled cable) is closed by the runtime."""
    stream = await anyio.connect_tcp("127.0.0.1", quick.port)
    async with stream:
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send(
            f"GET /haip/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        hai = {"id": "h", "session": "", "seq": "1", "ts": "1", "channel": "SYSTEM", "type": "HAI"}
        hai["payload"] = {"accept_major": [1], "auth": {"token": quick.token()}}  # type: ignore[assignment]
        received = b""
        with anyio.fail_after(5):
            while b'"HAI"' not in received:  # the server HAI: the upgrade is done
                received += await stream.receive()
        await stream.send(_masked_text_frame(json.dumps(hai)))
        with anyio.fail_after(5 + TIMEOUT):
            try:
                while True:  # read, never answer: nothing goes back, no pong either
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
    assert received.startswith(b"HTTP/1.1 101") and b"session.ready" in received


@pytest.mark.parametrize("kind", ["sse", "stream"])
async def test_an_http_peer_that_says_nothing_after_a_ping_is_dropped(kind: str, quick: LiveServer) -> None:
    async with open_peer(kind, quick, quick.token()) as peer:
        await peer.receive()
        await peer.hai(quick.token())
        ping = await peer.receive_type("PING")
        code = await peer.closed(timeout=5)
    assert ping["payload"]["nonce"]
    assert code == (1013 if kind == "sse" else None)


def _masked_text_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(data))
    assert len(data) < 65536
    header = (
        bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
        if len(data) >= 126
        else bytes([0x81, 0x80 | len(data)])
    )
    return header + mask + masked


async def test_an_idle_sse_stream_carries_keep_alive_comments(quick: LiveServer) -> None:
    async with (
        httpx2.AsyncClient(base_url=quick.http_url, timeout=None) as client,
        client.stream("GET", "/haip/sse", params={"token": quick.token()}) as response,
    ):
        with anyio.fail_after(5):
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    break
    assert line == ": keep-alive"


async def test_posts_to_a_dropped_sse_session_are_served_and_answered_on_its_next_stream(quick: LiveServer) -> None:
    token = quick.token("ann")
    async with open_peer("sse", quick, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
        await peer.closed(timeout=5)  # silent after a PING: the server dropped the stream
        peer.seq += 1
        message = {
            "id": "between",
            "session": peer.session,
            "transaction": started["transaction"],
            "seq": str(peer.seq),
            "ts": "1",
            "channel": "USER",
            "type": "MESSAGE",
            "payload": "between two streams",
        }
        accepted = await peer.post(json.dumps(message))
        refused = await peer.post(json.dumps({**message, "id": "stranger"}), token=quick.token("bob"))
        last = peer.last_event_id
    assert last is not None
    async with open_peer("sse", quick, token, headers={"last-event-id": last}) as again:
        reply = await again.receive_type("MESSAGE")
    assert accepted.status_code == 202 and refused.status_code == 404
    assert reply["payload"] == "you said: between two streams" and reply["session"] == peer.session
