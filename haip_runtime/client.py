"""A Python HAIP client: connect, start or join a transaction, send text, iterate events.

    async with HaipClient("ws://127.0.0.1:8080/haip/websocket", token=token) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "hello")
        async for event in client.events():
            ...

It numbers its envelopes 1, 2, 3..., acks what it receives, answers PING, and raises
``ClientError`` (with the server's ``code``) for an ERROR that answers one of its requests.
``haip-runtime chat`` (``haip_runtime.chat``) is a terminal chat built on it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from haip_runtime.exceptions import ClientError
from haip_runtime.protocol.envelope import new_id, now_ms
from haip_runtime.protocol.events import ALL_EVENTS, HAIP_VERSION

Predicate = Callable[["Received"], bool]


@dataclass(frozen=True)
class Received:
    """One envelope from the server, as JSON data."""

    raw: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.raw.get("type"))

    @property
    def payload(self) -> Any:
        return self.raw.get("payload")

    @property
    def transaction(self) -> str | None:
        return self.raw.get("transaction")

    @property
    def seq(self) -> int:
        return int(self.raw.get("seq", 0))

    @property
    def run_id(self) -> str | None:
        return self.raw.get("run_id")

    def get(self, key: str, default: Any = None) -> Any:
        return self.payload.get(key, default) if isinstance(self.payload, dict) else default


@dataclass
class _Waiter:
    predicate: Predicate
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Received | None = None


class HaipClient:
    """A HAIP connection over WebSocket. Use as ``async with``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        accept_events: Sequence[str] = ALL_EVENTS,
        timeout: float = 10.0,
        buffer: int = 10_000,
    ) -> None:
        self.url = url
        self.token = token
        self.accept_events = list(accept_events)
        self.timeout = timeout
        self.session_id: str | None = None
        self.user: str | None = None
        self.received: list[Received] = []
        self._seq = 0
        self._last_rx = 0
        self._ws: ClientConnection | None = None
        self._tg: TaskGroup | None = None
        self._waiters: list[_Waiter] = []
        self._send_events, self._events = anyio.create_memory_object_stream[Received](buffer)

    async def __aenter__(self) -> Self:
        try:
            self._ws = await connect(self.url, max_size=None, compression=None)
        except (OSError, InvalidHandshake) as exc:
            raise ClientError(f"cannot connect to {self.url}: {exc}") from exc
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read)
        try:
            await self._handshake()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._ws is not None:
            with anyio.move_on_after(2, shield=True):
                await self._ws.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
        self._send_events.close()
        self._events.close()

    async def _handshake(self) -> None:
        ready = self._wait_for(lambda e: e.type == "ERROR" or (e.type == "INFO" and e.get("event") == "session.ready"))
        payload: dict[str, Any] = {
            "haip_version": HAIP_VERSION,
            "accept_major": [1],
            "accept_events": self.accept_events,
        }
        if self.token:
            payload["auth"] = {"token": f"Bearer {self.token}"}
        await self.send("HAI", payload)
        event = await self._result(ready, "session.ready")
        if event.type == "ERROR":
            raise ClientError(f"handshake refused: {event.get('message')}", code=event.get("code"))
        self.session_id = event.raw.get("session")
        self.user = event.get("user")

    # --- sending -----------------------------------------------------------------------------------

    async def send(
        self,
        type: str,
        payload: dict[str, Any] | str,
        *,
        transaction: str | None = None,
        channel: str = "SYSTEM",
        **extra: Any,
    ) -> str:
        """Send one envelope; returns its id."""
        if self._ws is None:
            raise ClientError("not connected")
        self._seq += 1
        envelope = {
            "id": new_id(),
            "session": self.session_id or "",
            "transaction": transaction,
            "seq": str(self._seq),
            "ts": now_ms(),
            "channel": channel,
            "type": type,
            "payload": payload,
            **extra,
        }
        if self._last_rx:
            envelope["ack"] = str(self._last_rx)
        try:
            await self._ws.send(json.dumps(envelope))
        except ConnectionClosed as exc:
            raise ClientError(f"connection closed: {exc}") from exc
        return str(envelope["id"])

    async def start_transaction(self, agent: str, params: dict[str, Any] | None = None) -> str:
        """Start a conversation with ``agent``; returns the transaction id."""
        reference = new_id()
        waiter = self._wait_for(lambda e: _answers(e, "TRANSACTION_START", reference, lambda r: r.get("referenceId")))
        await self.send("TRANSACTION_START", {"toolName": agent, "params": params or {}}, transaction=reference)
        event = await self._result(waiter, "TRANSACTION_START")
        _raise_if_error(event)
        return str(event.transaction)

    async def join(self, transaction: str, since: int | None = None) -> Received:
        payload = {} if since is None else {"since": str(since)}
        envelope_id = new_id()
        waiter = self._wait_for(
            lambda e: (
                _answers(e, "TRANSACTION_JOIN", transaction, lambda r: r.transaction)
                or (e.type == "ERROR" and e.get("related_id") == envelope_id)
            )
        )
        await self.send("TRANSACTION_JOIN", payload, transaction=transaction, id=envelope_id)
        event = await self._result(waiter, "TRANSACTION_JOIN")
        _raise_if_error(event)
        return event

    async def send_text(self, transaction: str, text: str) -> str:
        return await self.send("MESSAGE", text, transaction=transaction, channel="USER")

    async def end_transaction(self, transaction: str, reason: str | None = None) -> None:
        await self.send("TRANSACTION_END", {"reason": reason} if reason else {}, transaction=transaction)

    # --- receiving ---------------------------------------------------------------------------------

    def events(self) -> AsyncIterator[Received]:
        """Every envelope the server sends (after the handshake), in order."""
        return self._events.__aiter__()

    async def wait_for(self, predicate: Predicate | str, *, timeout: float | None = None) -> Received:
        """The first event, among all received so far or later, matching ``predicate`` (or a type)."""
        match = (lambda e: e.type == predicate) if isinstance(predicate, str) else predicate
        for event in self.received:
            if match(event):
                return event
        return await self._result(self._wait_for(match), str(predicate), timeout)

    def _wait_for(self, predicate: Predicate) -> _Waiter:
        waiter = _Waiter(predicate)
        self._waiters.append(waiter)
        return waiter

    async def _result(self, waiter: _Waiter, what: str, timeout: float | None = None) -> Received:
        try:
            with anyio.fail_after(timeout or self.timeout):
                await waiter.done.wait()
        except TimeoutError:
            raise ClientError(f"no {what} from the server within {timeout or self.timeout} s") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        assert waiter.result is not None
        return waiter.result

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                event = Received(json.loads(frame))
                await self._on_event(event)
        except ConnectionClosed:
            pass
        finally:
            self._send_events.close()
            closed = Received({"type": "CLOSED", "payload": {"code": self._ws.close_code}})
            for waiter in list(self._waiters):
                waiter.result = closed
                waiter.done.set()

    async def _on_event(self, event: Received) -> None:
        if event.seq == self._last_rx + 1:
            self._last_rx = event.seq
        self.received.append(event)
        for waiter in list(self._waiters):
            if waiter.result is None and waiter.predicate(event):
                waiter.result = event
                waiter.done.set()
        if event.type == "PING":
            await self.send("PONG", {"nonce": event.get("nonce")})
        try:
            self._send_events.send_nowait(event)
        except anyio.WouldBlock:
            pass  # nobody is iterating events(); ``received`` still has it

    @property
    def close_code(self) -> int | None:
        return None if self._ws is None else self._ws.close_code


def _answers(event: Received, type: str, reference: str, key: Callable[[Received], Any]) -> bool:
    if event.type == "ERROR":
        return reference in (event.get("related_id"), event.transaction)
    return event.type == type and key(event) == reference or event.type == "CLOSED"


def _raise_if_error(event: Received) -> None:
    if event.type == "ERROR":
        raise ClientError(str(event.get("message")), code=event.get("code"))
    if event.type == "CLOSED":
        raise ClientError(f"connection closed (code {event.get('code')})")
