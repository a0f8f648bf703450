"""Flow control (PROTOCOL.md section 13): credit per channel, both ways, and pause/resume.

``InboundCredit`` is what a client may send: the runtime's advertised credit per channel, spent
by each envelope, topped up with ``FLOW_UPDATE`` as the runtime consumes; an envelope past it is
refused with ``FLOW_CONTROL_VIOLATION`` (dropped, the connection kept). ``OutboundFlow`` is what
a client may receive: the credit from its ``HAI``, honoured only once it has sent a
``FLOW_UPDATE`` (the reference SDK advertises credit it never replenishes; counting starts with
that first ``FLOW_UPDATE``), and its paused channels. Events a client cannot receive wait here,
before they get a ``seq`` (see ``Session``). Session mechanics are never held nor counted, in
either direction: a client must always be able to answer a ``PING`` or grant credit, and the
runtime to say ``ERROR``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from haip_runtime.config.models import FlowControlConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Envelope, Event
from haip_runtime.protocol.events import ErrorCode, EventType

#: Types that are neither held nor counted against credit (liveness, credit itself, errors, replay).
UNCOUNTED = frozenset(
    {
        EventType.HAI,
        EventType.PING,
        EventType.PONG,
        EventType.ERROR,
        EventType.FLOW_UPDATE,
        EventType.PAUSE_CHANNEL,
        EventType.RESUME_CHANNEL,
        EventType.REPLAY_REQUEST,
    }
)
_AUDIO = frozenset({EventType.AUDIO, EventType.AUDIO_CHUNK})
#: Channels one connection may use with credit or pause, each way: a bound on what a client can make us keep.
MAX_CHANNELS = 64
#: Parts of one message are merged while they wait (held by flow control, or by a writer that is
#: behind) until the merged text is this long: a frame stays small, and a client that pauses a
#: channel under an endless stream cannot make one part grow without bound (nor each merge copy it).
MAX_MERGED_PART = 64 * 1024
#: Parts a session keeps, unmerged until recorded, while its writer is behind (a bound for tiny parts).
MAX_MERGED_PARTS = 1024


def event_bytes(event: Event) -> int:
    """What an outbound event costs in byte credit: its payload, or for audio its decoded bytes."""
    if event.type in _AUDIO and isinstance(event.payload, dict) and isinstance(event.payload.get("data"), str):
        return len(event.payload["data"]) * 3 // 4
    return event.payload_size


def envelope_bytes(envelope: Envelope) -> int:
    """What an inbound envelope costs: ``bin_len`` (or decoded audio bytes) for audio, else its frame."""
    if envelope.type in _AUDIO:
        if envelope.bin_len is not None:
            return envelope.bin_len
        data = envelope.payload_dict.get("data")
        if isinstance(data, str):
            return len(data) * 3 // 4
    return envelope.size


class InboundCredit:
    """The client's send credit per channel, topped up with FLOW_UPDATE each time half of it is used.

    A top-up counts only once its FLOW_UPDATE has been written to the client (``settle``): a client
    that does not read never learns of new credit, so one that keeps sending runs out of it.
    """

    def __init__(self, config: FlowControlConfig) -> None:
        self.config = config
        self._left: dict[str, list[int]] = {}
        self._used: dict[str, list[int]] = {}
        #: Top-ups sent but not yet written (a few; a list, not a 600-byte deque, for every idle session).
        self._granted: list[tuple[int, str, int, int]] = []

    def consume(self, envelope: Envelope, written_seq: int) -> dict[str, Any] | None:
        """Spend credit for ``envelope``; returns the FLOW_UPDATE payload when a top-up is due.

        ``written_seq``: the last outbound seq written to the client (its FLOW_UPDATEs up to there
        count). Raises ``FLOW_CONTROL_VIOLATION`` (nothing spent) when the channel's credit is gone.
        """
        if envelope.type in UNCOUNTED:
            return None
        self._settle(written_seq)
        channel, size = envelope.channel, envelope_bytes(envelope)
        if channel not in self._left and len(self._left) >= MAX_CHANNELS:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_VIOLATION,
                f"at most {MAX_CHANNELS} channels per connection (the message was dropped)",
                related_id=envelope.id,
                detail={"channel": channel, "limit": MAX_CHANNELS},
            )
        left = self._left.setdefault(channel, [self.config.initial_credit_messages, self.config.initial_credit_bytes])
        if left[0] < 1 or left[1] < size:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_VIOLATION,
                f"no credit left on channel {channel} ({left[0]} messages, {left[1]} bytes); "
                "wait for FLOW_UPDATE (the message was dropped)",
                related_id=envelope.id,
                detail={"channel": channel, "messages": left[0], "bytes": left[1]},
            )
        left[0] -= 1
        left[1] -= size
        used = self._used.setdefault(channel, [0, 0])
        used[0] += 1
        used[1] += size
        if used[0] * 2 >= self.config.initial_credit_messages or used[1] * 2 >= self.config.initial_credit_bytes:
            self._used[channel] = [0, 0]
            return {"channel": channel, "add_messages": used[0], "add_bytes": used[1]}
        return None

    def reset(self) -> None:
        """A new connection: the initial credit again (its server HAI says so)."""
        self._left.clear()
        self._used.clear()
        self._granted.clear()

    def granted(self, seq: int, grant: dict[str, Any]) -> None:
        """The FLOW_UPDATE ``grant`` went out as ``seq``; its credit counts once that is written."""
        self._granted.append((seq, grant["channel"], grant["add_messages"], grant["add_bytes"]))

    def _settle(self, written_seq: int) -> None:
        while self._granted and self._granted[0][0] <= written_seq:
            _, channel, messages, size = self._granted.pop(0)
            left = self._left[channel]
            left[0] += messages
            left[1] += size


class OutboundFlow:
    """What one connection's client may receive now, and the events waiting until it may.

    Held events wait per channel, in order; consecutive ``MESSAGE_PART``s of one message are
    merged into one while they wait. ``full`` says the wait has passed its bound.
    """

    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.enforced = False
        self._initial = (0, 0)
        self._credit: dict[str, list[int]] = {}
        #: Paused channels. A dict used as a set: empty (as nearly always) it is 64 bytes, an empty set
        #: 216, and every idle session holds one.
        self._paused: dict[str, None] = {}
        self._held: dict[str, deque[Event]] = {}
        self.held = 0

    def reset(self, initial: tuple[int, int]) -> None:
        """A new connection: its client's advertised credit, nothing paused, credit not yet enforced."""
        assert self.held == 0, "held events are flushed when a connection ends"
        self.enforced = False
        self._initial = initial
        self._credit.clear()
        self._paused.clear()

    def admit(self, event: Event) -> bool:
        """Whether ``event`` may go now (its credit is then spent); if not, it is held."""
        if (not self.enforced and not self._paused) or event.type in UNCOUNTED:
            return True  # the common case, kept cheap: nothing to count yet
        channel = event.channel
        blocked = channel in self._paused or bool(self._held.get(channel))
        if not blocked and not self.enforced:
            return True
        if not blocked:
            credit = self._credit.setdefault(channel, list(self._initial))
            size = event_bytes(event)
            if credit[0] >= 1 and credit[1] >= size:
                credit[0] -= 1
                credit[1] -= size
                return True
        self._hold(event)
        return False

    @property
    def full(self) -> bool:
        return self.held > self.max_held

    def _hold(self, event: Event) -> None:
        queue = self._held.setdefault(event.channel, deque())
        if queue and same_message(queue[-1], event) and len(part_text(queue[-1])) < MAX_MERGED_PART:
            queue[-1] = merged_parts([queue[-1], event])
            return
        queue.append(event)
        self.held += 1

    def grant(self, channel: str, messages: int, size: int) -> list[Event]:
        """FLOW_UPDATE from the client: more credit, and from now on credit is honoured.

        Counting starts with the first FLOW_UPDATE: from then on each channel may carry the credit
        the client advertised in its HAI, plus what it grants.
        """
        _check_room(channel, self._credit)
        if not self.enforced:
            self.enforced = True
            self._credit.clear()
        credit = self._credit.setdefault(channel, list(self._initial))
        credit[0] += messages
        credit[1] += size
        return self.release()

    def pause(self, channel: str) -> None:
        _check_room(channel, self._paused)
        self._paused[channel] = None

    def resume(self, channel: str) -> list[Event]:
        self._paused.pop(channel, None)
        return self.release()

    def release(self) -> list[Event]:
        """The held events that may go now (their credit spent), channel by channel in order."""
        released: list[Event] = []
        for channel, queue in self._held.items():
            if channel in self._paused:
                continue
            if not self.enforced:
                released += queue
                self.held -= len(queue)
                queue.clear()
                continue
            credit = self._credit.setdefault(channel, list(self._initial))
            while queue:
                size = event_bytes(queue[0])
                if self.enforced and (credit[0] < 1 or credit[1] < size):
                    break
                credit[0] -= 1
                credit[1] -= size
                released.append(queue.popleft())
                self.held -= 1
        return released

    def flush(self) -> list[Event]:
        """Everything held, whatever the credit (the connection ends: the replay window keeps them)."""
        released = [event for queue in self._held.values() for event in queue]
        self._held.clear()
        self.held = 0
        return released


def _check_room(channel: str, known: dict[str, Any]) -> None:
    if channel not in known and len(known) >= MAX_CHANNELS:
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"at most {MAX_CHANNELS} channels per connection",
            detail={"where": "/payload/channel", "limit": MAX_CHANNELS},
        )


def same_message(held: Event, new: Event) -> bool:
    """Whether ``new`` is a ``MESSAGE_PART`` of the same message as the part ``held``."""
    return (
        held.type == new.type == EventType.MESSAGE_PART
        and isinstance(held.payload, dict)
        and isinstance(new.payload, dict)
        and held.payload.get("message_id") == new.payload.get("message_id")
        and held.transaction == new.transaction
    )


def merged_parts(parts: list[Event]) -> Event:
    """Parts of one message (``same_message``) as one part: their text joined, the id of the first
    (what the client sees first) and the rest of the last."""
    if len(parts) == 1:
        return parts[0]
    first, last = parts[0], parts[-1]
    assert isinstance(last.payload, dict)
    text = "".join(part_text(part) for part in parts)
    return last.with_changes(id=first.id, payload={**last.payload, "text": text})


def part_text(part: Event) -> str:
    """The text of a ``MESSAGE_PART``."""
    return str(part.payload.get("text", "")) if isinstance(part.payload, dict) else ""
