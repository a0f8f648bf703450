"""One client connection, whatever the transport: the handshake, one resume path, and the read loop.

``Connection.serve`` takes the transport's stream of decoded envelopes (or ``DecodeError``
values) and the connection's ``Outbox``; it authenticates the first ``HAI``, creates or resumes
the ``Session``, and then feeds every envelope to the session and, past the protocol's own
frames (PING, flow control, replay), to ``Gateway.dispatch`` (the hub), in order. Frames that
arrive while authentication runs simply wait in the stream. The session owns its deadlines
(``session.watch``). A connection sees the runtime only through its ``Gateway``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from haip_runtime.auth.permissions import check_event
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import HaipConfig
from haip_runtime.exceptions import DecodeError, HandshakeError, ProtocolError
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, parse_seq
from haip_runtime.protocol.events import ACCEPT_MAJOR, ALL_EVENTS, HAIP_VERSION, CloseCode, ErrorCode, EventType
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.registry import SessionRegistry
from haip_runtime.session.session import Session
from haip_runtime.session.timers import Timers
from haip_runtime.session.window import Outbox
from haip_runtime.transports.base import Inbound, Link

logger = logging.getLogger(__name__)

__all__ = ["Connection", "Gateway", "Inbound", "process", "serve_detached"]

#: Accepted and dropped: a later HAI (section 3); PONG, which only proves liveness (any frame does);
#: INFO and ERROR from a client.
_IGNORED = frozenset({"HAI", "PONG", "INFO", "ERROR"})


@dataclass(frozen=True)
class Gateway:
    """What a connection needs of the runtime, and nothing to reach through."""

    config: HaipConfig
    sessions: SessionRegistry
    #: Who a bearer token belongs to (``HandshakeError`` if nobody).
    authenticate: Callable[[str | None], Awaitable[Principal]]
    #: Handle one envelope of an authenticated session beyond the protocol's own (the hub).
    dispatch: Callable[[Session, Envelope], Awaitable[None]]
    timers: Timers
    metrics: Metrics
    #: Runs a task in the runtime's task group (held envelopes a gap's deadline released); ``None``:
    #: they wait for the session's next envelope.
    spawn: Callable[..., None] | None = None


class Connection:
    """Serves one transport connection."""

    def __init__(self, gateway: Gateway, link: Link, outbox: Outbox) -> None:
        self.gateway = gateway
        self.link = link
        self.outbox = outbox
        self.config = gateway.config.session
        self.sessions = gateway.sessions

    async def serve(self, inbound: ObjectReceiveStream[Inbound]) -> None:
        session = await self._open(inbound)
        if session is None:
            return
        logger.info("session %s of user %r connected", session.id, session.user)
        session.watch(self.gateway.timers, self.link)
        spawn = self.gateway.spawn
        if spawn is not None:
            session.on_released = functools.partial(spawn, released_by_deadline, self.gateway, session)
        if session.holding:  # resumed: its HAI's seq may have filled the gap
            await released_by_deadline(self.gateway, session)
        self.sessions.serving()
        try:
            # The read loop, here rather than in a method of its own and with ``receive`` rather than
            # ``async for`` (anyio's ``__anext__``): each would be one more coroutine that every idle
            # connection holds while it waits (about 230 bytes apiece).
            while True:
                try:
                    item = await inbound.receive()
                except anyio.EndOfStream:
                    break
                session.heard()
                await process(self.gateway, session, item)
        finally:
            self.sessions.served()
            session.detach(self.outbox)
            if session.outbox is None:
                self.sessions.save(session)
            logger.info(
                "session %s disconnected (resumable for %.0f s)", session.id, self.config.resume_timeout_seconds
            )

    async def _open(self, inbound: ObjectReceiveStream[Inbound]) -> Session | None:
        """The session this connection serves: one the transport resumed (SSE ``Last-Event-ID``), or
        the outcome of a handshake; ``None`` if the handshake failed (the connection is closing)."""
        failure: ProtocolError | None = None
        if self.link.resume is not None:
            session_id, last_seq = self.link.resume
            try:
                principal = await self.gateway.authenticate(self.link.credentials.first(None))
                session = await self._resume(session_id, last_seq, principal, related_id="")
                self.sessions.opened()
                session.ready(self.sessions.epoch, resumed=True)
                return session
            except ProtocolError as error:
                failure = error  # sent after the server HAI of a fresh handshake
        # The server HAI is seq 1 of a provisional session, which the handshake authenticates (or
        # leaves, for the session the client resumes).
        config = self.gateway.config
        provisional = Session.provisional(self.config, config.flow_control, config.limits)
        provisional.on_sent = self.gateway.metrics.sent
        provisional.attach(self.outbox)
        provisional.send(EventType.HAI, self._server_hai())
        if failure is not None:
            provisional.send_error(failure)
        return await self._handshake(inbound, provisional)

    def _server_hai(self) -> dict[str, Any]:
        caps = {
            "binary_frames": self.link.binary_frames,
            "flow_control": self.gateway.config.flow_control.model_dump(),
            "max_concurrent_runs": self.config.max_concurrent_runs,
            # The largest frame taken (MESSAGE_TOO_LARGE past it): a client can say so before it sends.
            "max_frame_bytes": self.gateway.config.server.max_frame_bytes,
            # How often the runtime PINGs: a client that hears nothing for twice that knows its line is dead
            # (a stalled mobile line closes nothing, and a browser's socket never says so by itself).
            "heartbeat_interval_seconds": self.config.heartbeat_interval_seconds,
            "signed_envelopes": False,
        }
        return {
            "haip_version": HAIP_VERSION,
            "accept_major": list(ACCEPT_MAJOR),
            "accept_events": list(ALL_EVENTS),
            "capabilities": caps,
            "epoch": self.sessions.epoch,
        }

    # --- handshake ---------------------------------------------------------------------------------

    async def _handshake(self, inbound: ObjectReceiveStream[Inbound], provisional: Session) -> Session | None:
        self.sessions.opened()
        try:
            with anyio.fail_after(self.config.handshake_timeout_seconds):
                first = await inbound.receive()
            if isinstance(first, Envelope):
                self.gateway.metrics.received(first.type)
            hai, principal = await self._authenticate(first)
            assert isinstance(first, Envelope)
            session = await self._open_session(first, hai, principal, provisional)
            self._apply_capabilities(session, hai)
            return session
        except HandshakeError as error:
            provisional.send_error(error)
            self.outbox.close(error.close_code, error.message)
        except TimeoutError:
            self.outbox.close(CloseCode.POLICY, "no HAI received")
        except anyio.EndOfStream:
            pass
        return None

    def _apply_capabilities(self, session: Session, hai: p.Hai) -> None:
        """What the client's HAI says it can take: two-frame audio, and its own credit per channel."""
        caps = hai.capabilities or p.Capabilities()
        session.binary_frames = self.link.binary_frames and caps.binary_frames
        ours = self.gateway.config.flow_control
        credit = caps.flow_control or p.FlowCredit()
        messages, size = credit.initial_credit_messages, credit.initial_credit_bytes
        session.flow.reset(
            (
                ours.initial_credit_messages if messages is None else messages,
                ours.initial_credit_bytes if size is None else size,
            )
        )

    async def _authenticate(self, first: Inbound) -> tuple[p.Hai, Principal]:
        if isinstance(first, DecodeError):
            raise HandshakeError(
                first.code,
                f"first frame is not a HAIP envelope: {first.message}",
                close_code=CloseCode.POLICY,
                related_id=first.related_id,
            )
        if first.type != EventType.HAI:
            raise HandshakeError(
                ErrorCode.HANDSHAKE_REQUIRED,
                f"the first message must be HAI, not {first.type}",
                close_code=CloseCode.POLICY,
                related_id=first.id,
            )
        try:
            hai = parse_payload(first, p.Hai)
        except DecodeError as exc:
            raise HandshakeError(exc.code, exc.message, close_code=CloseCode.POLICY, related_id=first.id) from exc
        if not set(hai.accept_major) & set(ACCEPT_MAJOR):
            raise HandshakeError(
                ErrorCode.VERSION_INCOMPATIBLE,
                f"this runtime speaks HAIP major {', '.join(map(str, ACCEPT_MAJOR))}; the client accepts"
                f" {', '.join(map(str, hai.accept_major)) or 'none'}",
                close_code=CloseCode.PROTOCOL,
                related_id=first.id,
            )
        token = self.link.credentials.first(hai.auth.token if hai.auth else None)
        return hai, await self.gateway.authenticate(token)

    async def _open_session(self, first: Envelope, hai: p.Hai, principal: Principal, provisional: Session) -> Session:
        failure: ProtocolError | None = None
        if hai.last_rx_seq is not None:
            try:
                resumed = await self._resume(first.session, hai.last_rx_seq, principal, related_id=first.id)
            except ProtocolError as error:
                failure = error
            else:
                resumed.accept_inbound(first)  # acknowledged by the session.ready that follows
                resumed.ready(self.sessions.epoch, resumed=True)
                return resumed
        provisional.authenticate(principal, negotiate(hai.accept_events))
        await self.sessions.admit(provisional)  # may refuse (the user's sessions are full) before the HAI is taken
        provisional.accept_inbound(first)
        if failure is not None:
            provisional.send_error(failure)
        provisional.ready(self.sessions.epoch, resumed=False)
        return provisional

    async def _resume(self, session_id: str, last_seq: int | str, principal: Principal, *, related_id: str) -> Session:
        """The one resume path (a HAI's ``last_rx_seq``, or the transport's own resume): the session
        re-attached to this connection, with the new token's rights and expiry from now on; the
        caller sends ``session.ready``. Raises ``ProtocolError(RESUME_FAILED)``."""
        try:
            if isinstance(last_seq, str):
                last_seq = parse_seq(last_seq, "last_rx_seq", related_id, ErrorCode.RESUME_FAILED)
            session = await self.sessions.resume(
                session_id, principal.user, self.outbox, last_seq, related_id, principal=principal
            )
        except ProtocolError as error:
            self.gateway.metrics.resume_failed(str((error.detail or {}).get("reason") or "invalid"))
            raise
        self.gateway.metrics.resumed()
        session.principal = principal
        session.resumed = True
        session.binary_frames = session.binary_frames and self.link.binary_frames
        return session


async def process(gateway: Gateway, session: Session, item: Inbound) -> None:
    """One inbound envelope (or decode error) of an authenticated session, answered with ``ERROR`` if it
    fails. The read loop's step, and how envelopes POSTed to a session between two SSE streams are served
    (``serve_detached``): the answers wait in the session's window for the next stream.

    An envelope past a gap in a numbered client's seqs is held (``Session.take``) and processed once the
    gap fills, after the one that fills it, or once it is given up: in seq order whatever order they
    came in (POSTs a browser sends without waiting for each can arrive in any order)."""
    lock = session.inbound_lock
    if lock is None:  # (nothing was ever held: as nearly always)
        try:
            await _process(gateway, session, item)
        finally:
            if session.inbound_lock is not None:  # held its first envelope: it made the lock, and holds it
                session.release_first_lock()
        return
    async with lock:
        await _process(gateway, session, item)


async def _process(gateway: Gateway, session: Session, item: Inbound) -> None:
    if isinstance(item, DecodeError):
        logger.info("session %s refused a frame: %s %s", session.id, item.code, item.message)
        try:
            link = session.liveness.link if session.liveness is not None else None
            session.refused_inbound(item.seq, in_order=link is not None and link.transport != "sse")
        except Exception:  # its place in the client's seqs is lost at worst; the answer still goes
            logger.exception("session %s: the seq of a refused frame could not be counted", session.id)
        session.send_error(item)
        await _release(gateway, session)  # its seq may have filled a gap
        return
    taken = False
    try:
        gateway.metrics.received(item.type)
        taken = session.take(item)  # False: a duplicate, or held past a gap
    except ProtocolError as error:
        session.send_error(error, transaction=item.transaction)
    except Exception:
        _internal_error(session, item)
    if taken:
        await _release(gateway, session, before=item)  # held ones a gap given up let go, ahead of this one
        await _handle(gateway, session, item)
    await _release(gateway, session)  # held ones this one's seq let go (it filled their gap)


async def _release(gateway: Gateway, session: Session, before: Envelope | None = None) -> None:
    """Process the held envelopes that may go now, in seq order (those before ``before``'s seq, if given)."""
    while (held := session.released(before)) is not None:
        await _handle(gateway, session, held)


async def released_by_deadline(gateway: Gateway, session: Session) -> None:
    """A gap given up by its deadline let held envelopes go: process them (one at a time with the
    session's other envelopes; the next of those processes them first, if it comes before this)."""
    if session.inbound_lock is not None:
        async with session.inbound_lock:
            await _release(gateway, session)


async def _handle(gateway: Gateway, session: Session, item: Envelope) -> None:
    """An envelope taken in its turn: checked against the user's rate and rights, then dispatched."""
    try:
        gateway.sessions.check_rate(session.user, item.id)
        check_event(session.principal.permissions, item)
        await _dispatch(gateway, session, item)
    except ProtocolError as error:
        if error.related_id is None:  # (raised deep down, a store's or Redis's: it is still this envelope's)
            error.related_id = item.id
        session.send_error(error, transaction=item.transaction)
    except Exception:
        _internal_error(session, item)


def _internal_error(session: Session, item: Envelope) -> None:
    logger.exception("internal error handling %s from session %s", item.type, session.id)
    session.send_error(
        ProtocolError(ErrorCode.INTERNAL_ERROR, "internal error; see the server log", related_id=item.id),
        transaction=item.transaction,
    )


async def serve_detached(gateway: Gateway, session_id: str, user: str, items: list[Inbound]) -> bool:
    """Envelopes for ``user``'s session ``session_id`` while no connection serves it (an SSE client POSTing
    between two streams, or while its stream is closing): processed now, answered into the window.
    ``False`` if there is no such session that is resumable and unserved."""
    session = gateway.sessions.get(session_id)
    if session is None or session.user != user or session.expired(time.monotonic()):
        return False
    if session.outbox is not None and session.outbox.close_code is None:
        return False  # a connection serves it: its own transport takes what it is sent
    for item in items:
        await process(gateway, session, item)
    return True


async def _dispatch(gateway: Gateway, session: Session, envelope: Envelope) -> None:
    kind = envelope.type
    if kind in _IGNORED:
        return
    if kind == EventType.PING:
        ping = parse_payload(envelope, p.Ping)
        session.send(EventType.PONG, p.Ping(nonce=ping.nonce).dump())
    elif kind in (EventType.FLOW_UPDATE, EventType.PAUSE_CHANNEL, EventType.RESUME_CHANNEL):
        _flow_control(session, envelope)
    elif kind == EventType.REPLAY_REQUEST:
        request = parse_payload(envelope, p.ReplayRequest)
        start = parse_seq(request.from_seq, "from_seq", envelope.id)
        end = parse_seq(request.to_seq, "to_seq", envelope.id) if request.to_seq else None
        session.replay(start, end, envelope.id)
    else:
        await gateway.dispatch(session, envelope)


def _flow_control(session: Session, envelope: Envelope) -> None:
    """FLOW_UPDATE, PAUSE_CHANNEL, RESUME_CHANNEL: what the client may receive (PROTOCOL.md section 13)."""
    try:
        if envelope.type == EventType.FLOW_UPDATE:
            update = parse_payload(envelope, p.FlowUpdate)
            session.grant(update.channel, update.add_messages, update.add_bytes)
        elif envelope.type == EventType.PAUSE_CHANNEL:
            session.pause(parse_payload(envelope, p.ChannelControl).channel)
        else:
            session.resume_channel(parse_payload(envelope, p.ChannelControl).channel)
    except ProtocolError as error:
        error.related_id = error.related_id or envelope.id
        raise
