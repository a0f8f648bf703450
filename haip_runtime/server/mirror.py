"""Every session's outbound frames also kept in Redis, so that any node can take the session over.

The send path stays synchronous and cheap: ``recorded`` (the session's ``WindowSink``) appends the
frame to the session's pending list, and the first frame of a session since the last flush puts it
in the queue and wakes the flusher. The flusher takes everything queued (what every session recorded
in the same event-loop ticks, and while the previous flush was in flight) and sends it in one
pipeline, one script run per session (``ReplayStreams.mirror``). Flushes run one at a time (a lock),
so a session's frames reach Redis in seq order; a flush that fails is retried with the same frames
(the script skips seqs already kept, so a retry never keeps one twice).

Beside the frames goes what another node needs to take the session over: its user, the event types it
accepts, whether it takes two-frame audio (written when its window is made), and, when they change,
its transactions with the last tseq it was sent in each (``tx``: followed as frames are recorded, so it
matches the frames kept), the client's inbound order (``in``) and the approvals and input requests it
was asked in words and has not answered (``q``: its next MESSAGE answers them, on any node). The
inbound envelope ids go too: the next node's dedup.

A window Redis lost (``LOST``: Redis restarted, or the window expired while the session was quiet) is
made again from this node's own window; a session another node took over (``TAKEN``) is let go.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from haip_runtime.cluster import Bus, Mirrored, WindowUpdate
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import EventType
from haip_runtime.session.session import Session
from haip_runtime.session.signal import Signal

logger = logging.getLogger(__name__)

#: Frames a session may have waiting for Redis (while it does not answer) before they are given up
#: for a new window made from the session's own once Redis is back.
MAX_WAITING = 4096
#: How long inbound ids alone wait for the session's next frame, so both go in one script run: an
#: echo's message and its answer are one run, not two. Ids matter only to the node that takes the
#: session over (its dedup); one not yet flushed when the node dies is the documented cost.
IDS_LINGER = 0.02
#: The first wait before retrying a failed flush; doubled up to a second.
FIRST_RETRY = 0.05


@dataclass(eq=False)
class Mirroring:
    """One session being mirrored: its window's epoch and what waits to be flushed."""

    session: Session
    epoch: str
    #: Make the window anew at the next flush (from every frame waiting).
    fresh: bool
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    #: The last tseq recorded per transaction.
    tseqs: dict[str, int] = field(default_factory=dict)
    #: The hash fields as last written.
    written: dict[str, str] = field(default_factory=dict)
    queued: bool = False
    #: Inbound ids wait (``IDS_LINGER``) for the session's next frame.
    lingering: bool = False
    #: The session's transactions when it was handed to another node (letting it go here takes it out of
    #: them, which is not leaving them): what its last flush writes. ``None``: the session's own, live.
    handed_over: frozenset[str] | None = None
    gone: bool = False
    #: Its window is in Redis, held by this node (made by a flush, or taken over from another node).
    made: bool = False


def wire(text: str, data: bytes | None) -> bytes:
    """A frame as kept in Redis: its envelope's text and, in two-frame mode, a newline and the binary part
    (the JSON text never holds a raw newline)."""
    encoded = text.encode()
    return encoded if data is None else encoded + b"\n" + data


def unwire(kept: bytes) -> tuple[str, bytes | None]:
    text, newline, data = kept.partition(b"\n")
    return text.decode(), data if newline else None


def inbound_field(session: Session) -> str:
    """``in``: ``n:<seq>`` for a numbering client (its last contiguous seq), ``o`` for opaque seqs, ``""`` unknown."""
    numeric, last = session.inbound_state
    return "" if numeric is None else f"n:{last}" if numeric else "o"


def parse_inbound(value: str) -> tuple[bool | None, int]:
    if value.startswith("n:") and value[2:].isdecimal():
        return True, int(value[2:])
    return (False, 0) if value == "o" else (None, 0)


class WindowMirror:
    """The sessions of this node mirrored to their windows in Redis."""

    def __init__(self, bus: Bus, on_taken: Callable[[Session], None]) -> None:
        self._bus = bus
        self._on_taken = on_taken
        self._tracked: dict[str, Mirroring] = {}
        self._queue: list[Mirroring] = []
        #: Sessions whose inbound ids wait for a frame, with when the first of them came.
        self._lingering: deque[tuple[Mirroring, float]] = deque()
        self._deletes: list[str] = []
        self._wake = Signal()
        self._lock = anyio.Lock()
        #: Flushes done, and frames they kept (for /metrics and the benchmark).
        self.flushes = 0
        self.frames = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._tracked

    def made(self, session_id: str) -> bool:
        """Whether the session's window is in Redis, held by this node: another node resuming it finds it."""
        tracked = self._tracked.get(session_id)
        return tracked is not None and tracked.made

    def track(self, session: Session, *, epoch: str | None = None, state: dict[str, str] | None = None) -> None:
        """Mirror ``session`` from now on: a new window with every frame it has (``epoch`` ``None``), or,
        for a session taken over from another node, the window of ``epoch`` continued (``state``: its
        hash fields as that node left them)."""
        fresh = epoch is None
        tracked = Mirroring(session, epoch or secrets.token_hex(8), fresh, made=not fresh)
        if fresh:
            tracked.frames = self._own_frames(session)
        else:
            tracked.written = dict(state or {})
            tracked.tseqs = {tx: int(tseq) for tx, tseq in json.loads(tracked.written.get("tx", "{}")).items()}
        self._tracked[session.id] = tracked
        session.sink = self
        if fresh:  # (a window taken over is in Redis already: the session's next frame is flushed there)
            self._queue_up(tracked)

    def hand_over(self, session: Session) -> None:
        """``session`` goes on at another node: its window keeps the transactions it is in now, which the
        other node rejoins, though letting it go here takes it out of them before its last flush."""
        tracked = self._tracked.get(session.id)
        if tracked is not None:
            tracked.handed_over = frozenset(session.transactions)

    def forget(self, session: Session, *, delete: bool) -> None:
        """Stop mirroring ``session``; with ``delete``, its window goes too (the session is over)."""
        tracked = self._tracked.pop(session.id, None)
        if session.sink is self:
            session.sink = None
        if tracked is not None:
            tracked.gone = True
            if delete:
                self._deletes.append(session.id)
                self._wake.set()

    # --- WindowSink: called in the send path -------------------------------------------------------

    def recorded(self, session: Session, seq: int, text: str, data: bytes | None, event: Event) -> None:
        tracked = self._tracked.get(session.id)
        if tracked is None:
            return
        tracked.frames.append((seq, wire(text, data)))
        transaction = event.transaction
        if transaction is not None:
            tseq = event.tseq
            if tseq is None and event.type == EventType.TRANSACTION_JOIN and isinstance(event.payload, dict):
                told = event.payload.get("tseq")  # a join's reply: the history after it follows
                tseq = int(told) if isinstance(told, str) and told.isdecimal() else None
            if tseq is not None and tseq > tracked.tseqs.get(transaction, 0):
                tracked.tseqs[transaction] = tseq
        if not tracked.queued:
            self._queue_up(tracked)

    def took(self, session: Session, envelope_id: str) -> None:
        tracked = self._tracked.get(session.id)
        if tracked is not None:
            tracked.ids.append(envelope_id)
            if not tracked.queued and not tracked.lingering:
                tracked.lingering = True
                self._lingering.append((tracked, time.monotonic()))
                if len(self._lingering) == 1:
                    self._wake.set()  # the flusher's wait now ends when this one's linger does

    def _queue_up(self, tracked: Mirroring) -> None:
        tracked.queued = True
        self._queue.append(tracked)
        self._wake.set()

    # --- the flusher -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush whenever something waits, until cancelled; retry with backoff while Redis does not answer."""
        delay = FIRST_RETRY
        while True:
            left = self._linger_left()
            if left == math.inf:  # (no cancel scope to build on the way of every flush)
                await self._wake.wait()
            else:
                with anyio.move_on_after(left):
                    await self._wake.wait()
            self._unlinger()
            try:
                await self.flush(lingering=False)
            except ClusterError as error:
                logger.debug("cluster: mirroring sessions' windows failed, retrying: %s", error)
                self._wake.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = FIRST_RETRY

    def _linger_left(self) -> float:
        if not self._lingering:
            return math.inf
        return max(0.0, self._lingering[0][1] + IDS_LINGER - time.monotonic())

    def _unlinger(self, *, everything: bool = False) -> None:
        """Queue the sessions whose ids have waited long enough (the others went with a frame meanwhile)."""
        now = math.inf if everything else time.monotonic()
        while self._lingering and self._lingering[0][1] + IDS_LINGER <= now:
            tracked, _ = self._lingering.popleft()
            tracked.lingering = False
            if tracked.ids and not tracked.queued and not tracked.gone:
                self._queue_up(tracked)

    async def flush(self, *, lingering: bool = True) -> None:
        """Send everything waiting now (``lingering``: inbound ids waiting for a frame too); ``ClusterError``
        (everything stays waiting) if Redis fails."""
        if lingering:
            self._unlinger(everything=True)
        async with self._lock:
            await self._flush_deletes()
            batch, self._queue = [tracked for tracked in self._queue if not tracked.gone], []
            updates = [self._update(tracked) for tracked in batch]
            try:
                results = await self._bus.replay.mirror(updates)
            except ClusterError:
                for tracked, update in zip(batch, updates, strict=True):
                    self._put_back(tracked, update)
                raise
            for tracked, update, result in zip(batch, updates, results, strict=True):
                self._settle(tracked, update, result)

    async def _flush_deletes(self) -> None:
        deletes, self._deletes = self._deletes, []
        for session_id in deletes:
            if session_id not in self._tracked:
                try:
                    await self._bus.replay.delete(session_id)
                except ClusterError:
                    self._deletes.append(session_id)  # (it also expires by itself)
                    raise

    def _update(self, tracked: Mirroring) -> WindowUpdate:
        session = tracked.session
        joined = session.transactions if tracked.handed_over is None else tracked.handed_over
        wanted = {
            "tx": fastjson.dumps({tx: tracked.tseqs.get(tx, 0) for tx in sorted(joined)}),
            "in": inbound_field(session),
            "q": session.questions.kept(),
        }
        if tracked.fresh:
            tracked.written = {}
            wanted |= {
                "user": session.user,
                "accepted": fastjson.dumps(sorted(session.accepted)),
                "binary": "1" if session.binary_frames else "",
            }
        fields = {name: value for name, value in wanted.items() if tracked.written.get(name) != value}
        update = WindowUpdate(session.id, tracked.epoch, tracked.frames, fields, tracked.ids, tracked.fresh)
        tracked.queued, tracked.fresh, tracked.frames, tracked.ids = False, False, [], []
        return update

    def _put_back(self, tracked: Mirroring, update: WindowUpdate) -> None:
        """A failed flush: its frames and ids wait again, before anything recorded since."""
        tracked.frames = update.frames + tracked.frames
        tracked.ids = update.ids + tracked.ids
        tracked.fresh = tracked.fresh or update.fresh
        if len(tracked.frames) > MAX_WAITING:  # made anew from the session's own window once Redis is back
            tracked.fresh, tracked.frames, tracked.ids = True, self._own_frames(tracked.session), []
        if not tracked.queued and not tracked.gone:
            self._queue_up(tracked)

    def _settle(self, tracked: Mirroring, update: WindowUpdate, result: Mirrored) -> None:
        if result is Mirrored.KEPT:
            tracked.written |= update.fields
            tracked.made = True
            self.flushes += 1
            self.frames += len(update.frames)
        elif result is Mirrored.LOST and not tracked.gone:
            logger.info("cluster: the replay window of session %s was lost; making it again", tracked.session.id)
            tracked.fresh, tracked.frames = True, self._own_frames(tracked.session)
            tracked.epoch = secrets.token_hex(8)
            tracked.made = False
            if not tracked.queued:
                self._queue_up(tracked)
        elif result is Mirrored.TAKEN and not tracked.gone:
            logger.info("cluster: session %s was taken over by another node", tracked.session.id)
            self.forget(tracked.session, delete=False)
            self._on_taken(tracked.session)

    @staticmethod
    def _own_frames(session: Session) -> list[tuple[int, bytes]]:
        """Every frame the session's own window holds, as kept in Redis."""
        window = session.window
        frames = (window.get(seq) for seq in range(window.first_seq, window.last_seq + 1))
        return [(frame.seq, wire(str(frame), frame.data)) for frame in frames if frame is not None]
