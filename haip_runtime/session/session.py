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

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import FlowControlConfig, SessionConfig
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
from haip_runtime.session.negotiation import Downgrader

logger = logging.getLogger(__name__)

#: Envelopes a numbered client may send past a gap before the runtime stops waiting for the gap.
MAX_INBOUND_GAP = 1000
#: How long a gap may stay open before the runtime asks the client to replay it (PROTOCOL.md section 10).
GAP_GRACE_SECONDS = 0.5
#: How long after asking the runtime waits for the gap to be filled before it carries on without it.
GAP_GIVE_UP_SECONDS = 5.0
#: Inbound envelope ids remembered per session, so a client that re-sends after a reconnect is not served twice.
DEDUP_WINDOW = 1024
#: REPLAY_REQUESTs a connection may have waiting; more from a client that does not read closes it with 1013.
MAX_PENDING_REPLAYS = 16
#: Frames of an earlier binding an outbox still writes after it is moved to another session (the server HAI).
_MAX_CARRIED_FRAMES = 8


class Frame(str):
    """One outbound envelope as the window hands it out: its JSON text, its ``seq`` and, in two-frame
    mode, its binary part. Made when read; the window keeps plain text (a ``str`` subclass carries a
    ``__dict__``, several hundred bytes a frame)."""

    seq: int
    data: bytes | None

    @classmethod
    def make(cls, text: str, seq: int, data: bytes | None = None) -> Frame:
        frame = cls(text)
        frame.seq, frame.data = seq, data
        return frame

    @property
    def size(self) -> int:
        return len(self) + (len(self.data) if self.data is not None else 0)

    def inline(self) -> str:
        """The envelope as one text frame (a binary part goes back into ``payload.data`` as base64)."""
        if self.data is None:
            return str(self)
        envelope = json.loads(self)
        envelope.pop("bin_len", None)
        envelope.pop("bin_mime", None)
        envelope["payload"]["data"] = base64.b64encode(self.data).decode("ascii")
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


class ReplayWindow:
    """The session's recent outbound frames by seq: at least ``messages`` or ``seconds`` of them,
    whichever holds more, but never more than ``max_bytes`` (the newest frame is always kept)."""

    def __init__(self, messages: int, seconds: float, max_bytes: int, clock: Callable[[], float]) -> None:
        self.messages = messages
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._clock = clock
        #: (time recorded, text) of each frame from ``_head`` on; a list, not a deque (an idle session's
        #: window holds two frames, and an empty deque is 0.6 KB), trimmed from the front now and then.
        self._frames: list[tuple[float, str]] = []
        self._head = 0
        self._binary: dict[int, bytes] = {}  # the binary parts of two-frame envelopes, by seq
        self._first = 1  # seq of _frames[_head]
        self.bytes = 0

    @property
    def first_seq(self) -> int:
        return self._first

    @property
    def last_seq(self) -> int:
        return self._first + len(self._frames) - self._head - 1

    def __len__(self) -> int:
        return len(self._frames) - self._head

    def record(self, seq: int, text: str, data: bytes | None = None, *, unwritten_from: int | None = None) -> None:
        """Keep frame ``seq``; let the oldest go past the bounds. Frames from ``unwritten_from`` on (what
        the connection has yet to write, a resume's backlog) outlive the count and age bounds, never
        the bytes bound."""
        assert seq == self.last_seq + 1, "seqs are recorded in order"
        now = self._clock()
        frames = self._frames
        frames.append((now, text))
        self.bytes += len(text)
        if data is not None:
            self._binary[seq] = data
            self.bytes += len(data)
        horizon = now - self.seconds
        spare = seq + 1 if unwritten_from is None else unwritten_from
        while len(frames) - self._head > 1 and (
            self.bytes > self.max_bytes
            or (len(frames) - self._head > self.messages and frames[self._head][0] < horizon and self._first < spare)
        ):
            self.bytes -= len(frames[self._head][1])
            self._head += 1
            dropped = self._binary.pop(self._first, None)
            self.bytes -= len(dropped) if dropped is not None else 0
            self._first += 1
        if self._head >= 64 and self._head * 2 >= len(frames):
            del frames[: self._head]  # amortised: the list is trimmed once half of it is gone
            self._head = 0

    def get(self, seq: int) -> Frame | None:
        index = seq - self._first
        if not 0 <= index < len(self._frames) - self._head:
            return None
        return Frame.make(self._frames[self._head + index][1], seq, self._binary.get(seq) if self._binary else None)

    def holds(self, from_seq: int) -> bool:
        """Whether every frame from ``from_seq`` on is still here."""
        return from_seq >= self._first


class _Signal:
    """A wake-up flag with at most one waiter (the connection's writer), cleared as it is taken.

    An ``asyncio.Event`` keeps a deque of waiters, about 0.7 KB for every connection."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until set (at once if it is); then clear it."""
        if not self._set:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        self._set = False


class Outbox:
    """One connection's cursor over its session's outbound frames, and its close request.

    The transport iterates ``frames()``. ``wake`` is called for each new frame; a connection more
    than ``limit`` live frames behind is closed with 1013 (its session stays resumable) instead of
    slowing the transaction or the other members, and ``on_abort`` is called (the transport ends
    the connection if the peer does not take the close either). The backlog of a resume does not
    count: the client asked for all of it. Idle outboxes are many: their state is kept small (lists,
    not deques, for what is rarely there).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.close_code: int | None = None
        self.close_reason = ""
        self._window: ReplayWindow | None = None
        self._next = 1
        self._live_floor = 0
        self._end: int | None = None
        self._carried: list[Frame] = []  # at most _MAX_CARRIED_FRAMES
        self._replays: list[tuple[int, int]] = []  # at most MAX_PENDING_REPLAYS
        #: Set when there may be something to write (one flag, reused: an event per wait was a
        #: measurable part of every streamed frame).
        self._wake = _Signal()
        #: Called when the connection must go at once (1013): the transport stops waiting on a stalled peer.
        self.on_abort: Callable[[], None] | None = None
        #: Called when the writer has written every recorded frame (the session records a held part).
        self.on_drained: Callable[[], None] | None = None
        self._writing = False
        #: Called whenever there may be something to write (a transport that writes only then starts its writer).
        self.on_wake: Callable[[], None] | None = None

    def bind(self, window: ReplayWindow, next_seq: int) -> None:
        """Follow ``window`` from ``next_seq`` on; frames still unwritten of an earlier window go first."""
        if self._window is not None and self._window is not window:
            for seq in range(self._next, self._window.last_seq + 1)[:_MAX_CARRIED_FRAMES]:
                frame = self._window.get(seq)
                if frame is not None:
                    self._carried.append(frame)
        self._window = window
        self._next = next_seq
        self._live_floor = window.last_seq
        self._replays.clear()
        self._signal()

    def wake(self) -> None:
        window = self._window
        if window is not None and window.last_seq - max(self._next - 1, self._live_floor) > self.limit:
            self.close(CloseCode.TRY_AGAIN_LATER, "client is not reading fast enough")
        self._signal()

    def replay(self, from_seq: int, to_seq: int) -> None:
        if len(self._replays) >= MAX_PENDING_REPLAYS:
            self.close(CloseCode.TRY_AGAIN_LATER, "too many replays waiting for a client that is not reading")
            return
        self._replays.append((from_seq, to_seq))
        self._signal()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Ask the transport to close after the frames already sent to it (at once for 1013)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            if self.on_drained is not None:
                self.on_drained()  # a held part was sent before the close: it is written first
            self._end = self._window.last_seq if self._window is not None else 0
            if code == CloseCode.TRY_AGAIN_LATER and self.on_abort is not None:
                self.on_abort()
        self._signal()

    def discard(self) -> None:
        """The connection is gone: stop at once."""
        self.close(CloseCode.NORMAL)
        self._end, self._carried, self._replays = 0, [], []
        self._signal()

    @property
    def written(self) -> int:
        """The last live seq handed to the transport."""
        return self._next - 1

    @property
    def busy(self) -> bool:
        """Whether the transport is still writing the last frame it took: the peer (or the network)
        is slower than what the session sends it."""
        return self._writing

    @property
    def backlog(self) -> int:
        """Frames this connection has yet to write (live and replayed)."""
        window = self._window
        live = 0 if window is None else max(0, (self._end or window.last_seq) - self._next + 1)
        return live + len(self._carried) + sum(end - start + 1 for start, end in self._replays)

    def _signal(self) -> None:
        self._wake.set()
        if self.on_wake is not None:
            self.on_wake()

    async def frames(self, linger: float | None = None) -> AsyncIterator[Frame]:
        """The frames to write, in order; ends when the outbox is closed (and, but for 1013, drained).

        With ``linger``, also ends once nothing came to write for that many seconds: for a writer
        that runs only while there is something to write (the next frame starts one again).
        """
        loop = asyncio.get_running_loop()
        while self.close_code != CloseCode.TRY_AGAIN_LATER:
            frame = self._take()
            if frame is not None:
                self._writing = True
                yield frame
                self._writing = False
            elif self.close_code is not None:
                return
            elif linger is None:
                await self._wake.wait()
            else:
                quiet = loop.call_later(linger, self._wake.set)
                await self._wake.wait()
                quiet.cancel()  # (a no-op if it woke us)
                if loop.time() >= quiet.when() and self.close_code is None and not self.backlog:
                    return

    def _take(self) -> Frame | None:
        if self._carried:
            return self._carried.pop(0)
        window = self._window
        if window is None:
            return None
        while self._replays:
            start, end = self._replays[0]
            if start >= end:
                self._replays.pop(0)
            else:
                self._replays[0] = (start + 1, end)
            frame = window.get(start)
            if frame is not None:
                return frame
        if self._next > window.last_seq and self._end is None and self.on_drained is not None:
            self.on_drained()  # all recorded frames are written: a part held meanwhile is recorded now
        last = window.last_seq if self._end is None else min(self._end, window.last_seq)
        if self._next > last:
            return None
        frame = window.get(self._next)
        if frame is None:
            self.close(CloseCode.TRY_AGAIN_LATER, "client fell behind the replay window")
            return None
        self._next += 1
        return frame


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
    ) -> None:
        self.id = id or secret_id()
        self._principal = principal
        self.config = config
        self.credit = InboundCredit(flow or FlowControlConfig())
        self.flow = OutboundFlow(config.max_buffered_messages)
        #: Whether audio goes to this client in two-frame mode (its HAI and its transport both allow it).
        self.binary_frames = False
        self.downgrader = Downgrader(accepted)
        self.transactions: set[str] = set()
        self.active_runs = 0
        self.outbox: Outbox | None = None
        self.detached_at: float | None = None
        self._seq = 0
        self._clock = clock
        self.window = ReplayWindow(
            config.replay_window_messages, config.replay_window_seconds, config.replay_window_bytes, clock
        )
        self._inbound_numeric: bool | None = None
        self._last_in = 0
        self._ahead: set[int] = set()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        #: MESSAGE_PARTs of one message held while the writer is behind, recorded as one (and their text's length).
        self._pending: list[Event] = []
        self._pending_size = 0
        #: Called with the type of every envelope sent (the runtime's metrics).
        self.on_sent: Callable[[str], None] | None = None

    @classmethod
    def provisional(cls, config: SessionConfig, flow: FlowControlConfig | None = None) -> Session:
        """A session for a connection whose client has not authenticated yet."""
        return cls(None, _EVERY_EVENT, config, flow=flow)

    def authenticate(self, principal: Principal, accepted: frozenset[str]) -> None:
        self._principal = principal
        self.downgrader = Downgrader(_shared(accepted))

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
        contiguous seq and drops repeated seqs; an envelope past a gap is processed at once and
        the gap is reported by ``missing_inbound``. Any other first seq (the reference clients send
        timestamps) is opaque.
        """
        if envelope.id in self._seen_ids:
            return False
        self._seen_ids[envelope.id] = None
        if len(self._seen_ids) > DEDUP_WINDOW:
            self._seen_ids.popitem(last=False)
        number = envelope.numeric_seq
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
            self._ahead.add(number)
        return True  # (or a late straggler of a gap given up on: served, not counted)

    def _close_ranks(self) -> None:
        while self._last_in + 1 in self._ahead:
            self._ahead.remove(self._last_in + 1)
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
        self._ahead.discard(self._last_in)
        self._close_ranks()
        first, last = missing
        self.send_error(
            ProtocolError(
                ErrorCode.SEQ_VIOLATION,
                f"seqs {first} to {last} never arrived; carrying on without them",
                detail={"where": "/seq", "missing": [str(first), str(last)]},
            )
        )

    # --- connections ---------------------------------------------------------------------------

    def attach(self, outbox: Outbox, last_rx_seq: int | None = None) -> None:
        """Bind a connection; with ``last_rx_seq``, re-send everything after it first.

        Raises ``ProtocolError(RESUME_FAILED)`` (the session is untouched) if frames after
        ``last_rx_seq`` are no longer in the window, or if the client claims frames never sent.
        """
        start = self._seq + 1 if last_rx_seq is None else last_rx_seq + 1
        if last_rx_seq is not None and last_rx_seq > self._seq:
            raise ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"last_rx_seq {last_rx_seq} is past the last seq this session sent ({self._seq})",
                detail={"where": "/payload/last_rx_seq", "reason": "ahead"},
            )
        if start <= self._seq and not self.window.holds(start):
            raise ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"seq {start} is no longer in the replay window (it starts at {self.window.first_seq})",
                detail={"where": "/payload/last_rx_seq", "reason": "too_old"},
            )
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


def parse_seq(value: str | None, where: str, related_id: str, code: ErrorCode = ErrorCode.INVALID_PAYLOAD) -> int:
    number = parse_uint64(value)
    if number is None:
        raise ProtocolError(
            code,
            f"{where} must be a decimal seq, not {value!r}"[:200],
            related_id=related_id,
            detail={"where": f"/payload/{where}"},
        )
    return number
