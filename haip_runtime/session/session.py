"""One client's protocol state across its connections: the outbound pipeline, inbound order, negotiation.

Everything a client receives goes through its ``Session``, the server ``HAI`` included (seq 1):
``deliver`` adapts an event to what the client accepts, asks the connection's ``OutboundFlow``
whether the client may receive it now (credit, paused channels: PROTOCOL.md section 13), then
stamps it with the next ``seq``, encodes it once and records it in the session's ``ReplayWindow``.
A connection reads that window through its ``Outbox``, a cursor: live frames, a resume and a
``REPLAY_REQUEST`` are all served from the one window, so no frame is copied per connection and a
client that does not read is closed with 1013 whatever it asks for. The window is bounded by
count, age and bytes (PROTOCOL.md section 10).

Seq and flow control: an event the client may not receive yet is held *before* it gets a seq
(per channel, in order, ``MESSAGE_PART``s of one message merged), and is stamped when it is
released. So seqs are always the order frames were recorded and written, replay and resume
re-send exactly what was sent, and a held event is never in the window twice. Held events are
bounded (``max_buffered_messages``): past it, and whenever a connection ends, they are all
recorded at once (the replay window keeps them for the resume) and, past it, the connection is
closed with 1013. A new connection starts with nothing paused, its outbound credit not enforced
and its inbound credit back at the initial grant.
Sessions never import a web framework.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import FlowControlConfig, LimitsConfig, SessionConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Envelope, Event, parse_uint64, secret_id
from haip_runtime.protocol.errors import error_payload
from haip_runtime.protocol.events import ALL_EVENTS, Channel, CloseCode, ErrorCode, EventType
from haip_runtime.session.flow import (
    MAX_MERGED_PART,
    MAX_MERGED_PARTS,
    InboundCredit,
    OutboundFlow,
    merged_parts,
    part_text,
    same_message,
)
from haip_runtime.session.limits import TokenBucket, limited
from haip_runtime.session.liveness import Liveness
from haip_runtime.session.negotiation import Downgrader
from haip_runtime.session.questions import Questions
from haip_runtime.session.timers import Timers
from haip_runtime.session.window import Outbox, ReplayWindow
from haip_runtime.transports.base import Link

logger = logging.getLogger(__name__)

#: Envelopes a numbered client may send past a gap before the runtime stops waiting for the gap.
MAX_INBOUND_GAP = 1000
#: How far past its last seq in order a numbered client's seq may jump; further, the envelope is refused.
MAX_SEQ_JUMP = 2 * MAX_INBOUND_GAP
#: Envelopes past a gap held back (to be processed in seq order once it fills), and their bytes, before
#: the runtime stops waiting for the gap (``SEQ_VIOLATION``) and processes them: memory stays bounded.
MAX_HELD = 64
MAX_HELD_BYTES = 4 * 1024 * 1024
#: Envelopes whose order means nothing, never held past a gap (a held PING would look like a dead link).
_NEVER_HELD = frozenset({EventType.PING, EventType.PONG, EventType.FLOW_UPDATE, EventType.REPLAY_REQUEST})
#: Inbound envelope ids remembered per session, so a client that re-sends after a reconnect is not served twice.
DEDUP_WINDOW = 1024


class WindowSink(Protocol):
    """Where a session's outbound frames and inbound ids go besides its own window (in a cluster: Redis,
    so that another node can take the session over). Called in the send path: must not block."""

    def recorded(self, session: Session, seq: int, text: str, data: bytes | None, event: Event) -> None: ...

    def took(self, session: Session, envelope_id: str) -> None: ...


def may_answer(principal: Principal | None) -> bool:
    """Whether the member may answer tool calls (their roles let them send ``TOOL_UPDATE``): only then are
    they asked in words (a prober's find: a viewer refused TOOL_UPDATE approved by typing "yes")."""
    return principal is None or principal.permissions.may_send("TOOL_UPDATE")


class Session:
    """Protocol state of one client across its connections.

    A connection makes a provisional session at once (its ``HAI`` is seq 1 of it); the handshake
    either ``authenticate``s it or resumes another session, to which the connection's outbox moves.
    """

    def __init__(
        self,
        principal: Principal | None,
        accepted: frozenset[str],
        config: SessionConfig,
        *,
        id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        flow: FlowControlConfig | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.id = id or secret_id()
        self._principal = principal
        self.config = config
        self.credit = InboundCredit(flow or FlowControlConfig())
        self.flow = OutboundFlow(config.max_buffered_messages)
        #: Whether audio goes to this client in two-frame mode (its HAI and its transport both allow it).
        self.binary_frames = False
        self.downgrader = Downgrader(accepted, may_answer=may_answer(principal))
        self.transactions: set[str] = set()
        self.outbox: Outbox | None = None
        #: The deadlines of the connection serving it (``watch``), if one does.
        self.liveness: Liveness | None = None
        #: The client's trace, from the request that opened its connection (``Link.traceparent``).
        self.traceparent: str | None = None
        self.limits = limits or LimitsConfig()
        self._rate: TokenBucket | None = None  # made with the first inbound envelope
        self._tool_calls = 0
        self.detached_at: float | None = None
        #: Whether a client ever resumed it (it then rejoins its transactions itself; PROTOCOL.md section 12).
        self.resumed = False
        self._seq = 0
        self._clock = clock
        self.window = ReplayWindow(
            config.replay_window_messages, config.replay_window_seconds, config.replay_window_bytes, clock, self.id
        )
        self._inbound_numeric: bool | None = None
        self._last_in = 0
        #: Client seqs received past a gap. A dict used as a set: empty (as nearly always) it is 64 bytes,
        #: an empty set 216, and every idle session holds one.
        self._ahead: dict[int, None] = {}
        #: The envelopes of those seqs, held back until the gap fills or is given up, then processed in
        #: seq order (PROTOCOL.md section 10: ordered delivery, whatever order POSTs arrive in); made
        #: with the first, ``None`` again once empty. And their bytes.
        self._held: dict[int, Envelope] | None = None
        self._held_bytes = 0
        #: Frames refused just now whose seq could not be read, on an in-order transport (``refused_inbound``).
        self._unread_refused = 0
        #: Made with the first envelope held: processing of this session's envelopes goes one at a
        #: time under it from then on (a gap given up by its deadline releases envelopes from a task).
        self.inbound_lock: anyio.Lock | None = None
        #: Called when a gap given up by its deadline released held envelopes (the connection processes them).
        self.on_released: Callable[[], None] | None = None
        #: The task that made ``inbound_lock`` and holds it until its call ends (``release_first_lock``).
        self._lock_holder: int | None = None
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        #: MESSAGE_PARTs of one message held while the writer is behind, recorded as one (and their text's length).
        self._pending: list[Event] = []
        self._pending_size = 0
        #: Called with the type of every envelope sent (the runtime's metrics).
        self.on_sent: Callable[[str], None] | None = None
        #: Where frames and inbound ids are mirrored (``None``: nowhere, outside a cluster).
        self.sink: WindowSink | None = None

    @classmethod
    def provisional(
        cls, config: SessionConfig, flow: FlowControlConfig | None = None, limits: LimitsConfig | None = None
    ) -> Session:
        """A session for a connection whose client has not authenticated yet."""
        return cls(None, _EVERY_EVENT, config, flow=flow, limits=limits)

    def authenticate(self, principal: Principal, accepted: frozenset[str]) -> None:
        self._principal = principal
        self.downgrader = Downgrader(_shared(accepted), may_answer=may_answer(principal))

    @property
    def principal(self) -> Principal:
        if self._principal is None:
            raise RuntimeError(f"session {self.id} is not authenticated")
        return self._principal

    @principal.setter
    def principal(self, principal: Principal) -> None:
        """A new token for the same user (a resume): its rights and expiry apply from now on."""
        self._principal = principal

    @property
    def user(self) -> str:
        return self.principal.user

    @property
    def accepted(self) -> frozenset[str]:
        return self.downgrader.accepted

    @property
    def questions(self) -> Questions:
        """Approvals and input requests this client was asked in words (PROTOCOL.md section 12)."""
        return self.downgrader.questions

    @property
    def last_seq(self) -> int:
        return self._seq

    # --- outbound ------------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        """Send ``event`` as this client accepts it; recorded for replay even while detached.

        While attached, an event the client may not receive yet (flow control) waits unstamped.
        """
        for adapted in self.downgrader.adapt(event):
            if self.outbox is None or self.flow.admit(adapted):
                self._send(adapted)
            elif self.flow.full:
                self._overflow()

    def _send(self, event: Event) -> None:
        """Record ``event``, or, while the writer is behind, hold a ``MESSAGE_PART`` and merge the parts
        of the same message that follow into it (merging under pressure: a client or a network that
        cannot keep up gets fewer, larger parts instead of a growing backlog). The held part is
        recorded, so it gets its seq, when the writer has caught up, or before anything else."""
        if self._pending:
            first = self._pending[0]
            room = self._pending_size < MAX_MERGED_PART and len(self._pending) < MAX_MERGED_PARTS
            if room and same_message(first, event):
                self._pending.append(event)
                self._pending_size += len(part_text(event))
                return
            self._record_pending()
        if event.type == EventType.MESSAGE_PART and self.outbox is not None and self.outbox.busy:
            self._pending = [event]
            self._pending_size = len(part_text(event))
            return
        self._record(event)

    def _record_pending(self) -> None:
        """Record the part held under pressure: one event with the text of all its parts."""
        held, self._pending = self._pending, []
        if held:
            self._record(merged_parts(held))

    def _record_held(self) -> None:
        """Record everything held back, whatever the credit: the part merged under pressure first (it
        was admitted before anything flow control holds), then what flow control holds."""
        self._record_pending()
        for held in self.flow.flush():
            self._record(held)

    def _record(self, event: Event) -> None:
        self._seq += 1
        ack = self._last_in if self._inbound_numeric else None
        data = None
        if self.binary_frames and event.type in _AUDIO and isinstance(event.payload, dict):
            event, data = _two_frame(event)
        unwritten = None if self.outbox is None else self.outbox.written + 1
        text = event.to_wire(session=self.id, seq=self._seq, ack=ack)
        self.window.record(self._seq, text, data, unwritten_from=unwritten)
        if self.sink is not None:
            self.sink.recorded(self, self._seq, text, data, event)
        if self.on_sent is not None:
            self.on_sent(event.type)
        if self.outbox is not None:
            self.outbox.wake()

    def _overflow(self) -> None:
        self._record_held()
        if self.outbox is not None:
            self.outbox.close(CloseCode.TRY_AGAIN_LATER, "client is not receiving (flow control) and its queue is full")

    # --- flow control from the client ----------------------------------------------------------

    def grant(self, channel: str, messages: int, size: int) -> None:
        """FLOW_UPDATE: more credit on ``channel``; what it allows goes out at once."""
        for event in self.flow.grant(channel, messages, size):
            self._send(event)

    def pause(self, channel: str) -> None:
        self.flow.pause(channel)

    def resume_channel(self, channel: str) -> None:
        for event in self.flow.resume(channel):
            self._send(event)

    def send(
        self, type: str, payload: dict[str, Any] | str, *, transaction: str | None = None, channel: str = Channel.SYSTEM
    ) -> None:
        self.deliver(Event(type=type, payload=payload, channel=channel, transaction=transaction))

    def send_error(self, error: ProtocolError, *, transaction: str | None = None) -> None:
        self.send(EventType.ERROR, error_payload(error), transaction=transaction)

    def replay(self, from_seq: int, to_seq: int | None, related_id: str) -> None:
        """REPLAY_REQUEST: re-send ``from_seq`` to ``to_seq`` (inclusive) on the current connection."""
        last = self._seq if to_seq is None else min(to_seq, self._seq)
        # A range with nothing to send is said, not met with silence a client would wait on (a tester's find)
        if to_seq is not None and to_seq < from_seq:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"to_seq {to_seq} is before from_seq {from_seq}",
                related_id=related_id,
                detail={"where": "/payload/to_seq"},
            )
        if from_seq > self._seq:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"seq {from_seq} was not sent yet: the last sent is {self._seq}",
                related_id=related_id,
                detail={"where": "/payload/from_seq"},
            )
        if from_seq < 1 or not self.window.holds(from_seq):
            raise ProtocolError(
                ErrorCode.REPLAY_TOO_OLD,
                f"seq {from_seq} is no longer in the replay window (it starts at {self.window.first_seq})",
                related_id=related_id,
            )
        if self.outbox is not None and from_seq <= last:
            self.outbox.replay(from_seq, last)

    # --- inbound -------------------------------------------------------------------------------

    def accept_inbound(self, envelope: Envelope) -> bool:
        """Track the client's envelope; ``False`` for a duplicate that must be dropped.

        Any envelope whose ``id`` was seen lately is a duplicate (a client re-sending after a
        reconnect). A client whose first seq is ``"1"`` is numbered: the runtime acks the highest
        contiguous seq and drops repeated seqs; an envelope past a gap is held back by ``take``
        and the gap is reported by ``missing_inbound``. Any other first seq (the reference clients
        send timestamps) is opaque.
        """
        return self._accept(envelope, envelope.numeric_seq)

    def _accept(self, envelope: Envelope, number: int | None) -> bool:
        """``accept_inbound``, with the envelope's seq as a number already read (``number``)."""
        if not self._count_inbound(number):  # a seq seen already
            return False
        if envelope.id in self._seen_ids:  # its seq counted (a resend renumbered: no gap left), itself dropped
            return False
        if self._held and any(held.id == envelope.id for held in self._held.values()):
            return False  # held past a gap, and resent renumbered meanwhile: the held one goes when due
        if not self._holds(envelope, number):  # (a held one's id is kept once it is processed: ``released``)
            self._took(envelope.id)
        return True

    def _took(self, envelope_id: str) -> None:
        """Remember an envelope taken (dedup, here and, in a cluster, on the node that takes the session over)."""
        self._seen_ids[envelope_id] = None
        if len(self._seen_ids) > DEDUP_WINDOW:
            self._seen_ids.popitem(last=False)
        if self.sink is not None:
            self.sink.took(self, envelope_id)

    def _holds(self, envelope: Envelope, number: int | None) -> bool:
        """Whether ``envelope`` (seq ``number``), just counted, came past a gap and must wait for it (``take``)."""
        return bool(self._ahead) and number is not None and number > self._last_in and envelope.type not in _NEVER_HELD

    def refused_inbound(self, seq: str | None, *, in_order: bool = False) -> None:
        """A frame refused before it was an envelope (too large, invalid): it arrived, so it takes its place
        in a numbered client's seqs (acked; no gap asked for, nothing after it held back). Its ``seq`` if it
        could be read. Else, on a transport whose frames arrive in the order sent (``in_order``: WebSocket,
        HTTP streaming), the next envelope says: if its seq leaves a gap of at most as many frames as were
        refused unread just before it, those frames were that gap (a frame that was no envelope at all
        leaves none). Over SSE (POSTs may overtake each other) an unread seq stays a gap: taking the wrong
        one would drop the good envelope that has it."""
        number = parse_uint64(seq)
        if number is None and in_order and self._inbound_numeric:
            self._unread_refused += 1  # (the next envelope tells whether the client numbered it)
        elif number is not None and self._unread_refused:
            # A refused frame whose seq was read tells as the next envelope does (a front-end developer's
            # find: an unreadable frame, then one too large, left a gap the runtime waited 5 s for).
            self._fill_unread(number)
        # (Not past the gap a client may open: a refused frame must not move its numbering far ahead.)
        if number is not None and self._inbound_numeric and number <= self._last_in + MAX_INBOUND_GAP:
            self._count_inbound(number)
            if self.liveness is not None:
                self.liveness.watch_gap()

    def _fill_unread(self, number: int | None) -> None:
        """The envelope right after frames refused unread on an in-order transport (seq ``number``): the gap
        its seq leaves, if no wider than their number, was them (``refused_inbound``)."""
        refused, self._unread_refused = self._unread_refused, 0
        if number is None or not self._inbound_numeric:
            return
        highest = max(self._last_in, max(self._ahead, default=0))
        if 0 < number - highest - 1 <= refused:
            for missing in range(highest + 1, number):
                self._count_inbound(missing)

    def _count_inbound(self, number: int | None) -> bool:
        if self._inbound_numeric is None:
            self._inbound_numeric = number == 1
        if not self._inbound_numeric or number is None:
            return True
        if number <= self._last_in or number in self._ahead:
            return False
        if number != self._last_in + 1 and len(self._ahead) >= MAX_INBOUND_GAP:
            self.give_up_gap()
        if number == self._last_in + 1:
            self._last_in = number
            self._close_ranks()
        elif number > self._last_in:
            self._ahead[number] = None
        return True  # (or a late straggler of a gap given up on: served, not counted)

    @property
    def inbound_state(self) -> tuple[bool | None, int]:
        """Whether the client numbers its envelopes (``None``: not known yet), and its last contiguous seq."""
        return self._inbound_numeric, self._last_in

    def carry_on(
        self,
        frames: list[tuple[int, str, bytes | None]],
        last_seq: int,
        inbound: tuple[bool | None, int],
        seen: list[str],
    ) -> None:
        """Continue a session another node served (PROTOCOL.md section 10, in a cluster): its frames
        from the first the client lacks (``frames``, in order, or none), numbering on after ``last_seq``,
        and its inbound order and dedup as they stood there."""
        self.window.start_at(frames[0][0] if frames else last_seq + 1)
        self.window.extend(frames)
        self._seq = last_seq
        self._inbound_numeric, self._last_in = inbound
        self._seen_ids = OrderedDict.fromkeys(seen[-DEDUP_WINDOW:])
        self.detached_at = self._clock()

    def _close_ranks(self) -> None:
        while self._last_in + 1 in self._ahead:
            del self._ahead[self._last_in + 1]
            self._last_in += 1

    def missing_inbound(self) -> tuple[int, int] | None:
        """The first gap in the client's seqs, as an inclusive range, if there is one."""
        return (self._last_in + 1, min(self._ahead) - 1) if self._ahead else None

    def give_up_gap(self) -> None:
        """Stop waiting for the first gap: tell the client, and go on from the envelopes after it."""
        missing = self.missing_inbound()
        if missing is None:
            return
        self._last_in = missing[1] + 1
        self._ahead.pop(self._last_in, None)
        self._close_ranks()
        first, last = missing
        self.send_error(
            ProtocolError(
                ErrorCode.SEQ_VIOLATION,
                f"seqs {first} to {last} never arrived; carrying on without them",
                detail={"where": "/seq", "missing": [str(first), str(last)]},
            )
        )
        if self._held and min(self._held) <= self._last_in and self.on_released is not None:
            self.on_released()

    def _hold(self, number: int, envelope: Envelope) -> None:
        held = self._held
        if held is None:
            held = self._held = {}
            if self.inbound_lock is None:  # made, and held by the call that holds this envelope (``process``)
                self.inbound_lock = anyio.Lock(fast_acquire=True)
                self.inbound_lock.acquire_nowait()
                self._lock_holder = anyio.get_current_task().id
        held[number] = envelope
        self._held_bytes += envelope.size
        if len(held) > MAX_HELD or self._held_bytes > MAX_HELD_BYTES:
            while min(held) > self._last_in and self.missing_inbound() is not None:
                self.give_up_gap()  # (the caller processes what this releases, in order)

    def released(self, before: Envelope | None = None) -> Envelope | None:
        """The next held envelope whose gap has filled or been given up, in seq order (before ``before``'s
        seq, if given), taken out of the hold; ``None`` if there is none."""
        held = self._held
        if not held:
            return None
        first = min(held)
        if first > self._last_in:
            return None
        if before is not None:
            number = before.numeric_seq
            if number is not None and first >= number:
                return None
        envelope = held.pop(first)
        self._held_bytes -= envelope.size
        if not held:
            self._held, self._held_bytes = None, 0
        self._took(envelope.id)
        return envelope

    def release_first_lock(self) -> None:
        """The call that made ``inbound_lock`` (holding its first envelope) lets it go, once done."""
        if self._lock_holder is not None and self._lock_holder == anyio.get_current_task().id:
            self._lock_holder = None
            assert self.inbound_lock is not None
            self.inbound_lock.release()

    @property
    def holding(self) -> bool:
        """Whether envelopes wait for a gap in the client's seqs to fill."""
        return bool(self._held)

    def take(self, envelope: Envelope) -> bool:
        """An inbound envelope after the handshake: ``True`` to process it now; ``False`` for a duplicate
        to drop, or for one past a gap in a numbered client's seqs, held until the gap fills or is given
        up (then ``released``, in seq order). Raises what it breaks (credit, the session's message
        rate). A gap it opens is watched for."""
        number = envelope.numeric_seq  # (read once: every step below needs it)
        if self._inbound_numeric and number is not None:
            if number > self._last_in + MAX_SEQ_JUMP:  # counted, it would make every later seq a duplicate
                raise ProtocolError(
                    ErrorCode.SEQ_VIOLATION,
                    f"seq {number} is more than {MAX_SEQ_JUMP} past your last in order ({self._last_in}); dropped",
                    related_id=envelope.id,
                    detail={"where": "/seq"},
                )
        if self._unread_refused:
            self._fill_unread(number)
        if not self._accept(envelope, number):
            return False
        if self.liveness is not None:
            self.liveness.watch_gap()
        self.spend_credit(envelope)
        self.check_rate(envelope)
        if number is not None and self._holds(envelope, number):
            self._hold(number, envelope)
            return False
        return True

    def heard(self) -> None:
        """The peer sent something: it is alive."""
        if self.liveness is not None:
            self.liveness.heard()

    def spend_credit(self, envelope: Envelope) -> None:
        """The client's credit for this envelope (FLOW_CONTROL_VIOLATION past it), topped up when due."""
        grant = self.credit.consume(envelope, self.outbox.written if self.outbox is not None else self._seq)
        if grant is not None:
            self.send(EventType.FLOW_UPDATE, grant)
            self.credit.granted(self._seq, grant)

    def check_rate(self, envelope: Envelope) -> None:
        """One inbound envelope against this session's own message rate (``limits.messages_per_second``)."""
        now = self._clock()
        if self._rate is None:
            self._rate = TokenBucket(self.limits.messages_per_second, self.limits.message_burst, now)
        if not self._rate.take(now):
            message = f"more than {self.limits.messages_per_second:g} messages a second; this one was dropped"
            raise limited(message, "messages_per_second", envelope.id)

    def claim_tool_call(self, related_id: str) -> None:
        """Before a direct TOOL_CALL of this session starts; pair with ``release_tool_call``."""
        if self._tool_calls >= self.limits.tool_calls_per_session:
            message = f"{self._tool_calls} tool calls of this session are still running"
            raise limited(message, "tool_calls_per_session", related_id)
        self._tool_calls += 1

    def release_tool_call(self) -> None:
        self._tool_calls = max(0, self._tool_calls - 1)

    @property
    def tool_calls(self) -> int:
        """Direct tool calls of this session still running."""
        return self._tool_calls

    # --- connections ---------------------------------------------------------------------------

    def ready(self, epoch: str, *, resumed: bool) -> None:
        """``INFO session.ready``: the handshake (or a resume) is done and the client may go on."""
        self.send(EventType.INFO, {"event": "session.ready", "user": self.user, "resumed": resumed, "epoch": epoch})

    def watch(self, timers: Timers, link: Link) -> None:
        """Start the deadlines of the connection now serving this session (heartbeat, token expiry, gaps)."""
        assert self.outbox is not None
        self.unwatch()
        self._unread_refused = 0  # (what another connection refused says nothing of this one's order)
        self.traceparent = link.traceparent
        self.liveness = Liveness(self, timers, self.outbox, link)
        self.liveness.start()
        self.liveness.watch_gap()  # a gap left open when the last connection went: asked for, or given up, again

    def unwatch(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
            self.liveness = None

    def resume_refusal(self, last_rx_seq: int | None) -> ProtocolError | None:
        """Why a resume after ``last_rx_seq`` cannot be served (``RESUME_FAILED``, its ``reason`` ``ahead``
        or ``too_old``), else ``None``: the check ``attach`` makes, which a node asked to hand the session to
        another makes first (a failed resume elsewhere must leave the session as it is)."""
        if last_rx_seq is None:
            return None
        if last_rx_seq > self._seq:
            return ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"last_rx_seq {last_rx_seq} is past the last seq this session sent ({self._seq})",
                detail={"where": "/payload/last_rx_seq", "reason": "ahead"},
            )
        if last_rx_seq < self._seq and not self.window.holds(last_rx_seq + 1):
            return ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"seq {last_rx_seq + 1} is no longer in the replay window (it starts at {self.window.first_seq})",
                detail={"where": "/payload/last_rx_seq", "reason": "too_old"},
            )
        return None

    def attach(self, outbox: Outbox, last_rx_seq: int | None = None) -> None:
        """Bind a connection; with ``last_rx_seq``, re-send everything after it first.

        Raises ``ProtocolError(RESUME_FAILED)`` (the session is untouched) if frames after
        ``last_rx_seq`` are no longer in the window, or if the client claims frames never sent.
        """
        refusal = self.resume_refusal(last_rx_seq)
        if refusal is not None:
            raise refusal
        start = self._seq + 1 if last_rx_seq is None else last_rx_seq + 1
        if self.outbox is not None and self.outbox is not outbox:
            self.outbox.close(CloseCode.NORMAL, "session resumed on another connection")
        if self.outbox is not None:
            self._record_held()
            self.outbox.on_drained = None
        self.outbox = outbox
        outbox.on_drained = self._record_pending
        self.detached_at = None
        self.flow.reset((self.credit.config.initial_credit_messages, self.credit.config.initial_credit_bytes))
        self.credit.reset()  # the new connection's server HAI advertises the initial credit afresh
        outbox.bind(self.window, start)

    def detach(self, outbox: Outbox) -> None:
        outbox.close()  # it writes nothing recorded after this
        outbox.on_drained = None
        if self.liveness is not None and self.liveness.outbox is outbox:
            self.unwatch()
        if self.outbox is outbox:
            self.outbox = None
            self.detached_at = self._clock()
            self._record_held()  # kept in the window for the resume

    def expired(self, now: float) -> bool:
        return self.detached_at is not None and now - self.detached_at > self.config.resume_timeout_seconds


_AUDIO = frozenset({EventType.AUDIO, EventType.AUDIO_CHUNK})
_EVERY_EVENT = frozenset(ALL_EVENTS)
#: The sets of event types sessions accept, one object per distinct set: clients of one kind all send
#: the same list, and a set of their names (and the names themselves) is ~1.5 KB for each session.
_ACCEPTED: dict[frozenset[str], frozenset[str]] = {}
_MAX_ACCEPTED_SETS = 256


def _shared(accepted: frozenset[str]) -> frozenset[str]:
    """The one object for ``accepted`` (remembered while fewer than ``_MAX_ACCEPTED_SETS`` are)."""
    known = _ACCEPTED.get(accepted)
    if known is not None:
        return known
    if len(_ACCEPTED) < _MAX_ACCEPTED_SETS:
        _ACCEPTED[accepted] = accepted
    return accepted


def _two_frame(event: Event) -> tuple[Event, bytes | None]:
    """An audio event with inline ``data`` as an envelope announcing a binary frame, and that frame."""
    assert isinstance(event.payload, dict)
    data = event.payload.get("data")
    if not isinstance(data, str):
        return event, None
    body = {key: value for key, value in event.payload.items() if key != "data"}
    raw = base64.b64decode(data)
    mime = str(event.payload.get("mime") or "application/octet-stream")
    return event.with_changes(payload=body, bin_len=len(raw), bin_mime=mime), raw
