"""The transaction registry: live transactions in memory, the rest in the store.

Starts transactions, finds them for a user (bringing one back from the store, with fresh agent
instances and the history rebuilt from its log, after a restart or an eviction), and lets ended
and idle ones leave memory. Who may see a transaction is decided here, in ``may_see``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.agents.registry import AgentSpec
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import LimitsConfig, SessionConfig, TransactionsConfig
from haip_runtime.conversation.history import history_from_events
from haip_runtime.conversation.members import Member
from haip_runtime.conversation.runs import AgentSlot, RunLimit
from haip_runtime.conversation.shared import Followed, end_lost, follow
from haip_runtime.conversation.transaction import RESERVED_AHEAD, Transaction
from haip_runtime.exceptions import ClusterError, StorageError
from haip_runtime.protocol.codec import DEFAULT_MAX_FRAME_BYTES
from haip_runtime.protocol.events import EventType
from haip_runtime.session.limits import limited
from haip_runtime.store.base import Store, TransactionRecord, TransactionState

if TYPE_CHECKING:
    from haip_runtime.conversation.relay import Relay
    from haip_runtime.protocol.envelope import Event
    from haip_runtime.tools.proxy import ToolProxy

logger = logging.getLogger(__name__)

#: Events read back to rebuild the agents' history of a transaction brought back from the store.
REHYDRATE_EVENTS = 20_000
#: In a cluster, the last events a transaction brought back from the store has delivered again from
#: the bus's log: the store may not hold the newest yet (every node writes in batches).
REDELIVERED = 64
#: How a run left open by a server that stopped without ending it (killed, crashed) ends when its
#: transaction is brought back (``RUN_ERROR NODE_LOST``), and its tool calls.
INTERRUPTED = "the server stopped while this turn went on (it was killed or crashed); send the message again"
CALL_INTERRUPTED = "the server stopped while this call went on; its result, if any, is lost"


class TransactionRegistry:
    def __init__(
        self,
        config: TransactionsConfig,
        agents: Mapping[str, AgentSpec],
        store: Store,
        spawn: Callable[..., object],
        tools: ToolProxy | None = None,
        *,
        limits: LimitsConfig | None = None,
        max_runs: int | None = None,
        max_queued: int | None = None,
        ready: Callable[[Iterable[str]], Awaitable[None]] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.config = config
        self.limits = limits or LimitsConfig()
        self.max_frame_bytes = max_frame_bytes
        defaults = SessionConfig()
        self.run_limit = RunLimit(
            defaults.max_concurrent_runs if max_runs is None else max_runs,
            defaults.max_queued_messages if max_queued is None else max_queued,
        )
        self.agents = agents
        self.store = store
        self.tools = tools
        self.live: dict[str, Transaction] = {}
        #: Transactions whose numbering another process moved (logged once each, at INFO).
        self._renumbered: set[str] = set()
        self._spawn = spawn
        self._ready = ready
        self._loading: dict[str, anyio.Event] = {}
        #: When this process began (ms since the epoch, as events' ``ts``): runs the log shows open that
        #: began before it are no process's now (``_end_interrupted``).
        self._started_ms = int(time.time() * 1000)
        #: Per user with a start under way: one at a time (``starting``).
        self._starting: dict[str, anyio.Lock] = {}
        #: Called with (agent, status) when a run ends (the runtime's metrics).
        self.on_run_end: Callable[[str, str], None] | None = None
        #: Called with every transaction made (new, or brought back from the store).
        self.on_new: Callable[[Transaction], None] | None = None
        #: In a cluster (``[cluster]``): every transaction here is shared through the bus.
        self.relay: Relay | None = None

    def __len__(self) -> int:
        return len(self.live)

    def new(
        self, owner: str, thread_id: str | None, id: str | None = None, *, floor: int | None = None, **state: Any
    ) -> Transaction:
        """A transaction: a new one (``floor`` None), or one brought back from the store with what it
        knew (``state``) and, in a cluster, the last tseq the store holds (``floor``)."""
        if floor is None and "tseq" not in state:  # a new one: its first record reserves its first numbers
            state["reserved"] = RESERVED_AHEAD
        transaction = Transaction(
            owner=owner,
            thread_id=thread_id,
            spawn=self._spawn,
            tools=self.tools,
            store=self.store,
            config=self.config,
            limits=self.limits,
            run_limit=self.run_limit,
            ready=self._ready,
            id=id,
            max_frame_bytes=self.max_frame_bytes,
            **state,
        )
        transaction.on_run_end = self.on_run_end
        if self.relay is not None:
            self.relay.attach(transaction, new=floor is None, floor=floor or 0)
        if self.on_new is not None:
            self.on_new(transaction)
        return transaction

    @asynccontextmanager
    async def starting(self, user: str) -> AsyncIterator[None]:
        """One start of ``user``'s at a time, from the quota's count to the new transaction in ``live``:
        the room one start makes is not taken by another meanwhile."""
        lock = self._starting.setdefault(user, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._starting.pop(user, None)

    async def room_for(self, user: str, related_id: str, *, passed: Collection[str] = ()) -> str | None:
        """Before ``user`` starts another transaction (``limits.transactions_per_user``), within ``starting``:
        ``None`` while they own fewer open ones than the limit (idle ones that left memory count: the store
        knows those); at the limit, the one to end first (``hub.lifecycle.room_made`` ends it), as a new
        session replaces the oldest disconnected one: the least recently active one with nobody in it and
        nothing running (``passed``: found in use since). ``RATE_LIMITED`` if there is none."""
        limit = self.limits.transactions_per_user
        try:
            stored = await self.store.open_owned(user, limit=limit + len(self.live))  # the least recently active first
        except StorageError as error:  # (an operator's find: "could not read this" did not say a start failed)
            refused = StorageError(
                f"a new conversation cannot start now: your open ones are counted in the store, which failed"
                f" ({error.message})"
            )
            refused.related_id = related_id
            raise refused from error
        live = {t.id: t for t in self.live.values() if t.owner == user}  # newer than the store, and read after it
        owned = [tx for tx in stored if tx not in live or not live[tx].ended]
        owned += [tx for tx, t in live.items() if not t.ended and tx not in stored]
        if len(owned) < limit:
            return None
        for tx in owned:  # (the ones only in memory are the newest: last)
            if tx not in passed and await self._idle(tx, live.get(tx)):
                return tx
        raise limited(
            f"you already have {len(owned)} open transactions, and none can end to make room: each has someone "
            "in it (connected, or able to resume) or a run under way",
            "transactions_per_user",
            related_id,
        )

    async def _idle(self, transaction_id: str, transaction: Transaction | None) -> bool:
        """Whether nobody is in ``transaction_id`` and nothing runs in it (``transaction``: it is in memory here)."""
        if transaction is not None:
            return self.vacant(transaction)
        if self.relay is not None:  # no node runs its turns: none hosts it, so nobody is in it anywhere
            try:
                return not await self.relay.runs_anywhere(transaction_id)
            except ClusterError:
                return False  # not known now: left alone
        return not self.store.lag  # a store other processes share without a bus: one may hold it, unseen

    @staticmethod
    def vacant(transaction: Transaction) -> bool:
        """Open, with nobody in it and nothing running, here or (in a cluster) on another node as the log
        shows: it may end to make room for its owner's new one."""
        shared = transaction.shared
        elsewhere = shared is not None and bool(
            shared.users_elsewhere or shared.open_runs or shared.waiting_calls or shared.unanswered
        )
        return not transaction.ended and not transaction.members and not transaction.busy and not elsewhere

    def add(self, transaction: Transaction) -> None:
        self.live[transaction.id] = transaction
        transaction.save()

    def slot(self, spec: AgentSpec, transaction_id: str, started_by: str, params: dict[str, Any]) -> AgentSlot:
        instance = spec.create(transaction_id=transaction_id, started_by=started_by, params=params)
        return AgentSlot(spec.name, instance, tuple(spec.config.mcp_servers))

    def get_member(self, transaction_id: str | None, member: Member) -> Transaction | None:
        transaction = self.live.get(transaction_id or "")
        return transaction if transaction is not None and transaction.is_member(member) else None

    @staticmethod
    def may_see(users: Mapping[str, None] | tuple[str, ...], principal: Principal) -> bool:
        return principal.user in users or principal.permissions.join_others

    async def find(self, transaction_id: str, principal: Principal) -> Transaction | TransactionRecord | None:
        """The transaction if ``principal`` may see it: live (brought back if need be), or the
        record of an ended one; ``None`` if there is none they may see."""
        while (loading := self._loading.get(transaction_id)) is not None:
            await loading.wait()
        transaction = self.live.get(transaction_id)
        if transaction is not None:
            return transaction if self.may_see(transaction.users, principal) else None
        record = await self.store.transaction(transaction_id)
        if record is None and self.store.lag:  # just started by another process, perhaps: not yet written
            await anyio.sleep(self.store.lag)
            record = await self.store.transaction(transaction_id)
        if record is None and self.relay is not None:
            record = await self._from_log(transaction_id)
        if record is None or not self.may_see(record.members, principal):
            return None
        if record.state is TransactionState.ENDED:
            return record
        if transaction_id in self.live or transaction_id in self._loading:  # another call brings it back meanwhile
            return await self.find(transaction_id, principal)  # waits for it: one Transaction, hosted once
        self._loading[transaction_id] = anyio.Event()
        try:
            return await self._bring_back(record)
        finally:
            self._loading.pop(transaction_id).set()

    async def _from_log(self, transaction_id: str) -> TransactionRecord | None:
        """A transaction the store does not know and the bus's log does: the node that started it died
        before its store wrote the record. Made again from the log's TRANSACTION_START, and saved; its
        events follow from the log as for any transaction brought back."""
        assert self.relay is not None
        record = await self.relay.record_from_log(transaction_id)
        if record is None:
            return None
        logger.warning(
            "transaction %s: not in the store; made again from the start of its log on the bus (the node that"
            " started it stopped before writing it)",
            transaction_id,
        )
        self.store.save_transaction(record)
        return record

    async def _bring_back(self, record: TransactionRecord) -> Transaction:
        tail = await self.store.events(record.id, after=record.last_tseq, limit=1_000_000)
        last = tail[-1].tseq or record.last_tseq if tail else record.last_tseq
        events = await self.store.tail(record.id, limit=REHYDRATE_EVENTS)  # (by count: numbers may have gaps)
        newest = (tail or events)[-1].tseq or 0 if tail or events else 0  # the newest row the store holds
        floor = max(last, record.last_tseq)  # numbers control entries took count too: never numbered again
        if self.relay is not None:  # the newest come again from the bus (the other nodes' may not be stored yet)
            last = max(0, last - REDELIVERED)
            events = [event for event in events if (event.tseq or 0) <= last]
        elif record.reserved_tseq > last and not self.store.lag:  # (a store no other process writes to)
            logger.warning(  # not put away: the process was killed, and numbers past the stored log may have been seen
                "transaction %s: the runtime that held it stopped without putting it away; its log is stored up to"
                " tseq %d, and numbering goes on after %d, which that runtime may have used",
                record.id,
                last,
                record.reserved_tseq,
            )
            last = record.reserved_tseq
        transaction = self.new(
            record.owner,
            record.thread_id,
            id=record.id,
            floor=floor,
            tseq=last,
            created_at=record.created_at,
            active_at=record.updated_at,
            users=record.members,
            history=history_from_events(events),
        )
        for name in record.agents:
            spec = self.agents.get(name)
            if spec is None and self.relay is not None:  # another node may run it: it stays the transaction's
                logger.warning(
                    "transaction %s: agent %r is not configured on this node; the nodes that run it take this"
                    " conversation's turns (every node of a cluster should run the same agents)",
                    record.id,
                    name,
                )
                transaction.absent_agents.append(name)
                continue
            if spec is None:
                logger.warning("transaction %s: agent %r is no longer configured; it stays out", record.id, name)
                continue
            transaction.add_agent(self.slot(spec, transaction.id, record.owner, {}))
        shared = transaction.shared
        if shared is not None:  # what the log before the redelivered part says: members, open runs, calls
            shared.users_elsewhere.update(record.members)
            for event in events:
                follow(shared, event, transaction.users)
        elif not self.store.lag:  # (a store no other process writes to: one whose runs are ours alone)
            # Its reservation is written before any event of its new stay: killed before the next batch,
            # what members get now is not numbered again (a reviewer's find, for the first batch after).
            transaction.reserve()
            await self.store.flush()
            self._end_interrupted(transaction, events, self._started_ms)
        transaction.remember_sent(events)  # (on every store: a reviewer's find, PostgreSQL's lag left it out)
        self.live[transaction.id] = transaction
        if shared is not None:
            await shared.following()  # what Redis holds of the log is delivered: a join continues from it
            await shared.filled(newest)  # and what it no longer holds (lost in a restart, expired) from the store
        logger.info("transaction %s brought back from the store at tseq %d", transaction.id, transaction.tseq)
        return transaction

    @staticmethod
    def _end_interrupted(transaction: Transaction, events: list[Event], started_ms: int) -> None:
        """Runs its log shows open that began before this process did: nothing runs them any more (the
        server stopped without ending them: killed, or crashed). They end ``NODE_LOST`` now, their
        messages and calls with them (an operator's find: such a turn stayed "streaming" in the history
        for ever). A clean stop ends them ``CANCELLED`` itself; in a cluster the next owner ends them. Only
        with a store no other process writes to (memory, SQLite): on a PostgreSQL that several processes
        share without ``[cluster]``, an open run may be another's, alive (a reviewer's find)."""
        state, begun = Followed(), {}
        for event in events:
            follow(state, event, {})
            if event.type == EventType.RUN_STARTED and event.run_id:
                begun[event.run_id] = int(event.ts) if event.ts.isdecimal() else 0
        for run_id in [run_id for run_id in state.open_runs if begun.get(run_id, 0) < started_ms]:
            logger.warning("transaction %s: run %s was under way when the server stopped; it ends NODE_LOST",
                           transaction.id, run_id)  # fmt: skip
            end_lost(transaction.publish, state, run_id, INTERRUPTED, CALL_INTERRUPTED)

    def sequenced(self, transaction_id: str, published: int, stored: int) -> None:
        """The store's ``on_sequenced``: another process wrote to this transaction in the shared store,
        so its event published as ``published`` is kept as ``stored``; number the next ones after it
        (members here saw this process's numbers; the stored log, which history and rejoin read, is
        the one order)."""
        transaction = self.live.get(transaction_id)
        if transaction is not None and stored > transaction.tseq:
            first = transaction_id not in self._renumbered
            self._renumbered.add(transaction_id)
            logger.log(
                logging.INFO if first else logging.DEBUG,
                "transaction %s: event %d is stored as %d (another process writes to it); numbering on from there",
                transaction_id,
                published,
                stored,
            )
            transaction.tseq = stored

    def forget(self, transaction: Transaction) -> None:
        """It ended: it leaves memory (its log and record stay in the store)."""
        if self.live.get(transaction.id) is transaction:
            del self.live[transaction.id]
            if self.relay is not None:
                self.relay.detach(transaction)
        self._renumbered.discard(transaction.id)

    def idle(self) -> list[Transaction]:
        """Transactions nobody is in and nothing runs in, for longer than ``idle_seconds``."""
        horizon = time.monotonic() - self.config.idle_seconds
        return [
            t
            for t in self.live.values()
            if t.memberless_since is not None and t.memberless_since < horizon and not t.busy
        ]

    def evict(self, transaction: Transaction) -> None:
        transaction.put_away()
        self.forget(transaction)
        logger.info("transaction %s left memory (idle); its log stays in the store", transaction.id)
