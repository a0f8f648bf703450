"""Leases: one holder at a time for a name (a transaction's runs), for as long as it keeps renewing.

``acquire`` sets the lease only if nobody holds it and returns a token that starts with a fencing
number (it grows with every acquisition of the name, so a store can refuse a late write of an
older holder). ``renew`` and ``release`` compare the token and extend or delete in one script, so a
holder whose lease expired and went to another can neither extend nor delete the new one.

``hold`` and ``keep`` keep leases alive, all of a node's together: they enter the lease in one
registry, and one loop (``run``, a task of the bus) renews it a third of its time to live after its
last renewal (or its acquisition), at the latest. A lease entered while the loop waits is renewed
in its next round (early, never late), and each round renews every lease due within the next sixth
of its TTL too, so the leases stay in step and one write on the bus's pipe renews them all: a
node's renewals cost one round trip per third of the TTL, however many transactions it holds (the
renewal script still touches only its own lease's key; leases of different TTLs each keep theirs).
A lease is lost, ``lost`` set, when a renewal says another holder has it, or when it was not
renewed before it would have run out by this node's clock (its last successful renewal's send time
plus the TTL): Redis unreachable, or one lease's renewal failing alone. Until then a failed renewal
is tried again soon; a round waiting on a Redis that hangs is given up when the first lease's time
runs out. The holder must stop what a lost lease guarded.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from haip_runtime.cluster.health import BusHealth, translating
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.pipe import Pipe
from haip_runtime.cluster.replies import Arg, text
from haip_runtime.exceptions import ClusterError

logger = logging.getLogger("haip_runtime.cluster")

#: KEYS: lease, fence. ARGV: holder, ttl ms. The token, or nil if held.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local token = string.format('%d', redis.call('INCR', KEYS[2])) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return {1, token}
"""
#: KEYS: lease. ARGV: token, ttl ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
#: KEYS: wanted. ARGV: node. Deleted if it is this node's.
UNWANT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: What ends the token of a holder that can do only part of a lease's work (``acquire(partial=True)``).
PARTIAL = "~partial"
#: KEYS: lease. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: The first wait before renewing again while Redis cannot be reached; it doubles up to ``MAX_RETRY``.
FIRST_RETRY = 0.05
MAX_RETRY = 1.0


@dataclass
class HeldLease:
    """A lease kept alive by ``Leases.hold``."""

    name: str
    token: str
    #: Set when the lease is no longer this holder's (stop the guarded work).
    lost: anyio.Event = field(default_factory=anyio.Event)

    @property
    def fence(self) -> int:
        """Grows with each acquisition of the name: a later holder has a larger one."""
        return int(self.token.split(":", 1)[0])


@dataclass(eq=False)
class _Kept:
    """A lease in the renewal loop's registry (times by this node's clock, ``anyio.current_time``)."""

    lease: HeldLease
    ttl: float
    #: When it may have run out: the last successful renewal's (or the acquisition's) send time + ``ttl``.
    deadline: float
    on_lost: Callable[[HeldLease], None] | None
    #: When to renew it at the latest: a third of ``ttl`` after the last renewal, sooner after a failure.
    due: float = 0.0

    def __post_init__(self) -> None:
        self.due = self.deadline - self.ttl * 2 / 3


#: Error replies that say Redis itself cannot serve now, not that one lease's key is wrong.
NOT_SERVING = frozenset({"LOADING", "READONLY", "BUSY", "MISCONF", "OOM", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN"})


def _refusal(replies: list[object]) -> ResponseError | None:
    """The first of ``replies`` that says Redis serves nobody now, if any."""
    for reply in replies:
        if isinstance(reply, ResponseError) and str(reply).split(" ", 1)[0] in NOT_SERVING:
            return reply
    return None


class Leases:
    """Acquire, renew and release leases; keep this node's leases renewed, together (``run``)."""

    def __init__(self, redis: Redis, pipe: Pipe, keys: Keyspace, health: BusHealth, *, node: str, ttl_seconds: float):
        self._redis = redis
        #: Where the renewal loop writes every due lease's renewal at once.
        self._pipe = pipe
        self._keys = keys
        self._health = health
        self._node = node
        self._ttl = ttl_seconds
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._unwant = redis.register_script(UNWANT)
        #: The leases ``hold`` and ``keep`` keep alive: the loop renews them.
        self._kept: set[_Kept] = set()
        self._running = False
        #: When the loop wakes next, and what wakes it sooner (a lease due before then).
        self._wake_at = math.inf
        self._woken = anyio.Event()
        #: The renewal round in flight: it ends when the first kept lease may have run out.
        self._round: anyio.CancelScope | None = None
        self._retry = FIRST_RETRY
        #: Leases kept when Redis was lost (``doubt``), not renewed since, by name (with the doubt's number):
        #: whether they are still this node's is not known (a Redis restarted without its data lost them).
        self._doubted: dict[str, int] = {}
        self._doubts = 0
        #: Called with a lease's name once a renewal begun after the doubt says it is still this node's.
        self.on_confirmed: list[Callable[[str], None]] = []

    @property
    def held(self) -> int:
        """Leases this node keeps renewed."""
        return len(self._kept)

    #: What ends the token of a holder that can do only part of a lease's work.
    PARTIAL = PARTIAL

    async def acquire(self, name: str, ttl: float | None = None) -> str | None:
        """The token of a new lease on ``name``, or ``None`` if someone holds it."""
        return (await self.acquire_or_holder(name, ttl))[0]

    async def acquire_or_holder(
        self, name: str, ttl: float | None = None, *, partial: bool = False
    ) -> tuple[str | None, str]:
        """(the token of a new lease on ``name``, '') or, if someone holds it, (``None``, its token).
        ``partial``: this node can do only part of the lease's work (its token ends with ``PARTIAL``)."""
        holder = f"{self._node}:{secrets.token_hex(6)}{PARTIAL if partial else ''}"
        keys = [self._keys.lease(name), self._keys.fence(name)]
        with translating(self._health, f"acquire lease {name}"):
            got, token = await self._acquire(keys=keys, args=[holder, self._ms(ttl)])
        return (text(token), "") if got else (None, text(token) or "")

    async def renew(self, name: str, token: str, ttl: float | None = None) -> bool:
        """Extend the lease if ``token`` still holds it."""
        with translating(self._health, f"renew lease {name}"):
            return bool(await self._renew(keys=[self._keys.lease(name)], args=[token, self._ms(ttl)]))

    async def release(self, name: str, token: str) -> bool:
        """Give the lease up if ``token`` still holds it (another holder's lease is left alone)."""
        with translating(self._health, f"release lease {name}"):
            return bool(await self._release(keys=[self._keys.lease(name)], args=[token]))

    async def left(self, name: str) -> float:
        """Seconds until the lease on ``name`` runs out unless renewed (0: nobody holds it)."""
        with translating(self._health, f"read lease {name}"):
            return max(int(await self._redis.pttl(self._keys.lease(name))), 0) / 1000

    async def wait_acquire(self, name: str, ttl: float | None = None) -> str:
        """Acquire ``name``, waiting while another holds it: the next try is when its lease would expire.

        How the next turn of a dead owner's transaction lands elsewhere. Bound it with ``anyio.fail_after``.
        """
        while True:
            token = await self.acquire(name, ttl)
            if token is not None:
                return token
            with translating(self._health, f"read lease {name}"):
                left_ms = int(await self._redis.pttl(self._keys.lease(name)))
            await anyio.sleep(max(left_ms, 1) / 1000)

    async def want(self, name: str, ttl: float | None = None) -> None:
        """Say this node waits for ``name`` and could do all of its work, for twice the lease's time: a
        ``partial`` holder gives the lease back (``wanted``). Said again at each wait, taken back by
        ``unwant`` when this node stops waiting."""
        with translating(self._health, f"want lease {name}"):
            await self._redis.set(self._keys.wanted(name), self._node, px=2 * self._ms(ttl))

    async def unwant(self, name: str) -> None:
        """This node no longer waits for ``name`` (it has it, or left): its ``want`` is taken back, not
        another node's."""
        with translating(self._health, f"want lease {name}"):
            await self._unwant(keys=[self._keys.wanted(name)], args=[self._node])

    async def wanted(self, name: str) -> str | None:
        """The node that waits for ``name`` and could do all its work (``want``), if one does."""
        with translating(self._health, f"read lease {name}"):
            return text(await self._redis.get(self._keys.wanted(name)))

    async def holder(self, name: str) -> str | None:
        """The token holding ``name`` now, if any."""
        with translating(self._health, f"read lease {name}"):
            return text(await self._redis.get(self._keys.lease(name)))

    @asynccontextmanager
    async def hold(
        self, name: str, ttl: float | None = None, *, on_lost: Callable[[HeldLease], None] | None = None
    ) -> AsyncIterator[HeldLease | None]:
        """Acquire ``name`` and keep it renewed inside the block (``None``: someone else holds it).

        Released when the block ends (if still held). ``lease.lost`` is set, and ``on_lost`` called,
        when it stops being this holder's.
        """
        self._check_running()  # before acquiring: a lease nobody would renew is not taken
        ttl = ttl if ttl is not None else self._ttl
        sent = anyio.current_time()
        token = await self.acquire(name, ttl)
        if token is None:
            yield None
            return
        lease = HeldLease(name, token)
        kept = self._enter(_Kept(lease, ttl, sent + ttl, on_lost))
        try:
            yield lease
        finally:
            self._forget(kept)
            if not lease.lost.is_set():
                with anyio.move_on_after(2, shield=True):
                    try:
                        await self.release(name, token)
                    except ClusterError:
                        pass  # it expires by itself

    async def keep(self, name: str, token: str, ttl: float | None = None) -> None:
        """Keep the lease ``token`` holds renewed; return once it is lost (taken over, or Redis not
        reached before it would have run out by this node's clock). Cancel to stop renewing it."""
        ttl = ttl if ttl is not None else self._ttl
        lease = HeldLease(name, token)
        kept = self._enter(_Kept(lease, ttl, anyio.current_time() + ttl, None))
        try:
            await lease.lost.wait()
        finally:
            self._forget(kept)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew the kept leases as they fall due, together (the bus runs this for as long as it is
        entered). When it stops, the leases it still kept are lost: nobody renews them any more."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._until_due()
                await self._renew_due()
        finally:
            self._running = False
            for kept in list(self._kept):
                self._lose(kept)

    def doubt(self) -> None:
        """Redis was lost (the feed's connection dropped): until a renewal of every kept lease, started
        after now, succeeds, none is sure to be this node's still. They are all renewed at once."""
        self._doubts += 1
        now = anyio.current_time()
        for kept in self._kept:
            self._doubted[kept.lease.name] = self._doubts
            kept.due = min(kept.due, now)
        self._woken.set()

    def doubting(self, name: str) -> bool:
        """Whether lease ``name`` is kept here but not renewed since Redis was lost (``doubt``)."""
        return name in self._doubted

    def _confirmed(self, name: str) -> None:
        del self._doubted[name]
        for callback in list(self.on_confirmed):
            try:
                callback(name)
            except Exception:
                logger.exception("lease %s: a callback on its renewal failed", name)

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeError("leases are kept only while the bus runs (enter it first)")

    def _enter(self, kept: _Kept) -> _Kept:
        self._check_running()  # (a bus leaving while ``hold`` acquired: the lease runs out by itself)
        self._kept.add(kept)
        if kept.due < self._wake_at:  # due before the loop would wake: wake it
            self._woken.set()
        elif self._wake_at > -math.inf:  # renewed early, in the loop's next round: one write keeps renewing all
            kept.due = self._wake_at
        if self._round is not None and kept.deadline < self._round.deadline:
            self._round.deadline = kept.deadline
        return kept

    async def _until_due(self) -> None:
        """Until the first kept lease is due (or one entered meanwhile is due sooner)."""
        self._wake_at = min((kept.due for kept in self._kept), default=math.inf)
        delay = self._wake_at - anyio.current_time()
        if delay > 0:
            self._woken = anyio.Event()
            with anyio.move_on_after(delay):
                await self._woken.wait()
        self._wake_at = -math.inf  # until it sleeps again, nothing needs to wake it

    async def _renew_due(self) -> None:
        """Renew every lease due within a sixth of its TTL, in one write; lose those whose time ran out."""
        now, doubts = anyio.current_time(), self._doubts
        self._lose_all([kept for kept in self._kept if kept.deadline <= now], "not renewed in time")
        due = [kept for kept in self._kept if kept.due - kept.ttl / 6 <= now]
        if not due:
            return
        calls: list[tuple[list[Arg], list[Arg]]] = [
            ([self._keys.lease(kept.lease.name)], [kept.lease.token, self._ms(kept.ttl)]) for kept in due
        ]
        replies: list[object] | None = None
        with anyio.CancelScope(deadline=min(kept.deadline for kept in self._kept)) as self._round:
            try:
                with translating(self._health, f"renew {len(due)} lease(s)"):
                    replies = await self._pipe.scripts(RENEW, calls, settle=True)
            except ClusterError as error:  # (said once a streak: each retry said it again, a tester counted 12)
                (logger.warning if self._retry == FIRST_RETRY else logger.debug)("%s; trying again", error)
        self._round = None
        refused = _refusal(replies or [])
        if refused is not None:  # Redis answers but serves nobody now (loading, a replica, out of memory...)
            self._health.failed(refused)
            logger.warning("renewing %d lease(s) failed: %s; trying again", len(due), refused)
            replies = None
        if replies is None:  # Redis not reached (or not before a lease's time ran out): soon again
            retry, self._retry = self._retry, min(self._retry * 2, MAX_RETRY)
            for kept in due:
                kept.due = min(now + min(retry, kept.ttl / 3), kept.deadline)
            return
        self._retry = FIRST_RETRY
        taken: list[_Kept] = []
        for kept, reply in zip(due, replies, strict=True):
            if kept not in self._kept:  # no longer kept (``keep`` cancelled, the block left): nothing to do
                continue
            if isinstance(reply, ResponseError):  # this lease's alone: try again until its time runs out
                logger.warning("renewing lease %s failed: %s", kept.lease.name, reply)
                kept.due = min(now + kept.ttl / 3, kept.deadline)
            elif reply:
                kept.deadline = now + kept.ttl
                kept.due = now + kept.ttl / 3
                if self._doubted.get(kept.lease.name, doubts + 1) <= doubts:  # renewed since the doubt began
                    self._confirmed(kept.lease.name)
            else:  # another holder has it (or Redis lost it)
                taken.append(kept)
        self._lose_all(taken, "another holder has them, or redis lost them")

    def _forget(self, kept: _Kept) -> None:
        """``kept`` is no longer renewed (lost, or let go): no longer in doubt either."""
        self._kept.discard(kept)
        if not any(other.lease.name == kept.lease.name for other in self._kept):
            self._doubted.pop(kept.lease.name, None)

    def _lose_all(self, lost: list[_Kept], why: str) -> None:
        """Lose ``lost``, said in one line (a Redis restarted without its data loses every lease a node
        holds: a line each was a screenful per restart)."""
        if lost:
            names = ", ".join(kept.lease.name for kept in lost[:3]) + (", ..." if len(lost) > 3 else "")
            logger.warning("%d lease(s) lost (%s): %s", len(lost), why, names)
        for kept in lost:
            self._lose(kept)

    def _lose(self, kept: _Kept) -> None:
        self._forget(kept)
        logger.debug("lease %s lost", kept.lease.name)
        kept.lease.lost.set()
        if kept.on_lost is not None:
            try:
                kept.on_lost(kept.lease)
            except Exception:  # one holder's callback must not stop the others' renewals
                logger.exception("lease %s: on_lost failed", kept.lease.name)

    def _ms(self, ttl: float | None) -> int:
        return max(1, int((ttl if ttl is not None else self._ttl) * 1000))
