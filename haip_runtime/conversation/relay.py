"""Transactions shared by the nodes of a cluster (``[cluster]``): one log in Redis, one runner.

Each node with a member in a transaction hosts it, and its ``SharedLog`` changes three things
(docs/cluster.md, "Conversations across nodes", says what each guarantees):

- **publishing** appends to the transaction's log on the bus, in order, from one sender per
  transaction (Redis hands out the ``tseq``; streamed parts are batched);
- **delivery** comes only from the bus's feed, in tseq order on every node alike (one order for every
  member; a node's own appends at their answer, in their place), and each hosting node writes what
  it delivers to the store;
- **runs** have one owner, the holder of the lease ``run:<transaction>``: messages, answers, cancels
  and ends from members elsewhere reach it through the log; when it dies, the next holder ends its
  runs with ``RUN_ERROR NODE_LOST``, rebuilds the agents' history and answers what waits.

Nothing here imports ``redis``: the bus is given, and only its methods are called.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.conversation.members import describe
from haip_runtime.conversation.sender import Pending, Queued, Sender, pass_once
from haip_runtime.conversation.shared import entry, entry_event, follow, wrote
from haip_runtime.conversation.succession import MAX_RETRY, Succession
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import EventType
from haip_runtime.session.flow import merged_parts, same_message
from haip_runtime.session.signal import Signal
from haip_runtime.store.base import TransactionRecord, TransactionState

if TYPE_CHECKING:
    from haip_runtime.cluster import Bus
    from haip_runtime.conversation.members import Member
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.store.base import Store

logger = logging.getLogger(__name__)

#: Event ids remembered per transaction to drop an append that landed twice (a retry after a lost answer):
#: more than one append holds (``sender.APPEND_MOST``), with room for other nodes' events between the two.
SEEN_IDS = 4096
#: Published events waiting for Redis, per transaction, before the oldest are given up (logged).
MAX_OUTBOX = 10_000
#: How long a transaction brought back waits to follow its log before a member joins it.
FOLLOW_SECONDS = 5.0
#: Entries of a log read to make again a transaction's record its starting node never stored (``Relay.seed``).
SEED_READ = 1000
#: A streamed part published here and not delivered after this long is not waited for by
#: the stream's back-pressure (Redis lost it, or is failing: the bus's health says so).
PACE_GIVE_UP = 1.0


class Relay:
    """This node's side of the cluster's transactions: makes each one's ``SharedLog``."""

    def __init__(self, bus: Bus, store: Store, spawn: Callable[..., object]) -> None:
        self.bus = bus
        self.node = bus.node_id
        self.store = store
        self.spawn = spawn
        #: Called (in the event loop) when a member elsewhere asks to end a transaction this node runs.
        self.on_end_asked: Callable[[Transaction, str], None] | None = None
        #: Called when a transaction another node ended is delivered here as ended.
        self.on_ended: Callable[[Transaction], None] | None = None
        #: Called when another node announces a change of an MCP server the transaction uses.
        self.on_tools_changed: Callable[[Transaction], None] | None = None
        #: Called with (transaction, member description, agent) when a member elsewhere adds an agent here.
        self.on_add_agent: Callable[[Transaction, dict[str, Any], str], None] | None = None
        #: Called with the agents a transaction's log lists, when some are not here yet.
        self.on_agents: Callable[[Transaction, list[str]], None] | None = None
        #: Called with (transaction, run or message id, user) when a member elsewhere asks this node, which
        #: speaks the transaction's answers, to stop speaking one (its text written already).
        self.on_silence: Callable[[Transaction, str, str], object] | None = None
        #: The transactions this node hosts.
        self.logs: set[SharedLog] = set()
        #: Appends what they publish (one task for them all, started with the first).
        self.sender = Sender(bus)
        self._sending = False
        bus.leases.on_confirmed.append(self._confirmed)

    def _confirmed(self, lease: str) -> None:
        """A lease this node keeps was renewed after Redis was lost: its transaction answers what waited."""
        for shared in list(self.logs):
            if shared.lease_name == lease:
                shared.confirmed()

    def attach(self, transaction: Transaction, *, new: bool, floor: int = 0) -> None:
        """Host ``transaction`` here: its events come from the feed from now on, its lease is contended.

        ``new``: started on this node just now, so its turns run here at once (the lease is taken
        behind: no other node can know the transaction yet). Else it comes from the store, and the
        feed delivers the log after ``transaction.tseq``; ``floor``: the last tseq the store knows,
        under which Redis must not number (its counter may be gone: restarted, or idle too long).
        """
        shared = SharedLog(self, transaction, owner=new, floor=floor)
        transaction.shared = shared
        self.logs.add(shared)
        if not self._sending:
            self.spawn(self.sender.run)
            self._sending = True
        self.spawn(shared.run)

    async def record_from_log(self, transaction_id: str) -> TransactionRecord | None:
        """The record of ``transaction_id`` as it began (its TRANSACTION_START's ``SharedLog._seed`` on the
        bus's log) with the members who joined since, as far as ``SEED_READ`` entries go, if Redis still
        holds it; ``None`` otherwise (Redis not answering included)."""
        try:
            entries = await self.bus.log.read(transaction_id, 0, limit=SEED_READ)
        except ClusterError:
            return None
        if not entries or entries[0].tseq != 1:
            return None
        bodies = [fastjson.loads(entry.data) for entry in entries]
        start = bodies[0] if isinstance(bodies[0], dict) else {}
        seed = start.get("seed") if start.get("type") == EventType.TRANSACTION_START else None
        if not isinstance(seed, dict) or not isinstance(seed.get("owner"), str):
            return None
        joined = [
            str(body["payload"]["joined"])
            for body in bodies[1:]
            if isinstance(body, dict)
            and body.get("type") == EventType.TRANSACTION_JOIN
            and isinstance(body.get("payload"), dict)
            and body["payload"].get("joined")
        ]
        owner, thread_id = seed["owner"], seed.get("thread_id")
        return TransactionRecord(
            id=transaction_id,
            owner=owner,
            agents=tuple(str(agent) for agent in seed.get("agents") or ()),
            members=tuple(dict.fromkeys([owner, *joined])),
            state=TransactionState.OPEN,
            created_at=float(seed.get("created_at") or time.time()),
            updated_at=time.time(),
            thread_id=thread_id if isinstance(thread_id, str) else None,
        )

    async def runs_anywhere(self, transaction_id: str) -> bool:
        """Whether a node runs the transaction's turns now (holds its lease): every node hosting it
        contends, and one hosts it while someone is in it there, or was until ``idle_seconds`` ago.
        ``ClusterError`` if Redis does not answer."""
        return await self.bus.leases.holder(f"run:{transaction_id}") is not None

    def detach(self, transaction: Transaction) -> None:
        """It left this node's memory: stop following it (what it still had to send is sent first)."""
        if transaction.shared is not None:
            transaction.shared.stop()

    async def close(self, timeout: float = 2.0) -> None:
        """The node is stopping: send what every transaction still has queued, give the leases back."""
        logs = list(self.logs)
        for shared in logs:
            shared.stop()
        with anyio.move_on_after(timeout, shield=True):
            for shared in logs:
                await shared.done.wait()


class SharedLog(Succession):
    """One transaction's log on the bus, from this node: publishing, delivery, and who runs its turns."""

    def __init__(self, relay: Relay, transaction: Transaction, *, owner: bool, floor: int = 0) -> None:
        self.relay = relay
        self.bus, self.store, self.node = relay.bus, relay.store, relay.node
        self.floor = floor
        self.transaction = transaction
        self.lease_name = f"run:{transaction.id}"
        self.owner = owner
        #: How long the turns may take to move to another node (an end asked meanwhile waits for it).
        self.handover = relay.bus.config.lease_seconds
        self._handing = self._wanting = False
        #: Runs the log shows started and not ended, by run id (their agent): ``NODE_LOST`` on takeover.
        self.open_runs: dict[str, str] = {}
        #: The message each of those runs answers (a ``RUN_CANCEL`` from here may name the run by it).
        self.answering: dict[str, str] = {}
        #: Messages no run has answered yet, with who sent them (a takeover answers them).
        self.unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()
        #: Messages from members elsewhere this node answered as the owner, until the log shows their run
        #: started (or refused): given back to ``unanswered`` if the lease is lost before.
        self.answered_here: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()
        #: Calls the log shows waiting for a member's answer, with their run (an answer from here is forwarded).
        self.waiting_calls: dict[str, str | None] = {}
        self.asked: dict[str, tuple[str, dict[str, Any] | None]] = {}
        #: Calls the log shows made and not done, with their run (a run ended ``NODE_LOST`` ends them too).
        self.open_calls: dict[str, str | None] = {}
        #: Streamed messages the log shows started and not ended, with their run (a lost run's end them).
        self.open_messages: dict[str, str] = {}
        #: Users the log shows joined (members on other nodes), for the member lists sent from here.
        self.users_elsewhere: set[str] = set()
        self.end_asked: str | None = None
        #: Events waiting to be appended, in order (the relay's sender takes them).
        self._outbox = Pending()
        #: A read of the store's last tseq under way (``floor_known``): the sender leaves this one out.
        self.reading_floor = False
        #: Set once ``run`` has ended: nothing published after it is sent.
        self._left = False
        #: Runs this node stopped when it lost the lease: what they still publish is not appended.
        self._given_up: set[str] = set()
        #: Events published here and not delivered yet, with the turn they ask for.
        self._mine: dict[str, tuple[Event, dict[str, Any] | None]] = {}
        #: Streamed parts published here, (when, event id), oldest first, the delivered ones taken out
        #: lazily: how far the stream is ahead of its members here (``pace``).
        self._parts_out: deque[tuple[float, str]] = deque()
        self._behind_limit = relay.bus.config.stream_behind_ms / 1000
        #: Set at each delivery of this node's own events (a stream held back by ``pace`` goes on).
        self._back = anyio.Event()
        self._own_head = fastjson.dumps({"n": relay.node, "id": ""})[:-2].encode()  # b'{"n":"<node>","id":"'
        self._then: dict[str, Callable[[], None]] = {}
        self._reconnects = relay.bus.feed.reconnects
        #: Set at each delivery (a takeover waits to have caught up).
        self._progress = anyio.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        #: Set when the transaction stops here or its outbox empties while it stops (``run`` may end).
        self._wake = Signal()
        #: Set when the log says the lease's holder gave it back.
        self._lease_free = anyio.Event()
        #: Set once the feed follows the log (and has delivered what Redis held of it).
        self._following = anyio.Event()
        #: While events are read from the store (``_fill``): what the feed delivers meanwhile, held.
        self._filling: list[Any] | None = None
        #: Set when the fill under way ends (a new one, a new event).
        self._fill_ended = anyio.Event()
        self._stopped = False
        self._scope = anyio.CancelScope()
        #: Set when it has stopped following the log here.
        self.done = anyio.Event()

    @property
    def waiting(self) -> int:
        """Events published here and not yet appended to the log."""
        return len(self._outbox)

    @property
    def outbox(self) -> Pending:
        return self._outbox

    async def following(self) -> None:
        """Until the feed follows the log and has delivered what Redis held (at most ``FOLLOW_SECONDS``)."""
        with anyio.move_on_after(FOLLOW_SECONDS):
            await self._following.wait()

    # --- publishing ---------------------------------------------------------------------------------

    def send(self, event: Event, turn: dict[str, Any] | None = None, then: Callable[[], None] | None = None) -> None:
        """Queue ``event`` for the log (its tseq comes with its delivery); ``turn``: who sent a message the
        agents answer; ``then``: called once it is delivered here."""
        if event.run_id is not None and event.run_id in self._given_up:
            return  # a run this node stopped when it lost the lease: the new owner ended it (NODE_LOST)
        self._mine[event.id] = (event, turn)
        if event.type == EventType.MESSAGE_PART and self._behind_limit:
            self._parts_out.append((time.monotonic(), event.id))
        if then is not None:
            self._then[event.id] = then
        if len(self._mine) > MAX_OUTBOX:  # never delivered (lost with a Redis that crashed): let them go
            self._then.pop(next(iter(self._mine)), None)
            del self._mine[next(iter(self._mine))]
        seed = self._seed() if event.type == EventType.TRANSACTION_START else None
        self._queue(entry(event, self.relay.node, turn, seed), event.type == EventType.MESSAGE_PART, event.run_id)

    def _seed(self) -> dict[str, Any]:
        """What the transaction's record begins with, in its TRANSACTION_START's entry: if this node dies
        before its store has written the record (it writes in batches), the next node makes it from the
        log (``Relay.record_from_log``) instead of losing the transaction (found by a tester: a node killed 0.1 s
        after a start)."""
        record = self.transaction.record()
        return {
            "owner": record.owner,
            "agents": list(record.agents),
            "created_at": record.created_at,
            "thread_id": record.thread_id,
        }

    def pace(self) -> Awaitable[None] | None:
        """Back-pressure for a streaming agent (``TurnServices.pace``): ``None`` while this node's own
        streamed parts are back from the bus within ``stream_behind_ms``, else what to wait for.

        On one node an agent's write delivers the part before the next, so a node short of CPU slows the
        stream; here delivery waits for the append on the bus, and without this a starved node would fall
        ever further behind the stream (the lag its backlog). A part on its way longer than
        ``PACE_GIVE_UP`` is not waited for, nor anything while Redis does not answer."""
        if not self._pacing() or self._behind(time.monotonic()) <= self._behind_limit:
            return None
        return self._catch_up()

    def _pacing(self) -> bool:
        """Whether own parts can come back now: the log is followed, Redis answers, the feed listens."""
        bus = self.relay.bus
        return not self._stopped and bus.health.state == "ok" and bus.feed.connected  # (BusState.OK)

    def _behind(self, now: float) -> float:
        """How long the oldest of this node's streamed parts still on its way has been."""
        out, mine = self._parts_out, self._mine
        while out and (out[0][1] not in mine or now - out[0][0] > PACE_GIVE_UP):
            out.popleft()
        return now - out[0][0] if out else 0.0

    async def _catch_up(self) -> None:
        """Wait while this node's own parts are behind (a stream's write: it always lets others run once)."""
        waited = False
        while self._pacing():
            behind = self._behind(time.monotonic())
            if behind <= self._behind_limit:
                break
            if self._back.is_set():  # (one event for every stream of the transaction waiting)
                self._back = anyio.Event()
            with anyio.move_on_after(PACE_GIVE_UP - behind):
                await self._back.wait()
            waited = True
        if not waited:
            await pass_once()

    def turn(self, member: Member, traceparent: str | None, *, answered: bool) -> dict[str, Any]:
        """What a message carries for the node running the turns: who sent it; ``answered``: this node
        runs them and answers it now (a node taking over answers it if no run has started for it)."""
        return {"member": describe(member), "traceparent": traceparent, "answered": answered}

    def authored(self, user: str, message_id: str) -> bool:
        on_its_way = [event for event, _ in self._mine.values()]
        return wrote(user, message_id, [*self.transaction.recent(), *on_its_way])

    def control(self, kind: str, **fields: Any) -> None:
        """Ask the owner to do something (answer a call, cancel a run, end): a log entry no member sees."""
        body = {"n": self.relay.node, "ctl": kind, **fields}
        self._queue(fastjson.dumps(body).encode(), False, None)

    def unavailable(self) -> str | None:
        health = self.relay.bus.health
        return None if health.state == "ok" else health.error or "redis does not answer"  # (BusState.OK)

    def _queue(self, data: bytes, part: bool, run_id: str | None) -> None:
        if self._left:
            logger.debug("transaction %s left this node: an event published since is not sent", self.transaction.id)
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            logger.error(
                "transaction %s: %d events wait for redis; the oldest is dropped", self.transaction.id, MAX_OUTBOX
            )
        self._outbox.append((data, part, time.monotonic(), run_id))
        # A streamed part waits for the oldest's linger, unless it fills the batch: no need to wake the sender.
        urgent = not part or self._outbox.size >= self.relay.bus.config.part_batch_bytes
        self.relay.sender.ready(self, urgent=urgent)

    async def run(self) -> None:
        """Follow the log, send what is published and contend for the lease, until the transaction
        leaves this node (then what is still queued is sent, and the lease given back)."""
        feed, transaction = self.relay.bus.feed, self.transaction
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._host_then_contend)
                    await self._until_sent()
        finally:
            self._left = True
            self.relay.sender.forget(self)
            with anyio.move_on_after(2, shield=True):
                try:
                    await feed.unhost(transaction.id)
                except ClusterError as error:
                    logger.warning("transaction %s: could not stop following it: %s", transaction.id, error)
            self.relay.logs.discard(self)
            self.done.set()

    async def _host_then_contend(self) -> None:
        """Contend for the lease once the log is followed: a takeover needs to know what runs."""
        await self._host()
        self._following.set()
        await self._contend()

    async def _host(self) -> None:
        """Follow the log; again until it works (Redis away, or this transaction's last stay here
        still leaving the feed)."""
        feed, transaction, delay = self.relay.bus.feed, self.transaction, 0.01
        while not self._stopped:
            try:
                await feed.host(transaction.id, self.deliver, after=transaction.tseq)
                return
            except ValueError:
                pass
            except ClusterError as error:  # not confirmed: ask again (the request may have been lost)
                logger.warning("transaction %s: %s; trying again", transaction.id, error)
                await feed.unhost(transaction.id)
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if not self._left:
            self.relay.sender.ready(self, urgent=True)  # what is queued goes now (parts linger no longer)
        self._back.set()  # a stream waiting for its parts: they will not come back here

    async def _until_sent(self) -> None:
        """Until the transaction stops here with nothing left to send; then it stops following the log."""
        while not (self._stopped and not self._outbox):
            await self._wake.wait()
        self._scope.cancel()

    # --- what the sender asks (``sender.py``) ---------------------------------------------------------

    def due_at(self, linger: float, most: int) -> float:
        """When the outbox (not empty) should go: streamed parts wait ``linger`` seconds from the oldest
        for more, unless ``most`` bytes of them are queued; anything else goes at once (0)."""
        if self._stopped or self._outbox.not_parts or self._outbox.size >= most:
            return 0.0
        return self._outbox[0][2] + linger

    def payloads(self, batch: list[Queued]) -> list[bytes]:
        """What of ``batch`` to append: not what runs this node gave up with its lease published."""
        return [data for data, _, _, run in batch if run not in self._given_up]

    def numbered_after(self) -> int:
        """The floor for Redis's numbering: past what the store holds and what was delivered here."""
        return max(self.floor, self.transaction.tseq)

    def floor_known(self) -> bool:
        """Whether ``numbered_after`` is sure. After Redis was lost it is not until the store's last tseq
        is read: that read starts now, in a task of its own (the sender goes on with the others, and
        leaves this one out until it is ready again)."""
        if self.relay.bus.feed.reconnects == self._reconnects:
            return True
        if not self.reading_floor:
            self.reading_floor = True
            self.relay.spawn(self._read_floor)
        return False

    async def _read_floor(self) -> None:
        delay = 0.05
        try:
            while not await self._refloor():
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)
        finally:
            self.reading_floor = False
            if not self._left:
                self.relay.sender.ready(self, urgent=True)

    def append_failed(self) -> None:
        self._reconnects = -1  # Redis may come back without its counters: read the floor again

    def drained(self) -> None:
        """The outbox is empty: a transaction leaving this node may stop now."""
        if self._stopped:
            self._wake.set()

    def sent(self, batch: list[Queued]) -> None:
        """Take ``batch`` out of the outbox, which it begins unless a lost lease took some out meanwhile."""
        outbox, count = self._outbox, len(batch)
        if len(outbox) >= count and outbox[0] is batch[0] and outbox[count - 1] is batch[-1]:
            for _ in range(count):
                outbox.popleft()
            return
        sent = {id(queued) for queued in batch}
        while outbox and id(outbox[0]) in sent:
            outbox.popleft()

    async def _refloor(self) -> bool:
        """After losing Redis: number after what the store holds, not only after what this node saw
        (another node may have delivered further before a restart that lost the counter)."""
        try:  # what this node delivered is in transaction.tseq: the store's own view is what matters here
            record = await self.relay.store.transaction(self.transaction.id)
        except Exception as error:
            logger.warning("transaction %s: could not read its last tseq: %s", self.transaction.id, error)
            return False
        self._reconnects = self.relay.bus.feed.reconnects
        if record is not None:
            self.floor = max(self.floor, record.last_tseq)
        return True

    # --- delivery -----------------------------------------------------------------------------------

    def deliver(self, items: Sequence[Any]) -> None:
        """The feed's next entries of this transaction, in tseq order (a ``LogGap`` has no ``data``).

        Consecutive streamed parts of one message among them (those that crossed the bus together)
        reach the members here as one part, as parts do on one node when a member's socket is behind;
        each is still logged and stored as the log numbered it."""
        if self._filling is not None:
            self._filling.extend(items)
            return
        parts: list[Event] = []  # streamed parts of one message, logged, for the members as one part
        own = False
        try:
            for index, item in enumerate(items):
                if getattr(item, "data", None) is None:  # the bus no longer holds these: the store does
                    self._to_members(parts)
                    self._filling, self._fill_ended = list(items[index + 1 :]), anyio.Event()
                    self.relay.spawn(self._fill, item.first, item.last)
                    return
                try:
                    mine = self._mine.pop(self._own_id(item.data), None)
                    if mine is not None:  # published here: known already, the bytes need no parsing
                        self._event(item.tseq, mine[0], mine[1], self.relay.node, stored=False, parts=parts)
                        own = True
                    else:
                        self._entry(item.tseq, fastjson.loads(item.data), parts)
                except Exception:  # one bad entry costs itself
                    logger.exception("transaction %s: entry %d could not be delivered", self.transaction.id, item.tseq)
        finally:
            self._to_members(parts)
            self._progress.set()  # (once a batch: a takeover waits for it to have caught up)
            if own:
                self._back.set()

    def _to_members(self, parts: list[Event]) -> None:
        """The parts held by ``deliver``, to the members here as one (what they would get merged if their
        sockets were behind: one frame each for a batch, not one per token); ``parts`` is emptied."""
        if parts:
            merged = merged_parts(parts)
            parts.clear()
            self.transaction.to_members(merged)

    async def filled(self, last: int) -> None:
        """Deliver from the store up to ``last`` (its newest row) what the feed did not bring
        (``Shared.filled``): after a Redis that lost its data, or a log idle past its expiry, nothing on
        the bus says it is gone. The rows are there already: one read, no waiting for other nodes'.
        A fill under way (a gap the feed reported) is waited for first: it may end short of ``last``."""
        while self._filling is not None:
            await self._fill_ended.wait()
        if self.transaction.tseq < last:
            self._filling, self._fill_ended = [], anyio.Event()  # what the feed delivers meanwhile waits
            await self._fill(self.transaction.tseq + 1, last, attempts=1)

    async def _fill(self, first: int, last: int, *, attempts: int = 10) -> None:
        """Deliver ``first``..``last`` from the store (waiting a little for rows other nodes have yet to
        write, ``attempts`` reads at most), then what came meanwhile, in order. Control entries are not
        stored: they are lost. However it ends (cancelled, a failure), what the feed held is delivered."""
        transaction, events, after, ended = self.transaction, [], first - 1, self._fill_ended
        logger.warning("transaction %s: events %d..%d are read from the store", transaction.id, first, last)
        try:
            for attempt in range(attempts):
                try:
                    events += await self.relay.store.events(transaction.id, after=after, limit=last - after)
                except Exception as error:
                    logger.warning("transaction %s: reading %d..%d failed: %s", transaction.id, after + 1, last, error)
                after = events[-1].tseq or after if events else after
                if after >= last or attempt == attempts - 1:
                    break
                await anyio.sleep(0.1 * (attempt + 1))  # another node may not have written them yet
            for event in events:
                self._mine.pop(event.id, None)  # published here, come back through the store
                try:
                    self._event(event.tseq or 0, event, None, None, stored=True)
                except Exception:  # one bad event costs itself
                    logger.exception("transaction %s: event %s could not be delivered", transaction.id, event.tseq)
        finally:
            self._back.set()
            held, self._filling = self._filling or [], None
            self._progress.set()  # a takeover waiting for the fill to end
            try:
                self.deliver(held)  # (a gap among them starts a fill of its own)
            finally:
                ended.set()

    def _entry(self, tseq: int, body: dict[str, Any], parts: list[Event] | None = None) -> None:
        """An entry another node wrote (or this one, before a restart): a control entry, or an event."""
        if "ctl" in body:
            self._control(tseq, body)
            return
        event = entry_event(body, self.transaction.id, tseq, self.transaction.thread_id)
        self._event(tseq, event, body.get("turn"), body.get("n"), stored=False, parts=parts)

    def _own_id(self, data: bytes) -> str:
        """The event id of an entry this node wrote (``entry`` begins with the node, then the id), else ''."""
        head = self._own_head
        return data[len(head) : data.find(b'"', len(head))].decode() if data.startswith(head) else ""

    def _event(
        self,
        tseq: int,
        event: Event,
        turn: dict[str, Any] | None,
        node: str | None,
        *,
        stored: bool,
        parts: list[Event] | None = None,
    ) -> None:
        """The log's next event: followed, delivered to the members here, stored (unless it came from
        the store), and acted on (a message to answer, an announcement, an end). ``parts``: where a
        streamed part waits to reach the members merged with the next parts of its message (``deliver``)."""
        transaction = self.transaction
        if event.id in self._seen:
            return  # an append retried after its answer was lost (or filled from the store): delivered already
        self._remember_id(event.id)
        event.stamp(transaction.id, tseq, transaction.thread_id)
        self._follow(event, node)
        if parts is not None:
            merge = event.type == EventType.MESSAGE_PART and not event.exclude and event.id not in self._then
            if parts and not (merge and same_message(parts[0], event)):
                self._to_members(parts)
            if merge:
                parts.append(event)  # first: a watcher that fails in ``logged`` costs the members nothing
                transaction.logged(event, store=not stored, members=False)
                return
        ending = event.type == EventType.TRANSACTION_END
        if ending:
            transaction.ended = True
        transaction.logged(event, store=not stored)
        then = self._then.pop(event.id, None)
        if then is not None:
            then()
        if turn is not None and event.type == EventType.MESSAGE:
            self._asked(event, turn, node)
        elif event.type == EventType.TRANSACTION_JOIN and self.relay.on_agents is not None:
            agents = event.payload.get("agents") if isinstance(event.payload, dict) else None
            if isinstance(agents, list) and any(name not in transaction.agents for name in agents):
                self.relay.on_agents(transaction, [str(name) for name in agents])
        elif event.type == EventType.INFO and node != self.relay.node and self.relay.on_tools_changed:
            if isinstance(event.payload, dict) and event.payload.get("event") == "mcp.server":
                self.relay.on_tools_changed(transaction)
        if ending:
            if transaction.end_seen is not None:
                transaction.end_seen.set()
            # Stored ended by every node it reaches: the node that ended it may have died before its
            # store wrote it (a record made again from the log's start stayed "open": a reviewer).
            reason = event.payload.get("reason") if isinstance(event.payload, dict) else None
            transaction.save(end_reason=str(reason) if reason is not None else None)
            if self.relay.on_ended is not None:
                self.relay.on_ended(transaction)

    def _remember_id(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _follow(self, event: Event, node: str | None) -> None:
        """Keep what a takeover and members here need to know of the log; the owner applies edits made elsewhere."""
        follow(self, event, self.transaction.users)
        if self.answered_here and event.type in (EventType.RUN_STARTED, EventType.INFO):
            self._answered_in_log(event)
        if event.type == EventType.MESSAGE_UPDATE and self.owner and node != self.relay.node:
            payload = event.payload if isinstance(event.payload, dict) else {}
            author, message_id = str(payload.get("author", "")), str(payload.get("message_id", ""))
            self.transaction.edit_message(author, message_id, str(payload.get("text", "")))

    def _end(self, reason: str) -> None:
        if self.relay.on_end_asked is not None:
            self.relay.on_end_asked(self.transaction, reason)

    def _add_agent(self, member: dict[str, Any], name: str) -> None:
        if self.relay.on_add_agent is not None:
            self.relay.on_add_agent(self.transaction, member, name)

    def _silence(self, named: str, by: str) -> None:
        if self.relay.on_silence is not None:
            self.relay.on_silence(self.transaction, named, by)
