"""One authenticated client: outbound ``seq`` and replay window, inbound ``ack``, negotiation.

A ``Session`` outlives its connection: when the socket goes, the session keeps numbering and
recording what it is sent, so a client that resumes (HAI with ``session`` + ``last_rx_seq``)
gets every envelope it missed. Sessions never import a web framework; a connection reaches
them only as an ``Outbox`` of encoded frames.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio

from haip_runtime.auth import Principal
from haip_runtime.config import FlowControlConfig, SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.negotiation import Downgrader
from haip_runtime.protocol.envelope import Envelope, Event, new_id, parse_uint64
from haip_runtime.protocol.events import Channel, CloseCode, ErrorCode, EventType

logger = logging.getLogger(__name__)

#: Envelopes received past a gap in a numbered client's seqs before the client is told it broke the sequence.
MAX_INBOUND_GAP = 1000
#: How long a gap may stay open before the runtime asks the client to replay it (PROTOCOL.md section 10).
GAP_GRACE_SECONDS = 0.5


class Outbox:
    """The bounded queue of encoded frames for one connection, and its close request.

    ``put`` never blocks: a connection with more than ``size`` frames waiting is closed with 1013
    (its session stays resumable) instead of slowing the transaction or the other members.
    A replay (``backlog=True``) may exceed the bound: the client asked for all of it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)
        self.close_code: int | None = None
        self.close_reason = ""
        self._backlog = 0  # replayed frames still queued (they are written first: the queue is FIFO)

    def put(self, frame: str, *, backlog: bool = False) -> bool:
        if not backlog and self._send.statistics().current_buffer_used - self._backlog >= self.size:
            self.close(CloseCode.TRY_AGAIN_LATER, "client is not reading fast enough")
            return False
        try:
            self._send.send_nowait(frame)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        if backlog:
            self._backlog += 1
        return True

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Ask the transport to close after the frames already queued (at once for 1013)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._send.close()

    def discard(self) -> None:
        """Release both ends; for the transport, once the connection is gone."""
        self._send.close()
        self._receive.close()

    async def frames(self) -> Any:
        """The frames to write, in order; ends when the outbox is closed and drained."""
        async with self._receive:
            async for frame in self._receive:
                if self.close_code == CloseCode.TRY_AGAIN_LATER:
                    return
                self._backlog = max(0, self._backlog - 1)
                yield frame


class InboundCredit:
    """The client's send credit per channel, topped up with FLOW_UPDATE (PROTOCOL.md section 13).

    Each time a client has used half of its initial credit on a channel, the runtime grants
    back what it used, so a client that honours credit is never stalled by a busy runtime.
    """

    def __init__(self, config: FlowControlConfig) -> None:
        self.config = config
        self._used: dict[str, tuple[int, int]] = {}

    def consume(self, channel: str, size: int) -> dict[str, Any] | None:
        """Count one envelope; returns the FLOW_UPDATE payload when a top-up is due."""
        messages, size_sum = self._used.get(channel, (0, 0))
        messages, size_sum = messages + 1, size_sum + size
        if messages * 2 >= self.config.initial_credit_messages or size_sum * 2 >= self.config.initial_credit_bytes:
            self._used[channel] = (0, 0)
            return {"channel": channel, "add_messages": messages, "add_bytes": size_sum}
        self._used[channel] = (messages, size_sum)
        return None


@dataclass(frozen=True)
class Sent:
    seq: int
    at: float
    frame: str


class Session:
    """Protocol state of one client across its connections."""

    def __init__(
        self,
        principal: Principal,
        accepted: frozenset[str],
        config: SessionConfig,
        *,
        id: str | None = None,
        sent: int = 0,
        clock: Callable[[], float] = time.monotonic,
        flow: FlowControlConfig | None = None,
    ) -> None:
        self.id = id or new_id()
        self.principal = principal
        self.config = config
        self.credit = InboundCredit(flow or FlowControlConfig())
        self.downgrader = Downgrader(accepted)
        self.transactions: set[str] = set()
        self.active_runs = 0
        self.outbox: Outbox | None = None
        self.detached_at: float | None = None
        self._seq = sent
        self._clock = clock
        self._window: deque[Sent] = deque()
        self._inbound_numeric: bool | None = None
        self._last_in = 0
        self._ahead: set[int] = set()

    @property
    def user(self) -> str:
        return self.principal.user

    @property
    def accepted(self) -> frozenset[str]:
        return self.downgrader.accepted

    # --- outbound ------------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        """Send ``event`` as this client accepts it; recorded for replay even while detached."""
        for adapted in self.downgrader.adapt(event):
            self._seq += 1
            ack = self._last_in if self._inbound_numeric else None
            frame = adapted.to_wire(session=self.id, seq=self._seq, ack=ack)
            self._record(Sent(self._seq, self._clock(), frame))
            if self.outbox is not None:
                self.outbox.put(frame)

    def send(
        self, type: str, payload: dict[str, Any] | str, *, transaction: str | None = None, channel: str = Channel.SYSTEM
    ) -> None:
        self.deliver(Event(type=type, payload=payload, channel=channel, transaction=transaction))

    def send_error(self, error: ProtocolError, *, transaction: str | None = None) -> None:
        self.send(EventType.ERROR, error_payload(error), transaction=transaction)

    def _record(self, sent: Sent) -> None:
        self._window.append(sent)
        keep, horizon = self.config.replay_window_messages, sent.at - self.config.replay_window_seconds
        while len(self._window) > keep and self._window[0].at < horizon:
            self._window.popleft()

    def replay(self, from_seq: int, to_seq: int | None = None) -> Iterator[str]:
        """The recorded frames from ``from_seq`` to ``to_seq`` (inclusive), original seqs kept."""
        if (
            from_seq < 1
            or (self._window and from_seq < self._window[0].seq)
            or (not self._window and from_seq <= self._seq)
        ):
            raise ProtocolError(ErrorCode.REPLAY_TOO_OLD, f"seq {from_seq} is no longer in the replay window")
        last = self._seq if to_seq is None else min(to_seq, self._seq)
        return (sent.frame for sent in self._window if from_seq <= sent.seq <= last)

    # --- inbound -------------------------------------------------------------------------------

    def accept_inbound(self, envelope: Envelope) -> bool:
        """Track the client's seq; ``False`` for a duplicate that must be dropped.

        A client whose first seq is ``"1"`` is numbered: the runtime acks the highest contiguous
        seq and drops duplicates; an envelope past a gap is processed at once (nothing waits on
        the gap) and the gap is reported by ``missing_inbound``. Any other first seq (the
        reference clients send timestamps) is opaque.
        """
        number = envelope.numeric_seq
        if self._inbound_numeric is None:
            self._inbound_numeric = number == 1
        if not self._inbound_numeric or number is None:
            return True
        if number <= self._last_in or number in self._ahead:
            return False
        if number == self._last_in + 1:
            self._last_in = number
            while self._last_in + 1 in self._ahead:
                self._ahead.remove(self._last_in + 1)
                self._last_in += 1
        elif len(self._ahead) < MAX_INBOUND_GAP:
            self._ahead.add(number)
        else:
            raise ProtocolError(
                ErrorCode.SEQ_VIOLATION,
                f"seq {number} is too far past the gap after {self._last_in}",
                related_id=envelope.id,
            )
        return True

    def missing_inbound(self) -> tuple[int, int] | None:
        """The first gap in the client's seqs, as an inclusive range, if there is one."""
        return (self._last_in + 1, min(self._ahead) - 1) if self._ahead else None

    # --- connections ---------------------------------------------------------------------------

    def attach(self, outbox: Outbox, last_rx_seq: int | None = None) -> None:
        """Bind a connection; with ``last_rx_seq``, re-send everything after it first."""
        if self.outbox is not None and self.outbox is not outbox:
            self.outbox.close(CloseCode.NORMAL, "session resumed on another connection")
        self.outbox = outbox
        self.detached_at = None
        if last_rx_seq is not None:
            for frame in self.replay(last_rx_seq + 1):
                outbox.put(frame, backlog=True)

    def detach(self, outbox: Outbox) -> None:
        if self.outbox is outbox:
            self.outbox = None
            self.detached_at = self._clock()

    def expired(self, now: float) -> bool:
        return self.detached_at is not None and now - self.detached_at > self.config.resume_timeout_seconds


def error_payload(error: ProtocolError) -> dict[str, Any]:
    """The ``ERROR`` payload of a protocol error: the one place errors become wire data."""
    payload: dict[str, Any] = {"code": error.code.value, "message": error.message}
    if error.related_id:
        payload["related_id"] = error.related_id
    if error.detail:
        payload["detail"] = error.detail
    return payload


def parse_seq(value: str | None, where: str, related_id: str) -> int:
    number = parse_uint64(value)
    if number is None:
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"{where} must be a decimal seq",
            related_id=related_id,
            detail={"where": f"/payload/{where}"},
        )
    return number
