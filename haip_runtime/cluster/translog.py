"""Each transaction's event log on the bus: one ordered sequence (tseq) allocated in Redis.

``append`` runs one Lua script (Centrifugo's design): it moves the transaction's counter, adds the
events to the transaction's stream with ids made from their tseqs (``<tseq>-0``, capped by
``MAXLEN ~``) and publishes them, in one message, on the transaction's channel. The script runs
atomically, so tseqs are dense, the stream holds them in order, and the channel carries them in the
same order. Nodes read the channel through ``feed.Feed``; ``read`` is how they fill a gap.

An append may be ``solo``: its node follows the channel and delivers its own events at the answer
(``Feed.appended``). Then the publish is left out while that node is the channel's only subscriber:
no other node hosts the transaction, and the one that does would only hear its own events back (the
common case, a conversation whose members are all on one node). The script knows the subscriber is
the appending node by that node's own channel, which only its feed's connection subscribes: the
transaction's channel must have at most one subscriber and the node's exactly one, so a node whose
subscription Redis dropped (not yet seen by the node) has its appends published. A node subscribing
later reads the stream after its subscription is confirmed, as it does for what was published
before it listened. ``PUBSUB NUMSUB`` counts the subscribers of one server: the runtime's Redis is one
server (with replicas, or Sentinel), not a Redis Cluster.

The caller may pass a floor (a transaction loaded from the durable store continues after its stored
last tseq): the counter moves to the floor first if it is behind. The Redis log is a catch-up
buffer, not the durable record: it is trimmed to ``log_max_events`` and vanishes after
``log_idle_seconds`` without appends.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.pipe import Pipe
from haip_runtime.cluster.replies import SHRINK, Arg, stream_rows
from haip_runtime.exceptions import ClusterError

#: KEYS: counter, stream, bytes, ended. ARGV: floor, maxlen, idle ms, channel, the appending node's channel if
#: solo (else ''), most bytes, ended ms (the transaction has ended: '' if not), payload...
#: When the counter is gone but the stream is not, the stream's last id is the floor too.
#: The answer: the first tseq, and 1 if the events were published (0: solo, and nobody else listens).
#: The stream keeps at most ``maxlen`` events (about) and ``most bytes`` (``shrink``: a member sending
#: frames near ``max_frame_bytes`` must not fill Redis for every transaction: a prober's find). Once an
#: append says the transaction ended, the keys go ``ended ms`` after each append, not ``idle ms``: the
#: ``ended`` key remembers it for the appends of nodes that have not seen the end yet.
APPEND = (
    SHRINK
    + """
local cur = redis.call('GET', KEYS[1])
if cur then
  cur = tonumber(cur)
else
  cur = 0
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if last[1] then cur = tonumber(string.match(last[1][1], '^(%d+)')) end
end
local floor = tonumber(ARGV[1])
if cur < floor then cur = floor end
local first = cur + 1
local publish = true
if ARGV[5] ~= '' then
  local listening = redis.call('PUBSUB', 'NUMSUB', ARGV[4], ARGV[5])
  publish = listening[2] > 1 or listening[4] ~= 1
end
local out = {string.format('%d ', first)}
local added = 0
local idle = ARGV[3]
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[7])
  idle = ARGV[7]
else
  local left = redis.call('PTTL', KEYS[4])
  if left > 0 then idle = string.format('%d', left) end
end
for i = 8, #ARGV do
  cur = cur + 1
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], string.format('%d-0', cur), 'd', ARGV[i])
  added = added + #ARGV[i]
  if publish then
    out[#out + 1] = string.format('%d:', #ARGV[i])
    out[#out + 1] = ARGV[i]
  end
end
redis.call('SET', KEYS[1], string.format('%d', cur), 'PX', idle)
redis.call('PEXPIRE', KEYS[2], idle)
local held = redis.call('INCRBY', KEYS[3], added)
if held > tonumber(ARGV[6]) then
  redis.call('SET', KEYS[3], string.format('%d', shrink(KEYS[2], tonumber(ARGV[6]))), 'PX', idle)
else
  redis.call('PEXPIRE', KEYS[3], idle)
end
if publish then
  redis.call('PUBLISH', ARGV[4], table.concat(out))
  return {first, 1}
end
return {first, 0}
"""
)

#: KEYS: counter. ARGV: floor, idle ms. The counter after it (never moved back).
SEED = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then
  cur = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], string.format('%d', cur), 'PX', ARGV[2])
end
return cur
"""


#: How long an ended transaction's log stays in Redis (a node catching up reads the rest from the store).
ENDED_KEEP_SECONDS = 60.0
#: About how many bytes of it stay meanwhile (its newest events): a user starting, filling and ending
#: transactions over and over held their send rate times a minute of Redis (a re-tester's find).
ENDED_KEEP_BYTES = 1024 * 1024


class Appended(NamedTuple):
    """An append's answer: the tseq of its first event, and whether it was published on the channel
    (not: a solo append no other node listened to)."""

    first: int
    published: bool


class LogEntry(NamedTuple):
    """One event of a transaction's log: its tseq and the bytes the appender gave (a tuple: the feed
    makes one per event delivered, and a frozen dataclass costs twice as much to build)."""

    transaction: str
    tseq: int
    data: bytes


@dataclass(frozen=True)
class LogGap:
    """Events ``first``..``last`` are no longer in Redis (trimmed or expired): read them from the durable store."""

    transaction: str
    first: int
    last: int


class TransactionLog:
    """Appends to and reads from the transactions' logs in Redis."""

    def __init__(
        self,
        redis: Redis,
        pipe: Pipe,
        keys: Keyspace,
        health: BusHealth,
        *,
        node: str,
        max_events: int,
        idle_seconds: float,
        max_bytes: int = 16 * 1024 * 1024,
    ):
        self._node_channel = keys.node_channel(node)
        self._max_bytes = max_bytes
        self._redis = redis
        self._pipe = pipe
        self._keys = keys
        self._health = health
        self._max_events = max_events
        self._idle_ms = int(idle_seconds * 1000)
        self._seed = redis.register_script(SEED)

    async def append(self, transaction: str, data: bytes, *, floor: int = 0) -> int:
        """Append one event; its tseq."""
        return await self.append_many(transaction, [data], floor=floor)

    async def append_many(self, transaction: str, payloads: Sequence[bytes], *, floor: int = 0) -> int:
        """Append events in this order, atomically and as one bus message; the tseq of the first.

        A ``ClusterError`` means Redis could not be reached: the events may or may not have been
        appended (a reply lost after the script ran looks the same as a request never sent). The
        appends of every transaction share the bus's ``Pipe``: those issued together leave in one write.
        Two appends reach Redis in the order they were issued only on one connection: a transaction's
        order rests on its callers awaiting each append before the next (the relay's sender, the
        batcher's lock), never on two in flight at once.
        """
        if not payloads:
            raise ValueError("append_many needs at least one event")
        with translating(self._health, f"append to transaction {transaction}"):
            reply = await self._pipe.script(APPEND, *self._script_call(transaction, payloads, floor, solo=False))
        self._health.appended()
        return int(reply[0])

    async def append_batches(
        self,
        calls: Sequence[tuple[str, Sequence[bytes], int]],
        *,
        solo: Container[str] = (),
        ended: Container[str] = (),
    ) -> list[Appended | ClusterError]:
        """``append_many`` for several transactions at once, ``(transaction, payloads, floor)`` each, all in
        one write: each one's answer, or a ``ClusterError`` for that one alone (Redis refused it, or
        the connection was lost before its answer: it may or may not have run, as with ``append_many``);
        those answered before a loss are appended. ``ClusterError`` raised if Redis could not be reached.
        ``solo``: the transactions whose events the caller delivers itself at the answer, as
        ``Feed.solo`` allows (their publish is left out while nobody else listens). ``ended``: those that
        have ended, whose log goes ``ENDED_KEEP_SECONDS`` after this append rather than ``idle_seconds``
        (a prober's find: ending transactions and starting new ones kept a day of large logs per user)."""
        scripted = [
            self._script_call(transaction, payloads, floor, solo=transaction in solo, ended=transaction in ended)
            for transaction, payloads, floor in calls
        ]
        with translating(self._health, f"append to {len(calls)} transaction(s)"):
            replies = await self._pipe.script_replies(APPEND, scripted)
        results: list[Appended | ClusterError] = []
        errors: list[BaseException] = []
        for (transaction, _, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):  # refused (read-only, out of memory...), or not answered
                errors.append(reply)
                results.append(
                    ClusterError(f"redis: append to transaction {transaction} failed: {reply or type(reply).__name__}")
                )
            else:
                results.append(Appended(int(reply[0]), bool(reply[1])))
        lost = [error for error in errors if not isinstance(error, ResponseError)]
        if lost:
            self._health.failed(lost[0])
        elif errors and len(errors) == len(replies) and all(refusing(error) for error in errors):
            self._health.refused(errors[0])  # Redis refuses every append: unavailable until one goes through
        else:
            self._health.appended()
            if errors:  # one transaction's refusal among appends: said, until the next command answers
                self._health.failed(errors[0])
        return results

    def _script_call(
        self, transaction: str, payloads: Sequence[bytes], floor: int, *, solo: bool, ended: bool = False
    ) -> tuple[list[Arg], list[Arg]]:
        """The APPEND script's keys and arguments for ``payloads`` appended to ``transaction``."""
        keys: list[Arg] = [
            self._keys.sequence(transaction),
            self._keys.log(transaction),
            self._keys.log_bytes(transaction),
            self._keys.log_ended(transaction),
        ]
        channel = self._keys.channel(transaction)
        solo_channel = self._node_channel if solo else ""
        ended_ms = min(int(ENDED_KEEP_SECONDS * 1000), self._idle_ms) if ended else ""  # (never longer than a live one)
        most = min(self._max_bytes, ENDED_KEEP_BYTES) if ended else self._max_bytes
        args: list[Arg] = [floor, self._max_events, self._idle_ms, channel, solo_channel, most, ended_ms]
        return keys, [*args, *payloads]

    async def seed(self, transaction: str, floor: int) -> int:
        """Make the counter at least ``floor`` (a transaction loaded from the store); the counter now."""
        with translating(self._health, f"seed transaction {transaction}"):
            return int(await self._seed(keys=[self._keys.sequence(transaction)], args=[floor, self._idle_ms]))

    async def last_tseq(self, transaction: str) -> int:
        """The latest tseq allocated (0: none, or the counter expired)."""
        with translating(self._health, f"read the counter of {transaction}"):
            value = await self._redis.get(self._keys.sequence(transaction))
        return int(value) if value is not None else 0

    async def read(self, transaction: str, after: int, *, limit: int = 1000) -> list[LogEntry]:
        """Up to ``limit`` events with tseq > ``after`` that Redis still holds, in tseq order."""
        with translating(self._health, f"read transaction {transaction}"):
            rows = stream_rows(
                await self._redis.xrange(self._keys.log(transaction), f"{after + 1}-0", "+", count=limit)
            )
        return [LogEntry(transaction, int(entry_id.split(b"-")[0]), fields[b"d"]) for entry_id, fields in rows]


#: What Redis answers when it refuses writes for everyone, not for one transaction's own reason.
REFUSING = ("OOM", "READONLY", "NOPERM", "MISCONF")


def refusing(error: BaseException) -> bool:
    """Whether ``error`` is Redis refusing writes as a whole (out of memory, a replica, an ACL, a failed save)."""
    return str(error).startswith(REFUSING)


def parse_message(transaction: str, message: bytes) -> list[LogEntry]:
    """The events of one published message: ``<first tseq> `` then each payload as ``<length>:<bytes>``."""
    head, _, body = message.partition(b" ")
    tseq, entries, at = int(head), [], 0
    while at < len(body):
        colon = body.index(b":", at)
        end = colon + 1 + int(body[at:colon])
        entries.append(LogEntry(transaction, tseq, body[colon + 1 : end]))
        tseq, at = tseq + 1, end
    return entries
