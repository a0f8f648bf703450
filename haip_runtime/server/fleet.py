"""This runtime as one node of a cluster (``[cluster]``): the bus, and per-user limits over every node.

``Fleet`` owns the ``Bus`` for the runtime's lifetime (the hub shares its conversations through it:
``conversation/relay.py``) and:

- counts each user's sessions in the bus's quota slots (``SharedSlots`` of the session registry):
  a slot is claimed when a session is admitted and released when it is dropped; the bus's heartbeat
  keeps it alive, so a dead node's sessions stop counting within ``slot_ttl_seconds``, and a node
  that stops cleanly releases its slots at once;
- shares each user's message rate out over the live nodes (``UserQuotas.share``), re-read every
  ``heartbeat_seconds``, so no inbound envelope waits on Redis.

**Fail-open.** When Redis cannot be asked (down, or slower than ``CLAIM_TIMEOUT``) a new session is
admitted on the per-process limit alone, logged, and recorded in Redis once it answers again (then
it counts, even past the limit: new sessions wait until the user is back under it). Why not refuse:
a quota store's outage would otherwise stop every new session of every user, while what it guards
against (one user holding more than their share) stays bounded by ``sessions_per_user`` per node.
``/health`` is ``degraded`` meanwhile. The message rate keeps the last node count it read.

Redis is only imported once a ``Fleet`` is entered, so a runtime without ``[cluster]`` never needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Self

import anyio

from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.exceptions import ClusterError
from haip_runtime.observability.metrics import gauge
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.session.registry import SessionRegistry

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from haip_runtime.cluster import Bus
    from haip_runtime.conversation.relay import Relay

logger = logging.getLogger(__name__)

#: The quota kind the sessions' slots are counted under.
SESSIONS = "sessions"
#: How long a handshake waits for Redis to count its session before it is admitted without (fail-open).
CLAIM_TIMEOUT = 1.0
#: The limit a session admitted during an outage is recorded under: it is already admitted.
ALREADY_ADMITTED = 2**31 - 1


class Fleet:
    """The runtime's membership of the cluster, entered for its lifetime (after the store, before the hub)."""

    def __init__(self, config: ClusterConfig, sessions: SessionRegistry, agents: Sequence[str] = ()) -> None:
        self.config = config
        #: This node's agents (told to the other nodes: a conversation's turns go where all its agents are).
        self.agents = tuple(agents)
        self.sessions = sessions
        self.bus: Bus | None = None
        #: The conversations this node shares (set by the runtime once the hub runs).
        self.relay: Relay | None = None
        #: (user, session) whose slot this node holds in Redis.
        self.claimed: set[tuple[str, str]] = set()
        #: (user, session) admitted while Redis could not be asked: recorded once it answers.
        self.unrecorded: set[tuple[str, str]] = set()
        self._releases: list[tuple[str, str]] = []
        self._released = anyio.Event()
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        from haip_runtime.cluster import Bus  # redis is an optional extra: only a cluster needs it

        async with AsyncExitStack() as stack:
            self.bus = await stack.enter_async_context(Bus(self.config, self.agents))
            stack.push_async_callback(self._release_all)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            await self._count_nodes()
            await self._read_epoch()
            tg.start_soon(self._upkeep)
            tg.start_soon(self._drain_releases)
            self.sessions.slots = self
            stack.callback(setattr, self.sessions, "slots", None)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._stack.aclose()

    def _live_bus(self) -> Bus:
        assert self.bus is not None, "the fleet is used only while entered"
        return self.bus

    # --- SharedSlots -------------------------------------------------------------------------------

    async def claim(self, user: str, holder: str, limit: int) -> bool:
        """Take one of ``user``'s session slots; fail-open (``True``, recorded later) if Redis cannot say."""
        quotas = self._live_bus().quotas
        try:
            await self._release_pending(user)
            with anyio.fail_after(CLAIM_TIMEOUT):
                taken = await quotas.acquire_slot(user, SESSIONS, holder, limit)
        except (ClusterError, TimeoutError) as error:
            logger.warning("cluster: admitting a session of %r without counting it cluster-wide: %s", user, error)
            self.unrecorded.add((user, holder))
            return True
        if taken:
            self.claimed.add((user, holder))
        return taken

    def release(self, user: str, holder: str) -> None:
        """Queue the slot's release (the caller, a session being dropped, does not wait for Redis)."""
        self.unrecorded.discard((user, holder))
        if (user, holder) in self.claimed:
            self.claimed.discard((user, holder))
            self._releases.append((user, holder))
            self._released.set()

    def handed_over(self, user: str, holder: str) -> None:
        """The session went on at another node, which holds its slot under the same id from now on: this
        node stops counting and refreshing it, and does not release it (the other node's drop does)."""
        self.unrecorded.discard((user, holder))
        self.claimed.discard((user, holder))
        self._live_bus().quotas.let_go(user, SESSIONS, holder)

    async def release_now(self, user: str, holder: str) -> None:
        """``release``, done before it returns (another node waits to take the room it makes)."""
        self.release(user, holder)
        await self._release_pending(user)

    async def holders(self, user: str) -> list[str]:
        """The sessions holding ``user``'s slots on every node (``ClusterError`` if Redis cannot say)."""
        return await self._live_bus().quotas.holders(user, SESSIONS)

    async def _release_pending(self, user: str) -> None:
        """Release ``user``'s queued slots now: a claim right after a drop must see the room it made."""
        mine = [item for item in self._releases if item[0] == user]
        self._releases = [item for item in self._releases if item[0] != user]
        for _, holder in mine:
            await self._release_one(user, holder)

    async def _release_one(self, user: str, holder: str) -> None:
        try:
            await self._live_bus().quotas.release_slot(user, SESSIONS, holder)
        except ClusterError as error:  # no longer refreshed: it expires within slot_ttl_seconds
            logger.info("cluster: session slot of %r left to expire: %s", user, error)

    async def _drain_releases(self) -> None:
        while True:
            await self._released.wait()
            self._released = anyio.Event()
            while self._releases:
                user, holder = self._releases.pop(0)
                await self._release_one(user, holder)

    async def _release_all(self) -> None:
        """Leaving cleanly: this node's sessions end with it, so their slots are freed at once."""
        held = [*self._releases, *self.claimed]
        self._releases.clear()
        self.claimed.clear()
        with anyio.move_on_after(2, shield=True):
            for user, holder in held:
                await self._release_one(user, holder)

    # --- upkeep ------------------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        """Every heartbeat: re-read the live nodes (the rate's share) and record sessions admitted blind."""
        while True:
            await anyio.sleep(self.config.heartbeat_seconds)
            try:
                await self._count_nodes()
                await self._read_epoch()
                await self._record_unrecorded()
            except ClusterError:
                continue  # the health says so; the next beat tries again

    async def _read_epoch(self) -> None:
        """The runtime's epoch is the cluster's: the same on every node, so a session resumed on another
        node is seen as resumed; new only when Redis lost what it held (the sessions' windows with it)."""
        epoch = await self._live_bus().nodes.epoch()
        if epoch != self.sessions.epoch:
            logger.info("cluster: epoch %s", epoch)
            self.sessions.epoch = epoch

    async def _count_nodes(self) -> None:
        self.sessions.quotas.share(len(await self._live_bus().nodes.live()))

    async def _record_unrecorded(self) -> None:
        quotas = self._live_bus().quotas
        for user, holder in sorted(self.unrecorded):
            await quotas.acquire_slot(user, SESSIONS, holder, ALREADY_ADMITTED)
            if (user, holder) in self.unrecorded:  # not dropped meanwhile
                self.unrecorded.discard((user, holder))
                self.claimed.add((user, holder))
            else:
                await quotas.release_slot(user, SESSIONS, holder)

    # --- health and metrics ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For ``/health``: the bus's health, this node, the nodes sharing the rate, slots held."""
        bus = self.bus
        if bus is None:
            return {"state": "starting"}
        return {
            **bus.health.public(),
            "subscribed": bus.feed.connected,
            "node": bus.node_id,
            "nodes": self.sessions.quotas.nodes,
            "sessionSlots": len(self.claimed),
            "unrecordedSessions": len(self.unrecorded),
            "transactions": self.hosted(),
        }

    async def watch(self, quiet: float = 1.0) -> None:
        """Tell the members here when Redis stops answering for longer than ``quiet`` seconds (nothing
        crosses between nodes, and what is said waits) and when it answers again."""
        from haip_runtime.cluster.health import BusState  # imports redis: only with [cluster]

        assert self.bus is not None
        health = self.bus.health
        while True:
            await health.wait_for(BusState.UNAVAILABLE)
            with anyio.move_on_after(quiet):
                await health.wait_for(BusState.OK)
                continue  # a blip
            message = f"the cluster's Redis is unavailable ({health.error}); what is said waits, in order"
            self._tell(Event(EventType.ERROR, error_body(ErrorCode.STORAGE_UNAVAILABLE, message)))
            await health.wait_for(BusState.OK)
            self._tell(Event(EventType.INFO, {"event": "cluster", "state": "ok"}))

    def _tell(self, event: Event) -> None:
        for shared in list(self.relay.logs) if self.relay is not None else []:
            for member in list(shared.transaction.members.values()):
                member.deliver(event.with_changes(transaction=shared.transaction.id))

    def hosted(self) -> dict[str, int]:
        """Transactions this node hosts, those whose turns run here, and events waiting for Redis."""
        logs = list(self.relay.logs) if self.relay is not None else []
        waiting = sum(shared.waiting for shared in logs)
        return {"hosted": len(logs), "runsHere": sum(1 for shared in logs if shared.owner), "waiting": waiting}

    @property
    def up(self) -> bool:
        return self.bus is not None and self.bus.health.state.value == "ok"

    def metrics(self) -> Iterable[Metric]:
        yield gauge("haip_cluster_up", "1 while the cluster's Redis answers, 0 while it does not.", float(self.up))
        nodes = self.sessions.quotas.nodes
        yield gauge("haip_cluster_nodes", "Live nodes the users' message rates are shared out over.", nodes)
        yield gauge("haip_cluster_session_slots", "Session slots this node holds in Redis.", len(self.claimed))
        counts = self.hosted()
        yield gauge(
            "haip_cluster_transactions", "Transactions this node hosts (follows on the bus).", counts.get("hosted", 0)
        )
        yield gauge(
            "haip_cluster_runs_here", "Hosted transactions whose turns run on this node.", counts.get("runsHere", 0)
        )
        yield gauge(
            "haip_cluster_events_waiting", "Events published here, not yet appended to Redis.", counts.get("waiting", 0)
        )
