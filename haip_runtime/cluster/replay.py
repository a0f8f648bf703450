"""Sessions' replay windows in Redis, so a client whose node died resumes on any other.

Each session has a stream of its outbound envelopes (each with its session ``seq``) and a small
hash beside it: the session's ``epoch`` and the last seq appended. The epoch is made when the
session starts; every append checks it (in the same script), so a window that Redis lost (a restart
without persistence, an expiry) is noticed by the next append and by a resume, never taken for an
empty window. Windows keep at most ``max_events`` envelopes and none older than ``max_age_seconds``
(exact trimming: they are small), and vanish ``max_age_seconds`` after their last append or at
``delete``. Times are Redis's clock (``TIME``), so nodes' clocks need not agree.

What a running node uses is ``mirror``: one script run per session per flush, all of them in one
pipeline, carrying the session's new envelopes, the inbound envelope ids it took (kept in a capped
list beside the window: the next node's dedup) and what another node needs to take the session
over (``user``, ``accepted``, ``tx``: the transactions it is in with the last tseq it was sent,
``in``: the client's last contiguous seq). The hash's ``node`` says which node holds the session:
``claim`` moves it in one step, after which the old holder's ``mirror`` is refused (``TAKEN``), so
two nodes never both keep (and deliver) one session. What a resume on another node uses is
``take_over``: the claim (which first asks a holder still listening to let the session go) and the
read of what the client missed, in two round trips on the pipe.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.pipe import Pipe
from haip_runtime.cluster.replies import SHRINK, Arg, text

#: KEYS: meta, stream. ARGV: epoch, seq, envelope, max events, max age ms.
#: 1 appended; 0 the epoch is not the session's (its window was lost or replaced); -1 seq not after the last.
APPEND = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if tonumber(ARGV[2]) <= last then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 's', ARGV[2], 'd', ARGV[3])
redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', now - tonumber(ARGV[5])))
redis.call('HSET', KEYS[1], 'last', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

#: KEYS: meta, stream. ARGV: epoch, max age ms. A new window: the old one (if any) is gone.
START = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'last', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: KEYS: meta, stream, ids. ARGV: node, epoch, fresh (1: make the window), max events, max age ms, max ids,
#: field count, id count, max bytes, then field/value pairs, ids, seq/envelope pairs. The window keeps at
#: most ``max bytes`` (``shrink``; the meta's ``bytes`` is its running total) as one node's window does.
#: 1 kept; 0 the window of this epoch is gone; -1 another node holds the session now (a window made anew
#: too: a node cut off from Redis while the client resumed elsewhere must not take the session back).
#: Envelopes not after the last kept are skipped.
MIRROR = (
    SHRINK
    + """
local age = tonumber(ARGV[5])
local fresh = ARGV[3] == '1'
local last = 0
local hset = {}
if fresh then
  local holder = redis.call('HGET', KEYS[1], 'node')
  if holder and holder ~= ARGV[1] then return -1 end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  hset = {'epoch', ARGV[2], 'node', ARGV[1]}
else
  local meta = redis.call('HMGET', KEYS[1], 'epoch', 'node', 'last')
  if meta[1] ~= ARGV[2] then return 0 end
  if meta[2] ~= ARGV[1] then return -1 end
  last = tonumber(meta[3] or '0')
end
local i = 10
for _ = 1, tonumber(ARGV[7]) do
  hset[#hset + 1] = ARGV[i]
  hset[#hset + 1] = ARGV[i + 1]
  i = i + 2
end
local ids = tonumber(ARGV[8])
if ids > 0 then
  local stop = i + ids - 1
  while i <= stop do
    local upto = math.min(i + 999, stop)
    redis.call('LPUSH', KEYS[3], unpack(ARGV, i, upto))
    i = upto + 1
  end
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
  redis.call('PEXPIRE', KEYS[3], age)
end
local kept = last
local added = 0
while i < #ARGV do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 's', ARGV[i], 'd', ARGV[i + 1])
    last = seq
    added = added + #ARGV[i] + #ARGV[i + 1]
  end
  i = i + 2
end
if last > kept then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', now - age))
  redis.call('PEXPIRE', KEYS[2], age)
  local held = redis.call('HINCRBY', KEYS[1], 'bytes', added)
  if held > tonumber(ARGV[9]) then
    hset[#hset + 1] = 'bytes'
    hset[#hset + 1] = shrink(KEYS[2], tonumber(ARGV[9]))
  end
end
if last > kept or fresh then
  hset[#hset + 1] = 'last'
  hset[#hset + 1] = last
end
if #hset > 0 then redis.call('HSET', KEYS[1], unpack(hset)) end
redis.call('PEXPIRE', KEYS[1], age)
return 1
"""
)

#: KEYS: meta, ids. ARGV: node, user, the prefix of nodes' channels, the release notice, force.
#: {0} no window; {1} another user's; {3} another node holds the session and listens: it was sent the notice
#: (to let the session go) and nothing moved (claim again with force once it has); {2, the node that held
#: it, meta, ids}: taken by the node (the old holder's mirroring is refused from now on).
CLAIM = """
local user = redis.call('HGET', KEYS[1], 'user')
if not user or not redis.call('HGET', KEYS[1], 'epoch') then return {0} end
if user ~= ARGV[2] then return {1} end
local holder = redis.call('HGET', KEYS[1], 'node')
if ARGV[5] ~= '1' and holder and holder ~= ARGV[1] then
  if redis.call('PUBLISH', ARGV[3] .. holder, ARGV[4]) > 0 then return {3} end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
return {2, holder or '', redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

#: KEYS: meta, stream. ARGV: epoch, after, page. {outcome, last, then seq, envelope... newest first}:
#: outcome 0 no window, 1 another epoch, 2 ahead, 3 read (from the newest down to the first after ``after``).
READ_AFTER = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {0, 0} end
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if epoch ~= ARGV[1] then return {1, last} end
local after = tonumber(ARGV[2])
if after > last then return {2, last} end
local out = {3, last}
local page = tonumber(ARGV[3])
local high = '+'
while true do
  local rows = redis.call('XREVRANGE', KEYS[2], high, '-', 'COUNT', page)
  for _, row in ipairs(rows) do
    local entry = row[2]
    if tonumber(entry[2]) <= after then return out end
    out[#out + 1] = entry[2]
    out[#out + 1] = entry[4]
  end
  if #rows < page then return out end
  high = '(' .. rows[#rows][1]
end
"""

PAGE = 500
#: Inbound envelope ids kept per session for the next node's dedup (as many as a node remembers itself).
MAX_IDS = 1024


class ReplayOutcome(enum.StrEnum):
    """What a resume learns from the window (the same reasons as ``haip_resumes_total``)."""

    OK = "ok"
    #: No window for this session (never started, expired, deleted, or Redis lost it all).
    UNKNOWN = "unknown"
    #: The window belongs to another epoch: the history the client knew is gone.
    RESTARTED = "restarted"
    #: The client claims a seq the session never sent.
    AHEAD = "ahead"
    #: Envelopes after the client's seq have been trimmed away.
    TOO_OLD = "too_old"


#: ``READ_AFTER``'s first number.
READ_OUTCOMES = (ReplayOutcome.UNKNOWN, ReplayOutcome.RESTARTED, ReplayOutcome.AHEAD, ReplayOutcome.OK)


class Mirrored(enum.IntEnum):
    """What became of one session's part of a ``mirror`` flush."""

    KEPT = 1
    #: The window of that epoch is gone (Redis lost it, or it expired): make a new one.
    LOST = 0
    #: Another node took the session over: this node must let it go.
    TAKEN = -1


@dataclass
class WindowUpdate:
    """One session's part of a ``mirror`` flush."""

    session: str
    epoch: str
    #: (seq, envelope), seqs growing.
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    #: Hash fields to set beside the window (what another node needs to take the session over).
    fields: dict[str, str] = field(default_factory=dict)
    #: Inbound envelope ids the session took since the last flush.
    ids: list[str] = field(default_factory=list)
    #: Make the window (dropping whatever was there): the session is new, or its window was lost.
    fresh: bool = False


@dataclass(frozen=True)
class Claimed:
    """A session taken over by this node: its hash fields and the inbound ids it took lately."""

    fields: dict[str, str]
    ids: list[str]
    #: The node that held the session until then ("" if none was named).
    holder: str = ""

    @property
    def epoch(self) -> str:
        return self.fields["epoch"]


@dataclass(frozen=True)
class ReplayRead:
    outcome: ReplayOutcome
    #: (seq, envelope) after the asked seq, in order; empty unless ``OK``.
    envelopes: list[tuple[int, bytes]] = field(default_factory=list)
    #: The session's last seq in the window (0 when unknown).
    last: int = 0


class Taken(enum.Enum):
    """Why ``take_over`` took nothing."""

    #: No window for this session (never started, expired, deleted, or Redis lost it all).
    UNKNOWN = "unknown"
    #: The window is another user's (the caller says nothing of it).
    OTHER_USER = "other_user"
    #: Another node holds the session and listens: it was asked to let the session go; take it over
    #: again with ``force`` once it has (or has had the time to).
    ASKED = "asked"


#: How long a new SSE stream's node is noted for its first POSTs (the session has a window soon after).
STREAM_SECONDS = 120.0


class ReplayStreams:
    """Append, read and delete sessions' replay windows."""

    def __init__(
        self,
        redis: Redis,
        pipe: Pipe,
        keys: Keyspace,
        health: BusHealth,
        *,
        max_events: int,
        max_age_seconds: float,
        max_bytes: int = 8 * 1024 * 1024,
        node: str = "",
    ):
        self._redis = redis
        self._max_bytes = max_bytes
        self._pipe = pipe
        self._node = node
        self._keys = keys
        self._health = health
        self._max_events = max_events
        self._max_age_ms = int(max_age_seconds * 1000)
        self._append = redis.register_script(APPEND)
        self._start = redis.register_script(START)
        self._read = redis.register_script(READ_AFTER)

    async def start(self, session: str) -> str:
        """Begin a new window for ``session`` (dropping any old one); its new epoch."""
        epoch = secrets.token_hex(8)
        with translating(self._health, f"start the replay window of {session}"):
            await self._start(keys=self._names(session), args=[epoch, self._max_age_ms])
        return epoch

    async def append(self, session: str, epoch: str, seq: int, envelope: bytes | str) -> bool:
        """Keep an outbound envelope; ``False`` when the window of ``epoch`` is gone (start a new one).

        Seqs must grow: an envelope not after the last one kept is refused with ``ValueError``.
        """
        args: list[Arg] = [epoch, seq, envelope, self._max_events, self._max_age_ms]
        with translating(self._health, f"append to the replay window of {session}"):
            done = int(await self._append(keys=self._names(session), args=args))
        if done < 0:
            raise ValueError(f"session {session}: seq {seq} is not after the last one kept")
        return done == 1

    async def epoch(self, session: str) -> str | None:
        with translating(self._health, f"read the replay window of {session}"):
            return text(await self._redis.hget(self._keys.replay_meta(session), "epoch"))

    async def read_after(self, session: str, epoch: str, after: int) -> ReplayRead:
        """Every envelope after seq ``after``, once and in order, if the window of ``epoch`` holds them all.

        One script run reads the hash and the stream together, backwards from the newest until seq
        ``after`` (so the cost follows what was missed), and answers a flat list: parsing a stream
        reply entry by entry in Python was most of a takeover's time."""
        with translating(self._health, f"read the replay window of {session}"):
            reply = await self._read(keys=self._names(session), args=[epoch, after, PAGE])
        outcome, last = READ_OUTCOMES[int(reply[0])], int(reply[1])
        if outcome is not ReplayOutcome.OK:
            return ReplayRead(outcome, last=last)
        flat = reply[2:]
        envelopes = [(int(seq), data) for seq, data in zip(flat[-2::-2], flat[::-2], strict=True)]
        if after < last and (not envelopes or envelopes[0][0] != after + 1):
            return ReplayRead(ReplayOutcome.TOO_OLD, last=last)
        return ReplayRead(ReplayOutcome.OK, envelopes, last)

    async def delete(self, session: str) -> None:
        """The session closed: its window goes."""
        with translating(self._health, f"delete the replay window of {session}"):
            await self._redis.delete(*self._all_names(session))

    async def mirror(self, updates: list[WindowUpdate]) -> list[Mirrored]:
        """Keep several sessions' new envelopes and state: one script run per session, written together
        on the bus's pipe (every envelope a session sends comes here: the hot path)."""
        if not updates:
            return []
        calls = [(self._all_names(update.session), self._mirror_args(update)) for update in updates]
        with translating(self._health, f"mirror {len(updates)} replay window(s)"):
            replies = await self._pipe.scripts(MIRROR, calls)
        return [Mirrored(int(reply)) for reply in replies]

    def _mirror_args(self, update: WindowUpdate) -> list[Arg]:
        args: list[Arg] = [self._node, update.epoch, int(update.fresh), self._max_events, self._max_age_ms, MAX_IDS]
        args += [len(update.fields), len(update.ids), self._max_bytes]
        for name, value in update.fields.items():
            args += [name, value]
        args += update.ids
        for seq, envelope in update.frames:
            args += [seq, envelope]
        return args

    async def stream_opened(self, session: str, user: str, ttl_seconds: float = STREAM_SECONDS) -> None:
        """An SSE stream of ``user`` opened here for the new ``session``: the POSTs that follow (its
        ``HAI`` first, before the session has a window) may land on another node, which looks here."""
        with translating(self._health, f"note the stream of {session}"):
            await self._redis.set(self._keys.stream(session), f"{self._node}\n{user}", px=int(ttl_seconds * 1000))

    async def stream_holder(self, session: str) -> tuple[str, str] | None:
        """(node, user) of a new SSE stream noted by ``stream_opened``; ``None`` if none (or expired)."""
        with translating(self._health, f"find the stream of {session}"):
            value = text(await self._redis.get(self._keys.stream(session)))
        node, _, user = (value or "").partition("\n")
        return (node, user) if node and user else None

    async def holder(self, session: str) -> tuple[str, str] | None:
        """(node, user) of the node holding ``session`` and its user; ``None`` if it has no window."""
        with translating(self._health, f"find the node of {session}"):
            node, user = await self._redis.hmget(self._keys.replay_meta(session), ["node", "user"])
        node_name, user_name = text(node), text(user)
        return (node_name, user_name) if node_name is not None and user_name is not None else None

    async def claim(self, session: str, user: str) -> Claimed | None:
        """Take ``user``'s ``session`` over for this node (its old node's mirroring is refused from now
        on), whichever node holds it; ``None`` if there is no such window, or it is another user's (the
        caller says neither)."""
        with translating(self._health, f"take over {session}"):
            taken = await self._take(session, user, force=True)
        return taken if isinstance(taken, Claimed) else None

    async def take_over(
        self, session: str, user: str, after: int, *, force: bool = False
    ) -> tuple[Claimed, ReplayRead] | Taken:
        """A resume's look at ``user``'s window, on the pipe: unless ``force``, if another node holds the
        session and still listens, it is sent ``release <session> <this node> <after>`` and nothing moves
        (``Taken.ASKED``: that node answers ``released <session>``, or ``kept <session> <reason>`` when it
        holds the session and a resume after ``after`` would fail there); otherwise the session is claimed
        for this node (as ``claim``: the old holder's mirroring is refused from then on) and its window
        read after seq ``after``, as ``read_after`` reads it. The read may say it cannot resume (``AHEAD``,
        ``TOO_OLD``...): the session is claimed even so."""
        with translating(self._health, f"take over {session}"):
            taken = await self._take(session, user, force, after)
            if isinstance(taken, Taken):
                return taken
            return taken, await self._read_claimed(session, taken, after)

    async def _take(self, session: str, user: str, force: bool, after: int = 0) -> Claimed | Taken:
        keys = [self._keys.replay_meta(session), self._keys.replay_ids(session)]
        asked = f"release {session} {self._node} {after}"  # (a node before ``after`` was sent ignored what follows)
        args: list[Arg] = [self._node, user, self._keys.node_channel(""), asked, int(force)]
        reply = await self._pipe.script(CLAIM, keys, args)
        kind = int(reply[0])
        if kind != 2:
            return Taken.ASKED if kind == 3 else Taken.OTHER_USER if kind == 1 else Taken.UNKNOWN
        flat = [item.decode() for item in reply[2]]
        ids = [item.decode() for item in reply[3]][::-1]
        return Claimed(dict(zip(flat[::2], flat[1::2], strict=True)), ids, reply[1].decode())

    async def _read_claimed(self, session: str, claimed: Claimed, after: int) -> ReplayRead:
        """The window just claimed, read after seq ``after``: its newest ``last - after`` entries, by plain
        ``XREVRANGE`` (a script handing them over costs Redis about five times as much: each entry made a
        Lua table and back), then its epoch read again behind them on the same connection. Claimed, the
        window takes no other node's frames; the same epoch afterwards says nothing made it anew or deleted
        it in between (an epoch is never made twice), so the entries read are that window's."""
        last = int(claimed.fields.get("last") or 0)
        if after > last:
            return ReplayRead(ReplayOutcome.AHEAD, last=last)
        stream, meta = self._keys.replay(session), self._keys.replay_meta(session)
        rows: list[Any] = []
        high, count = "+", last - after
        epoch: str | None = claimed.epoch
        while count > 0:  # (more than one page only if the window's seqs had a gap: they never do)
            page, now = await self._pipe.calls(
                ("XREVRANGE", stream, high, "-", "COUNT", count), ("HGET", meta, "epoch")
            )
            rows, epoch = rows + page, text(now)
            if len(page) < count or int(page[-1][1][1]) <= after + 1:
                break
            high, count = b"(" + page[-1][0], PAGE
        if epoch != claimed.epoch:
            return ReplayRead(ReplayOutcome.UNKNOWN if epoch is None else ReplayOutcome.RESTARTED, last=last)
        envelopes = [(seq, fields[3]) for _, fields in reversed(rows) if (seq := int(fields[1])) > after]
        if after < last and (not envelopes or envelopes[0][0] != after + 1):
            return ReplayRead(ReplayOutcome.TOO_OLD, last=last)
        return ReplayRead(ReplayOutcome.OK, envelopes, last)

    def _names(self, session: str) -> list[str]:
        return [self._keys.replay_meta(session), self._keys.replay(session)]

    def _all_names(self, session: str) -> list[str]:
        return [*self._names(session), self._keys.replay_ids(session)]
