"""A session's outbound frames: the ``ReplayWindow`` that keeps them and each connection's ``Outbox`` cursor.

The window holds every recorded frame as text (bounded by count, age and bytes: PROTOCOL.md
section 10); an ``Outbox`` is one connection's position in it, its pending ``REPLAY_REQUEST``
ranges and its close request. Live frames, a resume and a replay are all read from the one
window, so nothing is copied per connection. The ``Session`` records; the transport reads
(through ``transports.base.FrameSource``, which ``Outbox`` implements).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from haip_runtime.protocol.events import CloseCode
from haip_runtime.session.signal import Signal
from haip_runtime.transports.base import Frame

#: REPLAY_REQUESTs a connection may have waiting; more from a client that does not read closes it with 1013.
MAX_PENDING_REPLAYS = 16
#: Frames of an earlier binding an outbox still writes after it is moved to another session (the server HAI).
_MAX_CARRIED_FRAMES = 8


class ReplayWindow:
    """The session's recent outbound frames by seq: at least ``messages`` or ``seconds`` of them,
    whichever holds more, but never more than ``max_bytes`` (the newest frame is always kept)."""

    def __init__(
        self, messages: int, seconds: float, max_bytes: int, clock: Callable[[], float], session: str = ""
    ) -> None:
        #: The id of the session whose frames these are (each ``Frame`` read carries it).
        self.session = session
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

    def extend(self, frames: list[tuple[int, str, bytes | None]]) -> None:
        """Keep ``frames`` (in order, the first right after the last kept) at once: a session continued
        from another node, all of whose frames are the resume's backlog, so that, as ``record``'s
        unwritten frames, they outlive the count and age bounds, never the bytes bound."""
        if not frames:
            return
        assert frames[0][0] == self.last_seq + 1 and frames[-1][0] == frames[0][0] + len(frames) - 1, "in order"
        now = self._clock()
        self._frames += [(now, text) for _, text, _ in frames]
        self.bytes += sum(len(text) for _, text, _ in frames)
        for seq, _, data in frames:
            if data is not None:
                self._binary[seq] = data
                self.bytes += len(data)
        while len(self._frames) - self._head > 1 and self.bytes > self.max_bytes:
            self.bytes -= len(self._frames[self._head][1])
            self._head += 1
            dropped = self._binary.pop(self._first, None)
            self.bytes -= len(dropped) if dropped is not None else 0
            self._first += 1
        if self._head >= 64 and self._head * 2 >= len(self._frames):
            del self._frames[: self._head]
            self._head = 0

    def start_at(self, seq: int) -> None:
        """An empty window whose first frame will be ``seq`` (a session continued from another node)."""
        assert not len(self), "only an empty window starts elsewhere"
        self._first = seq

    def get(self, seq: int) -> Frame | None:
        index = seq - self._first
        if not 0 <= index < len(self._frames) - self._head:
            return None
        data = self._binary.get(seq) if self._binary else None
        return Frame.make(self._frames[self._head + index][1], seq, data, self.session)

    def holds(self, from_seq: int) -> bool:
        """Whether every frame from ``from_seq`` on is still here."""
        return from_seq >= self._first


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
        self._wake = Signal()
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
