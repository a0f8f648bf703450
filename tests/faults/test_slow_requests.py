"""Fault 8: no timeouts on slow requests. 1,000 connections sending one header line every 10 s
were all held for 60 s; an SSE POST announcing 100,000 bytes and sending a byte every 3 s got no
answer in 70 s. Now ``[server] header_timeout_seconds`` closes a connection without a complete
request head, and ``body_timeout_seconds`` refuses a body that does not arrive in time."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest

from tests.support.logwait import waiting_for_log
from tests.support.peers import open_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio
SLOW = 50


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with live_server(make_config({"server": {"header_timeout_seconds": 1, "body_timeout_seconds": 1}})) as server:
        yield server


def connect(live: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.settimeout(10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.endswith(b"}"):
            break
    return data


async def test_fault_8_connections_that_never_finish_their_headers_are_closed(live: LiveServer) -> None:
    with waiting_for_log("with no complete request head") as closed:
        socks = [connect(live) for _ in range(SLOW)]
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")  # and never the end
        await closed.wait(1, timeout=10)
        ends = [await anyio.to_thread.run_sync(read_all, sock) for sock in socks]  # EOF, not a timeout
    for sock in socks:
        sock.close()
    assert ends == [b""] * SLOW
    fine = connect(live)  # the server goes on serving
    fine.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert (await anyio.to_thread.run_sync(read_all, fine)).startswith(b"HTTP/1.1 200")
    fine.close()


async def test_fault_8_an_sse_post_whose_body_does_not_arrive_in_time_is_refused(live: LiveServer) -> None:
    token = live.token("slow")
    async with open_peer("sse", live, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        sock = connect(live)
        head = (
            f"POST /haip/sse/{peer.session} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n[{"
        )
        sock.sendall(head.encode())  # then nothing more
        answer = await anyio.to_thread.run_sync(read_all, sock)
        sock.close()
        error = await peer.receive_type("ERROR")
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "INVALID_MESSAGE" and b"body_timeout_seconds" in body
    assert error["payload"]["code"] == "INVALID_MESSAGE"


async def test_fault_8_an_ag_ui_post_whose_body_does_not_arrive_in_time_is_refused(live: LiveServer) -> None:
    sock = connect(live)
    head = (
        f"POST /ag-ui/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {live.token('slow')}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    sock.sendall(head.encode())  # then nothing more
    answer = await anyio.to_thread.run_sync(read_all, sock)
    sock.close()
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "INVALID_MESSAGE" and b"body_timeout_seconds" in body


async def test_fault_8_an_mcp_post_whose_body_does_not_arrive_in_time_is_refused() -> None:
    with live_server(make_config({"server": {"body_timeout_seconds": 1}, "mcp_server": {"enabled": True}})) as live:
        sock = connect(live)
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {live.token('slow')}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            'Content-Length: 1000\r\n\r\n{"jsonrpc": "2.0", '
        )
        sock.sendall(head.encode())  # then nothing more
        answer = await anyio.to_thread.run_sync(read_all, sock)
        sock.close()
        fine = connect(live)  # a whole body reaches the SDK as before (which wants a session for a ping)
        ping = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
        fine.sendall(
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {live.token('fast')}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            f"Connection: close\r\nContent-Length: {len(ping)}\r\n\r\n".encode()
            + ping
        )
        served = await anyio.to_thread.run_sync(read_all_until_closed, fine)
        fine.close()
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "INVALID_MESSAGE" and b"body_timeout_seconds" in body
    assert b'"jsonrpc":"2.0"' in served and b"Missing session ID" in served


def read_all_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_fault_8_an_mcp_get_or_delete_whose_body_does_not_arrive_in_time_is_refused(method: str) -> None:
    """The SDK reads a body with no deadline whatever the method: a GET or DELETE declaring one it
    never sends once held its connection for good."""
    with live_server(make_config({"server": {"body_timeout_seconds": 1}, "mcp_server": {"enabled": True}})) as live:
        sock = connect(live)
        sock.sendall(
            f"{method} /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {live.token('slow')}\r\n"
            "Accept: application/json, text/event-stream\r\nMcp-Session-Id: abc\r\nContent-Length: 10\r\n\r\n".encode()
        )
        answer = await anyio.to_thread.run_sync(read_all, sock)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"body_timeout_seconds" in answer
