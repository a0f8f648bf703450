"""The baseline: a bare Starlette WebSocket app on uvicorn, as lean as a Python ASGI server gets.

    /echo  one JSON frame back per JSON frame received
    /push  on a frame "<n> <size>", n JSON frames of a <size>-character token (4 if not given) pushed
           as fast as the socket takes them, then {"type": "END"}
    /idle  one frame in (the credentials), one frame out, then held until the client goes

Run by bench/common.py as a subprocess; prints "listening <port>" once it accepts connections.
"""

from __future__ import annotations

import json
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            frame = json.loads(await ws.receive_text())
            await ws.send_text(json.dumps({"type": "MESSAGE", "channel": "AGENT", "payload": frame.get("payload")}))
    except WebSocketDisconnect:
        pass


async def push(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            count, _, size = (await ws.receive_text()).partition(" ")
            token = "t" * (int(size or 4) - 1) + " "
            for index in range(int(count)):
                part = {"type": "MESSAGE_PART", "seq": str(index), "payload": {"message_id": "m", "text": token}}
                await ws.send_text(json.dumps(part))
            await ws.send_text(json.dumps({"type": "END"}))
    except WebSocketDisconnect:
        pass


async def idle(ws: WebSocket) -> None:
    await ws.accept()
    try:
        await ws.receive_text()
        await ws.send_text(json.dumps({"type": "INFO", "payload": {"event": "session.ready"}}))
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass


class Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        print(f"listening {self.servers[0].sockets[0].getsockname()[1]}", flush=True)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    app = Starlette(
        routes=[WebSocketRoute("/echo", echo), WebSocketRoute("/push", push), WebSocketRoute("/idle", idle)]
    )
    config = uvicorn.Config(app, log_level="warning", ws_per_message_deflate=False, ws_ping_interval=None)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
