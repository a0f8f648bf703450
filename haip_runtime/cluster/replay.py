"""Sessions' replay windows in Redis, so a client whose node died resumes on any other.

Each session has a stream of its outbound envelopes (each with its session ``seq``) and a small
hash beside it: the session's ``epoch`` and the last seq appended. The epoch is made when the
session starts; every append checks it (in the same script), so a window that Redis lost (a restart
without persistence, an expiry) is noticed by the next append and by a resume, never taken for an
empty window. Windows keep at most ``max_events`` envelopes and none older than ``max_age_seconds``
(exact trimming: they are small), and vanish ``max_age_seconds`` after their last append or at
``delete``. Times are Redis's clock (``TIME``), so nodes' clocks need not agree.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

from redis.asyncio import Redis

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.replies import Arg, fields, stream_rows, text

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

PAGE = 500


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


@dataclass(frozen=True)
class ReplayRead:
    outcome: ReplayOutcome
    #: (seq, envelope) after the asked seq, in order; empty unless ``OK``.
    envelopes: list[tuple[int, bytes]] = field(default_factory=list)
    #: The session's last seq in the window (0 when unknown).
    last: int = 0


class ReplayStreams:
    """Append, read and delete sessions' replay windows."""

    def __init__(self, redis: Redis, keys: Keyspace, health: BusHealth, *, max_events: int, max_age_seconds: float):
        self._redis = redis
        self._keys = keys
        self._health = health
        self._max_events = max_events
        self._max_age_ms = int(max_age_seconds * 1000)
        self._append = redis.register_script(APPEND)
        self._start = redis.register_script(START)

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
        """Every envelope after seq ``after``, once and in order, if the window of ``epoch`` holds them all."""
        with translating(self._health, f"read the replay window of {session}"):
            meta = fields(await self._redis.hgetall(self._keys.replay_meta(session)))
            if b"epoch" not in meta:
                return ReplayRead(ReplayOutcome.UNKNOWN)
            last = int(meta.get(b"last", b"0"))
            if meta[b"epoch"].decode() != epoch:
                return ReplayRead(ReplayOutcome.RESTARTED, last=last)
            if after > last:
                return ReplayRead(ReplayOutcome.AHEAD, last=last)
            newest_first = await self._newest_after(session, after)
        envelopes = newest_first[::-1]
        first_missing = after + 1
        if after < last and (not envelopes or envelopes[0][0] != first_missing):
            return ReplayRead(ReplayOutcome.TOO_OLD, last=last)
        return ReplayRead(ReplayOutcome.OK, envelopes, last)

    async def delete(self, session: str) -> None:
        """The session closed: its window goes."""
        with translating(self._health, f"delete the replay window of {session}"):
            await self._redis.delete(*self._names(session))

    async def _newest_after(self, session: str, after: int) -> list[tuple[int, bytes]]:
        """Read backwards from the newest until seq ``after`` (or the oldest kept): cost follows what was missed."""
        found: list[tuple[int, bytes]] = []
        high = b"+"
        while True:
            rows = stream_rows(await self._redis.xrevrange(self._keys.replay(session), high, "-", count=PAGE))
            for _, entry in rows:
                seq = int(entry[b"s"])
                if seq <= after:
                    return found
                found.append((seq, entry[b"d"]))
            if len(rows) < PAGE:
                return found
            high = b"(" + rows[-1][0]

    def _names(self, session: str) -> list[str]:
        return [self._keys.replay_meta(session), self._keys.replay(session)]
