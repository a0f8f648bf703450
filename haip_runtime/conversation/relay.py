"""Transactions shared by the nodes of a cluster (``[cluster]``): one log in Redis, one runner.

Without ``[cluster]`` a ``Transaction`` numbers, stores and delivers its events itself. With it,
every node that has a member in a transaction hosts it, and the transaction's ``SharedLog``
changes three things:

- **Publishing** appends to the transaction's log on the bus, in publish order (one sender task per
  transaction, whatever was published during the last append goes in the next as one script run;
  streamed parts wait up to ``part_batch_ms`` or ``part_batch_bytes`` to go in one batch). Redis
  hands out the ``tseq``. ``publish`` stays synchronous; an append that fails is retried, in order,
  until Redis answers (an append whose answer was lost may land twice: the copy is dropped on
  delivery by event id).
- **Delivery** comes only from the bus's feed, on every hosting node alike, so every member on every
  node sees one order. Each hosting node also writes what it delivers to the store (PostgreSQL,
  numbered by the log: a row already written by another node is skipped), so the durable log holds
  every event as long as one hosting node lives.
- **Runs** have one owner: the node holding the lease ``run:<transaction>``. A message from a member
  on another node is published with what the owner needs to answer it (who sent it, their roles),
  and the owner starts the turns when the feed brings it. Approvals, input answers, cancels and ends
  from other nodes travel the same way, as control entries no member sees. Every hosting node waits
  for the lease; when the owner dies (its lease runs out), the next holder publishes ``RUN_ERROR
  NODE_LOST`` for each run the log shows started and not finished, rebuilds the agents' history from
  the log as after a restart, and answers the messages still waiting.

Nothing here imports ``redis``: the bus is given, and only its methods are called.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.conversation.history import History, history_from_events
from haip_runtime.conversation.members import remote_member
from haip_runtime.conversation.shared import entry, entry_event
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import Channel, ErrorCode, EventType, ToolStatus

if TYPE_CHECKING:
    from haip_runtime.cluster import Bus
    from haip_runtime.conversation.members import Member
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.store.base import Store

logger = logging.getLogger(__name__)

#: Event ids remembered per transaction to drop an append that landed twice (a retry after a lost answer).
SEEN_IDS = 4096
#: The longest wait between two tries of an append while Redis does not answer.
MAX_RETRY = 1.0
#: Published events waiting for Redis, per transaction, before the oldest are given up (logged).
MAX_OUTBOX = 10_000
#: Events read back from the store to rebuild the agents' history when this node takes the runs over.
REHYDRATE_EVENTS = 20_000
_ENDS = (EventType.RUN_FINISHED, EventType.RUN_ERROR)
_WAITING = (ToolStatus.AWAITING_APPROVAL, ToolStatus.INPUT_REQUIRED)


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
        self._logs: set[SharedLog] = set()

    def attach(self, transaction: Transaction, *, new: bool, floor: int = 0) -> None:
        """Host ``transaction`` here: its events come from the feed from now on, its lease is contended.

        ``new``: started on this node just now, so its turns run here at once (the lease is taken
        behind: no other node can know the transaction yet). Else it comes from the store, and the
        feed delivers the log after ``transaction.tseq``; ``floor``: the last tseq the store knows,
        under which Redis must not number (its counter may be gone: restarted, or idle too long).
        """
        shared = SharedLog(self, transaction, owner=new, floor=floor)
        transaction.shared = shared
        self._logs.add(shared)
        self.spawn(shared.run)

    def detach(self, transaction: Transaction) -> None:
        """It left this node's memory: stop following it (what it still had to send is sent first)."""
        if transaction.shared is not None:
            transaction.shared.stop()

    def counts(self) -> dict[str, int]:
        """For ``/health`` and ``/metrics``: transactions hosted here, those whose turns run here, and
        events waiting to be appended (Redis slow or away)."""
        return {
            "hosted": len(self._logs),
            "runsHere": sum(1 for shared in self._logs if shared.owner),
            "waiting": sum(shared.waiting for shared in self._logs),
        }

    async def close(self, timeout: float = 2.0) -> None:
        """The node is stopping: send what every transaction still has queued, give the leases back."""
        logs = list(self._logs)
        for shared in logs:
            shared.stop()
        with anyio.move_on_after(timeout, shield=True):
            for shared in logs:
                await shared.done.wait()


class SharedLog:
    """One transaction's log on the bus, from this node: publishing, delivery, and who runs its turns."""

    def __init__(self, relay: Relay, transaction: Transaction, *, owner: bool, floor: int = 0) -> None:
        self.relay = relay
        self.floor = floor
        self.transaction = transaction
        self.lease_name = f"run:{transaction.id}"
        #: Whether this node runs the transaction's turns (holds its lease, or started it just now).
        self.owner = owner
        #: Runs the log shows started and not ended, by run id (their agent): ``NODE_LOST`` on takeover.
        self.open_runs: dict[str, str] = {}
        #: Messages from members elsewhere that no run has answered yet (a takeover answers them).
        self.unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()
        #: Calls the log shows waiting for a member's answer (an answer from here is forwarded).
        self.waiting_calls: set[str] = set()
        #: Users the log shows joined (members on other nodes), for the member lists sent from here.
        self.users_elsewhere: set[str] = set()
        self._outbox: deque[tuple[bytes, bool, float]] = deque()
        self._mine: dict[str, Event] = {}
        self._then: dict[str, Callable[[], None]] = {}
        self._reconnects = relay.bus.feed.reconnects
        #: Set at each delivery (a takeover waits to have caught up).
        self._progress = anyio.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._wake = anyio.Event()
        self._filling: list[Any] | None = None
        self._stopped = False
        self._scope = anyio.CancelScope()
        #: Set when it has stopped following the log here.
        self.done = anyio.Event()

    @property
    def waiting(self) -> int:
        """Events published here and not yet appended to the log."""
        return len(self._outbox)

    # --- publishing ---------------------------------------------------------------------------------

    def send(self, event: Event, turn: dict[str, Any] | None = None, then: Callable[[], None] | None = None) -> None:
        """Queue ``event`` for the log (its tseq comes with its delivery); ``turn``: the owner answers
        it; ``then``: called once it is delivered here."""
        self._mine[event.id] = event
        if then is not None:
            self._then[event.id] = then
        self._queue(entry(event, self.relay.node, turn), event.type == EventType.MESSAGE_PART)

    def control(self, kind: str, **fields: Any) -> None:
        """Ask the owner to do something (answer a call, cancel a run, end): a log entry no member sees."""
        body = {"n": self.relay.node, "ctl": kind, **fields}
        self._queue(fastjson.dumps(body).encode(), False)

    def _queue(self, data: bytes, part: bool) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            logger.error(
                "transaction %s: %d events wait for redis; the oldest is given up", self.transaction.id, MAX_OUTBOX
            )
        self._outbox.append((data, part, time.monotonic()))
        self._wake.set()

    async def run(self) -> None:
        """Follow the log, send what is published and contend for the lease, until the transaction
        leaves this node (then what is still queued is sent, and the lease given back)."""
        feed, transaction = self.relay.bus.feed, self.transaction
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._host_then_contend)
                    await self._send_loop()
        finally:
            with anyio.move_on_after(2, shield=True):
                try:
                    await feed.unhost(transaction.id)
                except ClusterError as error:
                    logger.warning("transaction %s: could not stop following it: %s", transaction.id, error)
            self.relay._logs.discard(self)
            self.done.set()

    async def _host_then_contend(self) -> None:
        """Contend for the lease once the log is followed: a takeover needs to know what runs."""
        await self._host()
        await self._contend()

    async def _host(self) -> None:
        feed, transaction = self.relay.bus.feed, self.transaction
        for _ in range(500):  # an earlier stay of the transaction here may still be leaving the feed
            try:
                await feed.host(transaction.id, self.deliver, after=transaction.tseq)
                return
            except ValueError:
                await anyio.sleep(0.01)
            except ClusterError as error:  # still hosted: the feed subscribes once redis answers
                logger.warning("transaction %s: %s", transaction.id, error)
                return
        logger.error("transaction %s: could not follow its log (hosted twice)", transaction.id)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def _send_loop(self) -> None:
        config = self.relay.bus.config
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._outbox:
                await self._linger(config.part_batch_ms / 1000, config.part_batch_bytes)
                batch = [data for data, _, _ in self._outbox]
                await self._append(batch)
                for _ in batch:
                    self._outbox.popleft()
            if self._stopped:
                self._scope.cancel()
                return

    async def _linger(self, seconds: float, most: int) -> None:
        """Streamed parts wait a few ms for more (one append for many tokens); anything else goes at once."""
        while all(part for _, part, _ in self._outbox) and not self._stopped:
            size = sum(len(data) for data, _, _ in self._outbox)
            left = self._outbox[0][2] + seconds - time.monotonic()
            if size >= most or left <= 0:
                return
            self._wake = anyio.Event()
            with anyio.move_on_after(left):
                await self._wake.wait()

    async def _append(self, batch: list[bytes]) -> None:
        delay = 0.05
        while True:
            try:
                if self.relay.bus.feed.reconnects != self._reconnects:
                    await self._refloor()
                floor = max(self.floor, self.transaction.tseq)
                await self.relay.bus.log.append_many(self.transaction.id, batch, floor=floor)
                return
            except ClusterError as error:
                logger.warning(
                    "transaction %s: appending to the log failed (%s); trying again", self.transaction.id, error
                )
                self._reconnects = -1  # Redis may come back without its counters: read the floor again
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)

    async def _refloor(self) -> None:
        """After losing Redis: number after what the store holds, not only after what this node saw
        (another node may have delivered further before a restart that lost the counter)."""
        self._reconnects = self.relay.bus.feed.reconnects
        try:
            await self.relay.store.flush()
            record = await self.relay.store.transaction(self.transaction.id)
        except Exception as error:
            logger.warning(
                "transaction %s: could not read its last tseq from the store: %s", self.transaction.id, error
            )
            return
        if record is not None:
            self.floor = max(self.floor, record.last_tseq)

    # --- delivery -----------------------------------------------------------------------------------

    def deliver(self, items: Sequence[Any]) -> None:
        """The feed's next entries of this transaction, in tseq order (a ``LogGap`` has no ``data``)."""
        if self._filling is not None:
            self._filling.extend(items)
            return
        for index, item in enumerate(items):
            if getattr(item, "data", None) is None:  # the bus no longer holds these: the store does
                self._filling = list(items[index + 1 :])
                self.relay.spawn(self._fill, item.first, item.last)
                return
            self._entry(item.tseq, item.data)

    async def _fill(self, first: int, last: int) -> None:
        """Deliver ``first``..``last`` from the store, then what came meanwhile, in order."""
        transaction = self.transaction
        logger.warning(
            "transaction %s: events %d..%d are read from the store (redis no longer has them)",
            transaction.id,
            first,
            last,
        )
        try:
            events = await self.relay.store.events(transaction.id, after=first - 1, limit=last - first + 1)
        except Exception:
            logger.exception(
                "transaction %s: reading %d..%d from the store failed; they are skipped", transaction.id, first, last
            )
            events = []
        for event in events:
            if event.id not in self._seen:
                self._remember_id(event.id)
                transaction.logged(event, store=False)
        held, self._filling = self._filling or [], None
        self.deliver(held)

    def _entry(self, tseq: int, data: bytes) -> None:
        body = fastjson.loads(data)
        if "ctl" in body:
            self.transaction.tseq = max(self.transaction.tseq, tseq)  # a number no member sees
            self._progress.set()
            if self.owner and not self.transaction.ended:
                self._obey(body)
            return
        if body["id"] in self._seen:
            return  # an append retried after its answer was lost: delivered already
        self._remember_id(body["id"])
        self._progress.set()
        event = self._mine.pop(body["id"], None)
        if event is not None:
            event.stamp(self.transaction.id, tseq, self.transaction.thread_id)
        else:
            event = entry_event(body, self.transaction.id, tseq, self.transaction.thread_id)
        self._follow(event, body)
        transaction = self.transaction
        ending = event.type == EventType.TRANSACTION_END
        if ending:
            transaction.ended = True
        transaction.logged(event)
        then = self._then.pop(event.id, None)
        if then is not None:
            then()
        turn = body.get("turn")
        if turn is not None and event.type == EventType.MESSAGE:
            self._asked(event, turn)
        if ending:
            if transaction.end_seen is not None:
                transaction.end_seen.set()
            if self.relay.on_ended is not None:
                self.relay.on_ended(transaction)

    def _remember_id(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _follow(self, event: Event, body: dict[str, Any]) -> None:
        """Keep what a takeover and members here need to know of the log: runs, waiting calls, users."""
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type == EventType.RUN_STARTED and event.run_id:
            self.open_runs[event.run_id] = str(payload.get("agent", ""))
            self.unanswered.pop(str(payload.get("message_id", "")), None)
        elif event.type in _ENDS and event.run_id:
            self.open_runs.pop(event.run_id, None)
        elif event.type == EventType.INFO and payload.get("event") == "run.unqueued":
            self.unanswered.pop(str(payload.get("message_id", "")), None)
        elif event.type == EventType.TOOL_UPDATE and payload.get("status") in _WAITING:
            self.waiting_calls.add(str(payload.get("call_id", "")))
        elif event.type in (EventType.TOOL_DONE, EventType.TOOL_UPDATE) and payload.get("call_id"):
            self.waiting_calls.discard(str(payload["call_id"]))
        elif event.type == EventType.TRANSACTION_JOIN and payload.get("joined"):
            self.users_elsewhere.add(str(payload["joined"]))
            self.transaction.users.setdefault(str(payload["joined"]), None)
        elif event.type == EventType.INFO and payload.get("event") == "member.left":
            self.users_elsewhere.discard(str(payload.get("user", "")))

    def _asked(self, event: Event, turn: dict[str, Any]) -> None:
        """A member elsewhere said something the agents answer: the owner starts the turns."""
        payload = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        message_id = str(payload.get("message_id", ""))
        if not self.owner:
            self.unanswered[message_id] = (turn, payload)
            return
        self._answer(turn, payload)

    def _answer(self, turn: dict[str, Any], payload: dict[str, Any]) -> None:
        transaction = self.transaction
        if transaction.ended:
            return
        about = turn["member"]
        member: Member = transaction.members.get(str(about["id"])) or remote_member(about)
        forwarded = {k: v for k, v in payload.items() if k != "author"}
        transaction.answer_elsewhere(member, str(payload.get("text", "")), forwarded, turn.get("traceparent"))

    def _obey(self, body: dict[str, Any]) -> None:
        """A control entry from a member's node, done here because this node runs the turns."""
        transaction, kind = self.transaction, body["ctl"]
        try:
            if kind == "cancel":
                transaction.cancel_run(str(body["run_id"]), str(body.get("by", "")))
            elif kind == "answer" and transaction.tools is not None:
                transaction.tools.answer(str(body["call_id"]), transaction.id, str(body["user"]), body["answer"], "")
            elif kind == "tool_cancel" and transaction.tools is not None:
                reason = body.get("reason")
                transaction.tools.cancel(str(body["call_id"]), transaction.id, str(body["user"]), reason, "")
            elif kind == "end" and self.relay.on_end_asked is not None:
                self.relay.on_end_asked(transaction, str(body.get("reason", "")))
        except Exception as error:  # answered by someone else meanwhile, or the call has ended
            logger.info("transaction %s: %s from node %s not done: %s", transaction.id, kind, body.get("n"), error)

    # --- the owner ----------------------------------------------------------------------------------

    async def _contend(self) -> None:
        """Hold the lease while the transaction is here; wait for it while another node holds it."""
        leases = self.relay.bus.leases
        delay = 0.05
        while not self._stopped:
            try:
                token = await leases.wait_acquire(self.lease_name)
            except ClusterError:
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)
                continue
            delay = 0.05
            lost = False
            try:
                if not self.owner:
                    await self._take_over()
                await leases.keep(self.lease_name, token)
                lost = True
            finally:
                if not lost:  # leaving (or stopping): the next node need not wait for it to run out
                    with anyio.move_on_after(2, shield=True):
                        try:
                            await leases.release(self.lease_name, token)
                        except ClusterError:
                            pass  # it runs out by itself
            self._lose()

    def _lose(self) -> None:
        """Another node runs the turns now (this one could not renew its lease): stop what runs here."""
        logger.warning("transaction %s: its lease was lost; its turns stop here", self.transaction.id)
        self.owner = False
        for run in list(self.transaction.runs.values()):
            run.scope.cancel()

    async def _caught_up(self, timeout: float = 2.0) -> None:
        """Until the feed has delivered what the log held when the lease came (what the last owner
        published before it let go, a cancelled run's end among it), or ``timeout``."""
        try:
            last = await self.relay.bus.log.last_tseq(self.transaction.id)
        except ClusterError:
            return
        with anyio.move_on_after(timeout):
            while self.transaction.tseq < last:
                self._progress = anyio.Event()
                await self._progress.wait()

    async def _take_over(self) -> None:
        """This node runs the turns from now on: end what the last owner left running, rebuild the
        agents' history from the log, answer the messages no run has answered."""
        transaction = self.transaction
        logger.info("transaction %s: its turns run on this node now", transaction.id)
        await self._caught_up()
        try:
            await self.relay.store.flush()
            start = max(0, transaction.tseq - REHYDRATE_EVENTS)
            stored = await self.relay.store.events(transaction.id, after=start, limit=REHYDRATE_EVENTS)
        except Exception:
            logger.exception(
                "transaction %s: its history could not be read back; the agents start afresh", transaction.id
            )
            stored = []
        last = stored[-1].tseq or 0 if stored else 0
        newer = [event for event in transaction.recent() if (event.tseq or 0) > last]
        entries = history_from_events([*stored, *newer])
        config = transaction.config
        transaction.history = History(
            entries, maxlen=config.agent_history_messages, max_bytes=config.agent_history_bytes
        )
        self.owner = True
        for run_id in list(self.open_runs):
            if run_id in transaction.runs:
                continue
            body = error_body(ErrorCode.NODE_LOST, "the node running this turn was lost; send the message again")
            transaction.publish(
                Event(EventType.RUN_ERROR, {"run_id": run_id, **body}, channel=Channel.AGENT, run_id=run_id)
            )
            self.open_runs.pop(run_id, None)
        for turn, payload in list(self.unanswered.values()):
            self._answer(turn, payload)
        self.unanswered.clear()
