"""One client connection, whatever the transport: handshake, read loop, heartbeat.

``serve_connection`` takes the transport's stream of decoded envelopes (or ``DecodeError``
values) and an ``Outbox``; it authenticates the first ``HAI``, creates or resumes the
``Session``, and then feeds every envelope to the session and the hub, in order. Frames that
arrive while authentication runs simply wait in the stream: they are processed after it. Its
deadlines (heartbeat, token expiry, a gap in the client's seqs) are callbacks on the runtime's
``Timers``, so an idle connection holds no task of its own for them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from haip_runtime.auth.permissions import check_event
from haip_runtime.auth.tokens import Authenticator, Principal, close_expired
from haip_runtime.exceptions import DecodeError, HandshakeError, ProtocolError
from haip_runtime.hub.router import Hub
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, new_id
from haip_runtime.protocol.events import ACCEPT_MAJOR, ALL_EVENTS, HAIP_VERSION, CloseCode, ErrorCode, EventType
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import GAP_GIVE_UP_SECONDS, GAP_GRACE_SECONDS, Outbox, Session, parse_seq
from haip_runtime.session.timers import Timer, Timers
from haip_runtime.transports.base import Inbound, Link

logger = logging.getLogger(__name__)

__all__ = ["Connection", "Inbound"]

#: Accepted and dropped: a later HAI (section 3); PONG, which only proves liveness (any frame does);
#: INFO and ERROR from a client.
_IGNORED = frozenset({"HAI", "PONG", "INFO", "ERROR"})


class Connection:
    """Serves one transport connection for the runtime's hub."""

    def __init__(self, hub: Hub, authenticator: Authenticator, link: Link, outbox: Outbox, timers: Timers) -> None:
        self.hub = hub
        self.authenticator = authenticator
        self.link = link
        self.credentials = link.credentials
        self.outbox = outbox
        self.config = hub.config.session
        self.timers = timers
        #: Items read since the handshake: what a heartbeat compares to know whether the peer said anything.
        self._heard = 0
        self._beat: Timer | None = None  # the next PING, or the check of the last one
        self._expiry: Timer | None = None
        self._gap: Timer | None = None

    async def serve(self, inbound: ObjectReceiveStream[Inbound]) -> None:
        session, failure = await self._resume_link() if self.link.resume else (None, None)
        if session is None:
            # The server HAI is seq 1 of a provisional session, which the handshake authenticates
            # (or leaves, for the session the client resumes).
            provisional = Session.provisional(self.config, self.hub.config.flow_control)
            provisional.on_sent = self.hub.metrics.sent
            provisional.attach(self.outbox)
            provisional.send(EventType.HAI, self._server_hai())
            if failure is not None:
                provisional.send_error(failure)
            session = await self._handshake(inbound, provisional)
        if session is None:
            return
        self.hub.active_connections += 1
        logger.info("session %s of user %r connected", session.id, session.user)
        self._beat = self.timers.call_later(self.config.heartbeat_interval_seconds, self._heartbeat, session)
        expires_at = session.principal.expires_at
        if expires_at is not None:
            self._expiry = self.timers.call_later(
                max(0.0, expires_at - time.time()), close_expired, session, self.outbox
            )
        try:
            await self._read_loop(inbound, session)
        finally:
            for timer in (self._beat, self._expiry, self._gap):
                if timer is not None:
                    timer.cancel()
            self.hub.active_connections -= 1
            session.detach(self.outbox)
            if session.outbox is None:
                self.hub.sessions.save(session)
            logger.info(
                "session %s disconnected (resumable for %.0f s)", session.id, self.config.resume_timeout_seconds
            )

    def _server_hai(self) -> dict[str, Any]:
        caps = {
            "binary_frames": self.link.binary_frames,
            "flow_control": self.hub.config.flow_control.model_dump(),
            "max_concurrent_runs": self.config.max_concurrent_runs,
            "signed_envelopes": False,
        }
        return {
            "haip_version": HAIP_VERSION,
            "accept_major": list(ACCEPT_MAJOR),
            "accept_events": list(ALL_EVENTS),
            "capabilities": caps,
            "epoch": self.hub.epoch,
        }

    # --- handshake ---------------------------------------------------------------------------------

    async def _handshake(self, inbound: ObjectReceiveStream[Inbound], provisional: Session) -> Session | None:
        self.hub.total_connections += 1
        try:
            with anyio.fail_after(self.config.handshake_timeout_seconds):
                first = await inbound.receive()
            if isinstance(first, Envelope):
                self.hub.metrics.received(first.type)
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
        ours = self.hub.config.flow_control
        credit = caps.flow_control or p.FlowCredit()
        messages, size = credit.initial_credit_messages, credit.initial_credit_bytes
        session.flow.reset(
            (
                ours.initial_credit_messages if messages is None else messages,
                ours.initial_credit_bytes if size is None else size,
            )
        )

    async def _resume_link(self) -> tuple[Session | None, ProtocolError | None]:
        """Resume the session the transport named (SSE ``Last-Event-ID``) with its credentials, no HAI needed.

        Returns the session, or why not (sent after the server HAI of a fresh handshake).
        """
        assert self.link.resume is not None
        session_id, last_seq = self.link.resume
        try:
            principal = await self.authenticator.authenticate(self.credentials.first(None))
        except ProtocolError as error:
            return None, error
        session = self.hub.sessions.find_resumable(session_id, principal.user)
        if session is None:
            return None, await self.hub.sessions.resume_failure(session_id, principal.user, "")
        try:
            session.attach(self.outbox, last_seq)
        except ProtocolError as error:
            return None, error
        session.principal = principal
        session.binary_frames = session.binary_frames and self.link.binary_frames
        self.hub.total_connections += 1
        ready = {"event": "session.ready", "user": principal.user, "resumed": True, "epoch": self.hub.epoch}
        session.send(EventType.INFO, ready)
        return session, None

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
                f"this runtime speaks HAIP major {ACCEPT_MAJOR}, the client {hai.accept_major}",
                close_code=CloseCode.PROTOCOL,
                related_id=first.id,
            )
        principal = await self.authenticator.authenticate(self.credentials.first(hai.auth.token if hai.auth else None))
        return hai, principal

    async def _open_session(self, first: Envelope, hai: p.Hai, principal: Principal, provisional: Session) -> Session:
        failure: ProtocolError | None = None
        if hai.last_rx_seq is not None:
            try:
                resumed = await self._resume(first, hai.last_rx_seq, principal)
            except ProtocolError as error:
                failure = error
                self.hub.metrics.resume_failed(str((error.detail or {}).get("reason") or "invalid"))
            else:
                self.hub.metrics.resumed()
                resumed.principal = principal  # the new token's rights (and expiry) from now on
                resumed.accept_inbound(first)
                ready = {"event": "session.ready", "user": principal.user, "resumed": True, "epoch": self.hub.epoch}
                resumed.send(EventType.INFO, ready)
                return resumed
        for stale in self.hub.limits.admit_session(self.hub.sessions.sessions.values(), principal.user):
            self.hub.drop_session(stale)
        provisional.authenticate(principal, negotiate(hai.accept_events))
        provisional.accept_inbound(first)
        self.hub.sessions.add(provisional)
        if failure is not None:
            provisional.send_error(failure)
        ready = {"event": "session.ready", "user": principal.user, "resumed": False, "epoch": self.hub.epoch}
        provisional.send(EventType.INFO, ready)
        return provisional

    async def _resume(self, first: Envelope, last_rx_seq: str, principal: Principal) -> Session:
        """The session ``first`` names, re-attached after ``last_rx_seq``; raises RESUME_FAILED."""
        number = parse_seq(last_rx_seq, "last_rx_seq", first.id, ErrorCode.RESUME_FAILED)
        session = self.hub.sessions.find_resumable(first.session, principal.user)
        if session is None:
            raise await self.hub.sessions.resume_failure(first.session, principal.user, first.id)
        try:
            session.attach(self.outbox, number)
        except ProtocolError as error:
            error.related_id = first.id
            raise
        return session

    # --- after the handshake -----------------------------------------------------------------------

    async def _read_loop(self, inbound: ObjectReceiveStream[Inbound], session: Session) -> None:
        async for item in inbound:
            self._heard += 1
            if isinstance(item, DecodeError):
                session.send_error(item)
                continue
            try:
                self.hub.metrics.received(item.type)
                if not session.accept_inbound(item):
                    continue  # a duplicate of something already processed
                self._watch_gap(session)
                self._spend_credit(session, item)
                self.hub.limits.check_message(session, item)
                check_event(session.principal.permissions, item)
                await self._dispatch(session, item)
            except ProtocolError as error:
                session.send_error(error, transaction=item.transaction)
            except Exception:
                logger.exception("internal error handling %s from session %s", item.type, session.id)
                session.send_error(
                    ProtocolError(ErrorCode.INTERNAL_ERROR, "internal error; see the server log", related_id=item.id),
                    transaction=item.transaction,
                )

    def _spend_credit(self, session: Session, envelope: Envelope) -> None:
        """The client's credit for this envelope (FLOW_CONTROL_VIOLATION past it), topped up when due."""
        grant = session.credit.consume(envelope, self.outbox.written)
        if grant is not None:
            session.send(EventType.FLOW_UPDATE, grant)
            session.credit.granted(session.last_seq, grant)

    def _watch_gap(self, session: Session) -> None:
        if self._gap is None and session.missing_inbound() is not None:
            self._gap = self.timers.call_later(GAP_GRACE_SECONDS, self._request_missing, session)

    def _request_missing(self, session: Session) -> None:
        """A gap in the client's seqs had a moment to fill: ask for a replay of it, then give up on it."""
        missing = session.missing_inbound()
        if missing is None:
            self._gap = None
            return
        session.send(EventType.REPLAY_REQUEST, {"from_seq": str(missing[0]), "to_seq": str(missing[1])})
        self._gap = self.timers.call_later(GAP_GIVE_UP_SECONDS, self._give_up_gap, session, missing)

    def _give_up_gap(self, session: Session, missing: tuple[int, int]) -> None:
        if session.missing_inbound() == missing:
            session.give_up_gap()
        self._gap = None
        self._watch_gap(session)  # a later gap, if any

    async def _dispatch(self, session: Session, envelope: Envelope) -> None:
        kind = envelope.type
        if kind in _IGNORED:
            return
        if kind == EventType.PING:
            ping = parse_payload(envelope, p.Ping)
            session.send(EventType.PONG, p.Ping(nonce=ping.nonce).dump())
        elif kind in (EventType.FLOW_UPDATE, EventType.PAUSE_CHANNEL, EventType.RESUME_CHANNEL):
            self._flow_control(session, envelope)
        elif kind == EventType.REPLAY_REQUEST:
            request = parse_payload(envelope, p.ReplayRequest)
            start = parse_seq(request.from_seq, "from_seq", envelope.id)
            end = parse_seq(request.to_seq, "to_seq", envelope.id) if request.to_seq else None
            session.replay(start, end, envelope.id)
        else:
            await self.hub.handle(session, envelope)

    @staticmethod
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

    def _heartbeat(self, session: Session) -> None:
        """PING every interval; a peer from which nothing at all came for the timeout after it is dropped.

        Any frame counts (PROTOCOL.md section 3), not only PONG: a client out of its own send credit
        cannot answer. A transport that finds dead peers itself (WebSocket ping/pong control frames)
        is trusted with that, so a silent but healthy client stays connected.
        """
        session.send(EventType.PING, {"nonce": new_id()})
        if self.link.watches_liveness:
            self._beat = self.timers.call_later(self.config.heartbeat_interval_seconds, self._heartbeat, session)
        else:
            timeout = self.config.heartbeat_timeout_seconds
            self._beat = self.timers.call_later(timeout, self._check_heard, session, self._heard, time.monotonic())

    def _check_heard(self, session: Session, heard: int, pinged_at: float) -> None:
        """The timeout after a PING: drop a silent peer, or PING again an interval after the last."""
        if self._heard == heard and not self.link.watches_liveness:
            timeout = self.config.heartbeat_timeout_seconds
            logger.info("session %s silent for %.0f s after PING; disconnecting", session.id, timeout)
            self.outbox.close(CloseCode.TRY_AGAIN_LATER, "heartbeat timeout")
            self._beat = None
            return
        due = pinged_at + self.config.heartbeat_interval_seconds - time.monotonic()
        self._beat = self.timers.call_later(max(0.0, due), self._heartbeat, session)
