"""A byte-level WebSocket peer for tests that must send exactly what a given client sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from haip_runtime.protocol.envelope import new_id, now_ms
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS


class Numbered:
    """What every test peer does alike: number its envelopes 1, 2, 3..., say HAI, pick envelopes by type.

    Subclasses write a frame with ``send_frame`` and read one with ``receive``.
    """

    seq = 0

    async def send_frame(self, frame: str | bytes) -> None:
        raise NotImplementedError

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        raise NotImplementedError

    async def receive_type(self, type: str, timeout: float = 5) -> dict[str, Any]:
        """The next envelope of ``type``, skipping others (PING, INFO...)."""
        with anyio.fail_after(timeout):
            while True:
                envelope = await self.receive(timeout)
                if envelope["type"] == type:
                    return envelope

    async def send(self, type: str, payload: Any, *, transaction: str | None = None, **extra: Any) -> str:
        self.seq += 1
        envelope = {
            "id": new_id(),
            "session": "",
            "transaction": transaction,
            "seq": str(self.seq),
            "ts": now_ms(),
            "channel": "SYSTEM",
            "type": type,
            "payload": payload,
            **extra,
        }
        await self.send_frame(json.dumps(envelope))
        return str(envelope["id"])

    async def hai(self, token: str | None, *, session: str = "", **payload: Any) -> str:
        body: dict[str, Any] = {
            "haip_version": "1.1.2",
            "accept_major": [1],
            "accept_events": sorted(TRANSACTION_ERA_EVENTS),
            **payload,
        }
        if token is not None:
            body["auth"] = {"token": f"Bearer {token}"}
        return await self.send("HAI", body, session=session)


class RawPeer(Numbered):
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send_frame(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            data: dict[str, Any] = json.loads(await self.ws.recv())
            return data

    async def closed(self, timeout: float = 5) -> int | None:
        """Wait for the server to close; returns the close code."""
        with anyio.fail_after(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
        return None if self.ws.close_code is None else int(self.ws.close_code)


@asynccontextmanager
async def raw_peer(url: str, **kwargs: Any) -> AsyncIterator[RawPeer]:
    # max_queue=None: a peer that stops reading must not stall its own closing handshake.
    kwargs.setdefault("max_queue", None)
    async with connect(url, compression=None, **kwargs) as ws:
        yield RawPeer(ws)
