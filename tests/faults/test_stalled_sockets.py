"""Fault 6: a client that never reads (a 4 KB receive buffer, sending large PINGs) lost its
session as it should, but the server's socket stayed ESTABLISHED with megabytes queued for more
than 345 s, on all three transports. Now the socket of a connection the runtime ended is aborted
within seconds when bytes wait and none leave."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from websockets.asyncio.client import connect

from tests.support.logwait import waiting_for_log
from tests.support.peers import KINDS
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio
NONCE = "n" * 60_000
#: More than the kernel buffers (a few MB on loopback) and 16 frames of outbox hold.
PINGS = 150


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with live_server(make_config({"session": {"max_buffered_messages": 16}})) as server:
        yield server


def ping(seq: int, session: str = "") -> str:
    envelope = {"id": f"p{seq}", "session": session, "seq": str(seq), "ts": "1", "channel": "SYSTEM"}
    return json.dumps({**envelope, "type": "PING", "payload": {"nonce": f"{NONCE}{seq}"}})


def hai(token: str) -> str:
    payload = {"haip_version": "1.1.2", "accept_major": [1], "auth": {"token": f"Bearer {token}"}}
    return json.dumps(
        {"id": "h", "session": "", "seq": "1", "ts": "1", "channel": "SYSTEM", "type": "HAI", "payload": payload}
    )


def small_socket(live: LiveServer) -> socket.socket:
    """A client socket with a 4 KB receive buffer, connected to the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    return sock


def established(server_port: int, client_port: int) -> bool:
    """Whether the server's end of the connection from ``client_port`` is still ESTABLISHED."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return state == "01"
    return False


@asynccontextmanager
async def never_reading(kind: str, live: LiveServer) -> AsyncIterator[int]:
    """A client of ``kind`` that sends HAI and PINGS large PINGs and never reads; yields its port."""
    token = live.token(f"stall-{kind}")
    sock = small_socket(live)
    port = sock.getsockname()[1]
    if kind == "websocket":
        async with connect(live.ws_url, sock=sock, max_queue=1, compression=None, close_timeout=0.1) as ws:
            await ws.send(hai(token))
            for seq in range(2, PINGS + 2):
                await ws.send(ping(seq))
            yield port
        return
    if kind == "stream":
        head = (
            f"POST /haip/stream?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        for frame in [hai(token), *(ping(seq) for seq in range(2, PINGS + 2))]:
            data = frame.encode() + b"\n"
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        yield port
        sock.close()
        return
    sock.sendall(f"GET /haip/sse?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    session = await sse_session(sock)
    async with httpx2.AsyncClient() as http:
        url = f"{live.http_url}/haip/sse/{session}"
        headers = {"authorization": f"Bearer {token}"}
        await http.post(url, content=hai(token), headers=headers)
        for seq in range(2, PINGS + 2):
            answer = await http.post(url, content=ping(seq, session), headers=headers)
            if answer.status_code == 404:
                break  # the stream was already dropped: enough
    yield port
    sock.close()


async def sse_session(sock: socket.socket) -> str:
    """Read just enough of the SSE stream for the session id of its first event (then stop reading)."""
    data = b""
    while b"\ndata: " not in data or not data.split(b"\ndata: ", 1)[1].count(b"\n"):
        data += await anyio.to_thread.run_sync(sock.recv, 4096)
    first: dict[str, Any] = json.loads(data.split(b"\ndata: ", 1)[1].split(b"\n", 1)[0])
    return str(first["session"])


@pytest.mark.parametrize("kind", KINDS)
async def test_fault_6_the_socket_of_a_client_that_never_reads_is_aborted(kind: str, live: LiveServer) -> None:
    with waiting_for_log("aborted the socket of 127.0.0.1") as aborted:
        async with never_reading(kind, live) as port:
            await aborted.wait(1, timeout=20, also=f":{port}:")
            async with httpx2.AsyncClient() as http:  # the server's loop has closed that socket by now
                await http.get(f"{live.http_url}/health")
            still = established(live.port, port)
    assert not still


def masked_text(text: str) -> bytes:
    """One masked client text frame (RFC 6455 section 5.2), built by hand: no library answers for us."""
    data, mask = text.encode(), os.urandom(4)
    length = len(data)
    head = bytes([0x81]) + (
        bytes([0x80 | length])
        if length < 126
        else bytes([0x80 | 126]) + length.to_bytes(2, "big")
        if length < 65536
        else bytes([0x80 | 127]) + length.to_bytes(8, "big")
    )
    return head + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(data))


async def upgraded(live: LiveServer) -> tuple[socket.socket, int]:
    """A plain socket through the WebSocket handshake (then frames by hand); with its port."""
    sock = socket.create_connection(("127.0.0.1", live.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /haip/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await anyio.to_thread.run_sync(sock.recv, 4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return sock, int(sock.getsockname()[1])


async def test_a_websocket_that_never_answers_the_close_frame_is_closed(live: LiveServer) -> None:
    """uvicorn reads a WebSocket it closed until the peer's close frame, for up to 10 s; a client that
    keeps sending instead (a flood) was read all that time. Now the reaper closes it at its first look."""
    sock, port = await upgraded(live)
    try:
        with waiting_for_log("closed the socket of 127.0.0.1") as closed:
            sock.sendall(masked_text(hai("not-a-token")))  # refused: the runtime closes the WebSocket
            with anyio.fail_after(20):
                while not closed.count(also=f":{port}:"):  # sending on, never a close frame back
                    try:
                        sock.sendall(masked_text(ping(2)))
                    except OSError:
                        break  # cut
                    with contextlib.suppress(TimeoutError):
                        await closed.wait(1, timeout=0.2, also=f":{port}:")
            await closed.wait(1, timeout=5, also=f":{port}:")
        why = [message for message in closed.messages if f":{port}:" in message]
        assert "did not answer the close frame" in why[0], why
        async with httpx2.AsyncClient() as http:  # the server's loop has closed that socket by now
            await http.get(f"{live.http_url}/health")
        assert not established(live.port, port)
    finally:
        sock.close()


async def test_a_quiet_client_late_to_answer_the_close_still_reads_everything_then_the_end(live: LiveServer) -> None:
    """Closed, not reset: a client that is slow to read (and sends nothing) gets the runtime's error, its
    close frame and then the end of the stream, not a reset that would drop what it had not read."""
    sock, port = await upgraded(live)
    try:
        with waiting_for_log("closed the socket of 127.0.0.1") as closed:
            sock.sendall(masked_text(hai("not-a-token")))
            await closed.wait(1, timeout=20, also=f":{port}:")
        data = b""
        with anyio.fail_after(10):
            while chunk := await anyio.to_thread.run_sync(sock.recv, 65536):  # ConnectionResetError if reset
                data += chunk
        assert b'"code":"AUTHENTICATION_FAILED"' in data, data[:300]
        close = data.rfind(b"\x88")  # the server's close frame (FIN + opcode 8, unmasked) ends the stream
        assert close > 0 and data[close + 4 :] == b"authentication failed: invalid token", data[-60:]
        assert int.from_bytes(data[close + 2 : close + 4], "big") == 1008, data[close:]
    finally:
        sock.close()
