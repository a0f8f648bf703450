"""A Python HAIP client: connect, start or join a transaction, send text, iterate events.

    async with HaipClient("ws://127.0.0.1:8080/haip/websocket", token=token) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "hello")
        async for event in client.events():
            ...

It numbers its envelopes 1, 2, 3..., acks what it receives, answers PING, and raises
``ClientError`` (with the server's ``code``) for an ERROR that answers one of its requests.
When the connection drops it reconnects with backoff and resumes its session: the runtime re-sends
what was missed, the client re-sends what the runtime had not acknowledged, and ``events()`` goes
on as one stream, each envelope once and in order. If the runtime restarted (its replay window is
gone), the client starts a new session and rejoins its transactions from the last ``tseq`` it saw,
so the conversation still reads on without a gap. ``haip-runtime chat`` (``haip_runtime.client.chat``) is
a terminal chat built on it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from haip_runtime.exceptions import ClientError
from haip_runtime.protocol.envelope import new_id, now_ms
from haip_runtime.protocol.events import ALL_EVENTS, HAIP_VERSION

logger = logging.getLogger(__name__)

Predicate = Callable[["Received"], bool]

#: Close codes after which reconnecting cannot help (the server refused us, or we were replaced).
_FINAL_CLOSE_CODES = frozenset({1000, 1002, 1008, 1009})
#: Envelopes kept until the runtime acknowledges them, to re-send after a reconnect.
MAX_UNACKED = 10_000
#: PROTOCOL.md section 2's default frame limit, for a server whose HAI does not say its own.
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


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
    def tseq(self) -> int | None:
        value = self.raw.get("tseq")
        return int(value) if value is not None else None

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
    """A HAIP connection over WebSocket that survives drops. Use as ``async with``.

    ``reconnect`` (seconds, 0 to disable) is how long it keeps trying to get back after a drop,
    with backoff from 0.1 s to 2 s; ``on_connection`` is told ``"reconnecting"``, ``"resumed"``,
    ``"restarted"`` (a new session, transactions rejoined) or ``"lost"``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        accept_events: Sequence[str] = ALL_EVENTS,
        timeout: float = 10.0,
        buffer: int = 10_000,
        reconnect: float = 60.0,
        on_connection: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.accept_events = list(accept_events)
        self.timeout = timeout
        self.reconnect = reconnect
        self.on_connection = on_connection
        self.session_id: str | None = None
        self.epoch: str | None = None
        #: The largest frame the server takes (its HAI's ``capabilities.max_frame_bytes``; 1 MiB until it says).
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self.user: str | None = None
        self.received: list[Received] = []
        #: The last ``tseq`` seen per transaction: where to rejoin from after a restart.
        self.transactions: dict[str, int] = {}
        self._seq = 0
        self._last_rx = 0
        self._unacked: OrderedDict[int, str] = OrderedDict()
        #: The runtime's PING interval, from its HAI (``None``: it does not say): silence past twice it is a dead line.
        self._heartbeat: float | None = None
        self._ws: ClientConnection | None = None
        self._stack = AsyncExitStack()
        self._tg: TaskGroup | None = None
        self._waiters: list[_Waiter] = []
        self._handshake: _Waiter | None = None
        self._pending: list[Received] | None = None
        #: While reconnecting: sends that wait for the connection (type, payload, transaction, channel, extra).
        self._down = self._gone = False
        self._held: list[tuple[str, dict[str, Any] | str, str | None, str, dict[str, Any]]] = []
        self._reading = anyio.Event()
        self._closing = False
        self._send_events, self._events = anyio.create_memory_object_stream[Received](buffer)

    async def __aenter__(self) -> Self:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        try:
            await self._connect(resume=False)
        except BaseException:
            await self.aclose()
            raise
        self._tg.start_soon(self._run)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closing = True
        if self._ws is not None:
            with anyio.move_on_after(2, shield=True):
                await self._ws.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._stack.aclose()
            self._tg = None
        self._send_events.close()
        self._events.close()

    # --- the connection ----------------------------------------------------------------------------

    async def _connect(self, *, resume: bool) -> None:
        """Open a socket and say HAI (resuming the session if there is one), then read in the background."""
        try:
            self._ws = await connect(self.url, max_size=None, compression=None, create_connection=_Heard)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ClientError(f"cannot connect to {self.url}: {exc}") from exc
        assert self._tg is not None
        self._pending = []
        self._reading = anyio.Event()
        self._tg.start_soon(self._read, self._ws, self._reading)
        try:
            await self._say_hai(resume)
        except BaseException:
            # A socket whose handshake failed (refused, or timed out on a line that stalled) is let go at once:
            # its reader must not end later, and be taken for the next connection's (a tester's find: a
            # reconnect loop of 1,800 sockets in 20 s).
            self._ws.transport.abort()
            raise

    async def _say_hai(self, resume: bool) -> None:
        """The handshake on the socket just opened (``_connect``); the session goes on once it is done."""
        payload: dict[str, Any] = {
            "haip_version": HAIP_VERSION,
            "accept_major": [1],
            "accept_events": self.accept_events,
        }
        if self.token:
            payload["auth"] = {"token": f"Bearer {self.token}"}
        if resume:
            payload["last_rx_seq"] = str(self._last_rx)
        # The HAI is always seq 1: a fresh session numbers from it; a resumed one ignores it as old.
        await self._write(self._envelope("HAI", payload, seq=1))
        event = await self._handshake_event(lambda e: e.type == "ERROR" or _is_ready(e))
        if event.type == "ERROR" and event.get("code") == "RESUME_FAILED":
            event = await self._handshake_event(_is_ready)
        if event.type == "ERROR":
            raise ClientError(f"handshake refused: {event.get('message')}", code=event.get("code"))
        if event.type == "CLOSED":
            raise ClientError(f"connection closed during the handshake (code {event.get('code')})")
        self.user = event.get("user")
        self.epoch = event.get("epoch")
        if resume and event.get("resumed"):
            self._pending = None
            for frame in list(self._unacked.values()):  # what the runtime may not have had
                await self._write(frame)
            await self._send_held()
            self._tell("resumed")
            return
        # A fresh session: its frames so far (its HAI, perhaps RESUME_FAILED, session.ready) open the stream.
        frames, self._pending = self._pending or [], None
        self.session_id, self._last_rx, self._seq = event.raw.get("session"), 0, 1
        # What the lost session had not acknowledged: sent again once its conversations are rejoined (a
        # message the runtime had taken already is taken once, by its message_id; a tester's find: dropped).
        orphans = [sent for frame in self._unacked.values() if (sent := _resendable(frame)) is not None]
        self._unacked.clear()
        for frame_event in frames:
            if frame_event.raw.get("session") == self.session_id:
                self._process(frame_event)
        if resume:
            self._down = False
            for transaction, tseq in list(self.transactions.items()):
                await self.send("TRANSACTION_JOIN", {"since": str(tseq)}, transaction=transaction)
            for kind, payload, about, channel in orphans:
                await self.send(kind, payload, transaction=about, channel=channel)
            await self._send_held()
            self._tell("restarted")

    def _fits(self, type: str, frame: str) -> None:
        """``ClientError`` MESSAGE_TOO_LARGE for a frame over the server's limit: refused here, never sent
        (nor kept to send again), as the server would refuse it."""
        if (size := len(frame.encode())) > self.max_frame_bytes:
            message = f"{type} of {size} bytes is over the server's limit of {self.max_frame_bytes}; not sent"
            raise ClientError(message, code="MESSAGE_TOO_LARGE")

    async def _send_held(self) -> None:
        """What was sent while the connection was down, now that it is back (in order). One the server now
        refuses (a smaller limit than the last one's) is dropped, logged; the rest go on."""
        self._down = False
        held, self._held = self._held, []
        for type, payload, transaction, channel, extra in held:
            try:
                await self.send(type, payload, transaction=transaction, channel=channel, **extra)
            except ClientError as refused:
                if refused.code != "MESSAGE_TOO_LARGE":
                    raise
                logger.warning("a %s held while reconnecting was not sent: %s", type, refused)

    async def _handshake_event(self, predicate: Predicate) -> Received:
        for event in self._pending or []:
            if predicate(event):
                return event
        waiter = self._handshake = _Waiter(predicate)
        try:
            return await self._result(waiter, "session.ready")
        finally:
            self._handshake = None

    async def _run(self) -> None:
        """Wait for the socket to drop; reconnect and resume unless closing or refused."""
        while True:
            await self._reading.wait()
            code = None if self._ws is None else self._ws.close_code
            reason = None if self._ws is None else self._ws.close_reason
            # (1008 "no HAI received": the line stalled in the handshake, not a refusal: a re-tester's find.)
            final = code in _FINAL_CLOSE_CODES and reason != "no HAI received"
            if self._closing or not self.reconnect or final:
                self._lost(code)
                return
            self._down = True
            self._tell("reconnecting")
            if not await self._reconnect():
                self._lost(code)
                return

    async def _reconnect(self) -> bool:
        delay = 0.1
        with anyio.move_on_after(self.reconnect):
            while not self._closing:
                try:
                    await self._connect(resume=True)
                    return True
                except ClientError as exc:
                    if exc.code is not None:  # the server refused us (e.g. the token expired)
                        logger.warning("reconnect refused: %s", exc)
                        return False
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

    def _lost(self, code: int | None) -> None:
        self._down, self._gone, self._held = False, True, []
        self._send_events.close()
        closed = Received({"type": "CLOSED", "payload": {"code": code}})
        for waiter in list(self._waiters):
            waiter.result = closed
            waiter.done.set()
        if not self._closing:
            self._tell("lost")

    def _tell(self, state: str) -> None:
        if self.on_connection is not None:
            self.on_connection(state)

    # --- sending -----------------------------------------------------------------------------------

    def _envelope(
        self,
        type: str,
        payload: dict[str, Any] | str,
        *,
        seq: int,
        transaction: str | None = None,
        channel: str = "SYSTEM",
        **extra: Any,
    ) -> str:
        envelope = {
            "id": new_id(),
            "session": self.session_id or "",
            "transaction": transaction,
            "seq": str(seq),
            "ts": now_ms(),
            "channel": channel,
            "type": type,
            "payload": payload,
            **extra,
        }
        if self._last_rx:
            envelope["ack"] = str(self._last_rx)
        return json.dumps(envelope)

    async def _write(self, frame: str) -> None:
        if self._ws is None:
            raise ClientError("not connected")
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            if not self.reconnect or self._closing:
                raise ClientError(f"connection closed: {exc}") from exc
            # Kept in _unacked: it goes again once the connection is back.

    async def send(
        self,
        type: str,
        payload: dict[str, Any] | str,
        *,
        transaction: str | None = None,
        channel: str = "SYSTEM",
        **extra: Any,
    ) -> str:
        """Send one envelope; returns its id. While reconnecting it waits, and goes once connected again."""
        if self._gone:
            raise ClientError("the connection is lost (reconnecting gave up)")
        extra.setdefault("id", new_id())
        frame = self._envelope(type, payload, seq=self._seq + 1, transaction=transaction, channel=channel, **extra)
        self._fits(type, frame)
        if self._down:
            self._held.append((type, payload, transaction, channel, extra))
            return str(extra["id"])
        self._seq += 1
        self._unacked[self._seq] = frame
        if len(self._unacked) > MAX_UNACKED:
            self._unacked.popitem(last=False)
        await self._write(frame)
        return str(extra["id"])

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

    async def send_text(self, transaction: str, text: str, *, message_id: str | None = None) -> str:
        """Send a message; returns the envelope's id. ``message_id``: the message's own (by default the
        envelope's id), which the runs that answer it name in ``RUN_STARTED``; sent again after a restart
        (what the lost session had not acknowledged), the runtime takes it once."""
        envelope_id = new_id()
        payload = {"text": text, "message_id": message_id or envelope_id}
        return await self.send("MESSAGE", payload, transaction=transaction, channel="USER", id=envelope_id)

    async def end_transaction(self, transaction: str, reason: str | None = None) -> None:
        await self.send("TRANSACTION_END", {"reason": reason} if reason else {}, transaction=transaction)

    # --- receiving ---------------------------------------------------------------------------------

    def events(self) -> AsyncIterator[Received]:
        """Every envelope of the session (after the handshake), once each and in order, across reconnects."""
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

    async def _read(self, ws: ClientConnection, ended: anyio.Event) -> None:
        """Read ``ws`` until it ends, then set ``ended`` (that connection's own: a socket let go earlier may end
        while a newer one is in use)."""
        try:
            while True:
                # A stalled line closes nothing: twice the runtime's PING interval (its HAI says it) and 5 s
                # without a byte means it is dead, and it is dropped so the client reconnects and resumes. Bytes,
                # not frames: a slow line bringing a large frame is alive (a reviewer's find: dropped mid-frame,
                # it was sent that frame again, and again).
                silence = math.inf if self._heartbeat is None else 2 * self._heartbeat + 5
                with anyio.move_on_after(silence) as waited:
                    frame = await ws.recv()
                if waited.cancelled_caught:  # (recv is safe to cancel: nothing of the frame is lost)
                    if time.monotonic() - getattr(ws, "heard_at", 0.0) < silence:
                        continue
                    logger.info("nothing heard from the server for %.0f s: the connection is dropped", silence)
                    ws.transport.abort()  # (a close handshake would wait on the dead line)
                    break
                self._on_event(Received(json.loads(frame)))
        except ConnectionClosed:
            pass
        finally:
            handshake = self._handshake
            if ws is self._ws and handshake is not None and handshake.result is None:  # (this socket's handshake)
                handshake.result = Received({"type": "CLOSED", "payload": {"code": ws.close_code}})
                handshake.done.set()
            ended.set()

    def _on_event(self, event: Received) -> None:
        if event.type == "HAI":
            capabilities = event.get("capabilities", {})
            if isinstance(limit := capabilities.get("max_frame_bytes"), int):
                self.max_frame_bytes = limit
            interval = capabilities.get("heartbeat_interval_seconds")  # (each server's own: a node may not say)
            self._heartbeat = float(interval) if isinstance(interval, int | float) and interval > 0 else None
        if self.session_id is None or event.raw.get("session") != self.session_id:
            # A new connection's own session: kept until the handshake says whether it is ours.
            if self._pending is not None:
                self._pending.append(event)
                self._match(self._handshake, event)
            return
        if event.seq == self._last_rx + 1:  # else a repeat of something already seen
            self._process(event)

    def _process(self, event: Received) -> None:
        """One envelope of the session's stream, in order: record it, wake waiters, pass it on."""
        self._last_rx = event.seq
        self._note_ack(event)
        if event.transaction is not None and event.tseq is not None:
            self.transactions[event.transaction] = max(event.tseq, self.transactions.get(event.transaction, 0))
        self.received.append(event)
        self._match(self._handshake, event)
        for waiter in list(self._waiters):
            self._match(waiter, event)
        if event.type == "PING" and self._tg is not None:
            self._tg.start_soon(self._pong, event.get("nonce"))
        try:
            self._send_events.send_nowait(event)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            pass  # nobody is iterating events(); ``received`` still has it

    @staticmethod
    def _match(waiter: _Waiter | None, event: Received) -> None:
        if waiter is not None and waiter.result is None and waiter.predicate(event):
            waiter.result = event
            waiter.done.set()

    async def _pong(self, nonce: Any) -> None:
        try:
            await self.send("PONG", {"nonce": nonce})
        except ClientError:
            pass  # the connection went; the runtime does not need this PONG any more

    def _note_ack(self, event: Received) -> None:
        ack = event.raw.get("ack")
        if isinstance(ack, str) and ack.isdecimal():
            acked = int(ack)
            while self._unacked and next(iter(self._unacked)) <= acked:
                self._unacked.popitem(last=False)

    @property
    def close_code(self) -> int | None:
        return None if self._ws is None else self._ws.close_code


def _is_ready(event: Received) -> bool:
    return event.type == "INFO" and event.get("event") == "session.ready"


class _Heard(ClientConnection):
    """A connection that notes when its last bytes came (a frame still arriving counts: ``_read``)."""

    heard_at = 0.0

    def data_received(self, data: bytes) -> None:
        self.heard_at = time.monotonic()
        super().data_received(data)


#: What a member says or asks, sent again to the new session after a restart (the playground's client does too).
RESENT_AFTER_RESTART = frozenset({"MESSAGE", "MESSAGE_UPDATE", "TOOL_CALL", "TOOL_UPDATE", "TOOL_CANCEL", "RUN_CANCEL"})


def _resendable(frame: str) -> tuple[str, Any, str | None, str] | None:
    """(type, payload, transaction, channel) of an unacknowledged frame worth sending to a new session."""
    envelope = json.loads(frame)
    if envelope.get("type") not in RESENT_AFTER_RESTART or not envelope.get("transaction"):
        return None
    return envelope["type"], envelope.get("payload"), envelope["transaction"], envelope.get("channel") or "SYSTEM"


def _answers(event: Received, type: str, reference: str, key: Callable[[Received], Any]) -> bool:
    if event.type == "ERROR":
        return reference in (event.get("related_id"), event.transaction)
    return event.type == type and key(event) == reference or event.type == "CLOSED"


def _raise_if_error(event: Received) -> None:
    if event.type == "ERROR":
        raise ClientError(str(event.get("message")), code=event.get("code"))
    if event.type == "CLOSED":
        raise ClientError(f"connection closed (code {event.get('code')})")
