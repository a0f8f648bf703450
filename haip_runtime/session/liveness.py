"""A session's deadlines while a connection serves it: heartbeat, token expiry, a gap in the client's seqs.

``Liveness`` belongs to the ``Session`` (``session.watch``), is started when a connection has
been handed the session and stopped when it ends. Its deadlines are callbacks on the runtime's
``Timers`` (one task for every connection), so an idle connection holds no task for them. It
closes the connection through the outbox it was started with; the session stays resumable.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import CloseCode, ErrorCode, EventType
from haip_runtime.session.timers import Timer, Timers

if TYPE_CHECKING:
    from haip_runtime.session.window import Outbox
    from haip_runtime.transports.base import Link

logger = logging.getLogger(__name__)

#: How long a gap in a client's seqs may stay open before a REPLAY_REQUEST asks for it.
GAP_GRACE_SECONDS = 0.5
#: How long after that request the session gives up on the gap (SEQ_VIOLATION) and goes on.
GAP_GIVE_UP_SECONDS = 5.0


class Watched(Protocol):
    """What liveness needs of the session it watches (``Session``)."""

    id: str
    config: SessionConfig

    @property
    def principal(self) -> Principal: ...

    @property
    def user(self) -> str: ...

    def send(self, type: str, payload: dict[str, Any] | str) -> None: ...

    def send_error(self, error: ProtocolError) -> None: ...

    def missing_inbound(self) -> tuple[int, int] | None: ...

    def give_up_gap(self) -> None: ...


class Liveness:
    """The deadlines of one connection of a session (PROTOCOL.md section 3)."""

    # Slots: every idle connection holds one.
    __slots__ = ("_beat", "_expiry", "_gap", "_heard", "link", "outbox", "session", "timers")

    def __init__(self, session: Watched, timers: Timers, outbox: Outbox, link: Link) -> None:
        self.session = session
        self.timers = timers
        self.outbox = outbox
        #: ``link.watches_liveness``: the transport finds dead peers itself (WebSocket ping/pong, a
        #: closed HTTP response), so a silent peer is not dropped for that. It may change as it runs.
        self.link = link
        #: Items read since the handshake: what a heartbeat compares to know whether the peer said anything.
        self._heard = 0
        self._beat: Timer | None = None  # the next PING, or the check of the last one
        self._expiry: Timer | None = None
        self._gap: Timer | None = None

    def start(self) -> None:
        self._beat = self.timers.call_later(self.session.config.heartbeat_interval_seconds, self._heartbeat)
        expires_at = self.session.principal.expires_at
        if expires_at is not None:
            self._expiry = self.timers.call_later(max(0.0, expires_at - time.time()), self._expired)

    def stop(self) -> None:
        for timer in (self._beat, self._expiry, self._gap):
            if timer is not None:
                timer.cancel()
        self._beat = self._expiry = self._gap = None

    def heard(self) -> None:
        """The peer sent something (any frame proves it is alive)."""
        self._heard += 1

    def watch_gap(self) -> None:
        """After an inbound envelope: if the client's seqs now have a gap, ask for it in a moment."""
        if self._gap is None and self.session.missing_inbound() is not None:
            self._gap = self.timers.call_later(GAP_GRACE_SECONDS, self._request_missing)

    def _request_missing(self) -> None:
        """A gap in the client's seqs had a moment to fill: ask for a replay of it, then give up on it."""
        missing = self.session.missing_inbound()
        if missing is None:
            self._gap = None
            return
        self.session.send(EventType.REPLAY_REQUEST, {"from_seq": str(missing[0]), "to_seq": str(missing[1])})
        self._gap = self.timers.call_later(GAP_GIVE_UP_SECONDS, self._give_up_gap, missing)

    def _give_up_gap(self, missing: tuple[int, int]) -> None:
        if self.session.missing_inbound() == missing:
            self.session.give_up_gap()
        self._gap = None
        self.watch_gap()  # a later gap, if any

    def _heartbeat(self) -> None:
        """PING every interval; a peer from which nothing at all came for the timeout after it is dropped.

        Any frame counts (PROTOCOL.md section 3), not only PONG: a client out of its own send credit
        cannot answer. A transport that finds dead peers itself is trusted with that, so a silent
        but healthy client stays connected.
        """
        config = self.session.config
        self.session.send(EventType.PING, {"nonce": new_id()})
        if self.link.watches_liveness:
            self._beat = self.timers.call_later(config.heartbeat_interval_seconds, self._heartbeat)
        else:
            timeout = config.heartbeat_timeout_seconds
            self._beat = self.timers.call_later(timeout, self._check_heard, self._heard, time.monotonic())

    def _check_heard(self, heard: int, pinged_at: float) -> None:
        """The timeout after a PING: drop a silent peer, or PING again an interval after the last."""
        config = self.session.config
        if self._heard == heard and not self.link.watches_liveness:
            timeout = config.heartbeat_timeout_seconds
            logger.info("session %s silent for %.0f s after PING; disconnecting", self.session.id, timeout)
            self.outbox.close(CloseCode.TRY_AGAIN_LATER, "heartbeat timeout")
            self._beat = None
            return
        due = pinged_at + config.heartbeat_interval_seconds - time.monotonic()
        self._beat = self.timers.call_later(max(0.0, due), self._heartbeat)

    def _expired(self) -> None:
        """The token expired: ERROR AUTHENTICATION_FAILED and close 1008. The session stays resumable;
        the client reconnects with a fresh token to go on."""
        session = self.session
        logger.info("session %s of user %r: token expired; closing its connection", session.id, session.user)
        session.send_error(ProtocolError(ErrorCode.AUTHENTICATION_FAILED, "token expired; reconnect with a new token"))
        self.outbox.close(CloseCode.POLICY, "token expired")
        self._expiry = None
