"""The node's one subscription: every event of the transactions it hosts, each once, in tseq order.

Fan-out choice: one channel per transaction, and each node subscribes once to the channels of the
transactions it hosts (however many of its members are in each), all on one pub/sub connection.
An append then costs one ``PUBLISH`` whatever the number of nodes, Redis does the fan-out, and who
listens is Redis's own state, which vanishes with a dead node's connection. The other design (a
channel per node, with a set of hosting nodes per transaction read by the append script) costs a
publish per hosting node and a set that goes stale when a node dies without saying so.

Exactly once, in order (the agno design: read the stream, then follow, so nothing falls between):
each hosted transaction remembers the next tseq it expects. ``host`` has the listening task
subscribe (only that task touches the pub/sub connection), waits for Redis to confirm, then reads
the stream from that tseq; the channel's messages then follow. A message past the
expected tseq (one was missed) is preceded by an ``XRANGE`` from the expected tseq; anything already
delivered is dropped. After the connection is lost (Redis restarted, the connection killed) the feed
reconnects with backoff, subscribes again and reads every hosted stream from its expected tseq.
Events Redis no longer holds (trimmed) are delivered as a ``LogGap`` for the caller to read from the
durable store.

A node's own appends are delivered at their answer (``appended``), not when they come back on the
channel: the bytes are known, and a conversation hosted by one node only costs no publish and no
message back (the append is ``solo``, ``translog.py``: the script publishes unless the transaction's
channel has no subscriber but one and this node's own channel has exactly one, this feed). Delivery
stays in tseq order: an answer past the expected tseq (another node's events come first) is held
until the channel brings those, and the stream is read if it does not within ``HELD_WAIT``. What
comes back on the channel of an append delivered already is dropped, as any repeat is.

A solo append is asked for only while Redis has this node subscribed to the transaction's channel
as far as the feed can know: the listener counts the (un)subscriptions it has written per channel and
takes a channel for subscribed only at the confirmation of the last of them (a confirmation of an
earlier ``SUBSCRIBE`` followed by an ``UNSUBSCRIBE`` is not one). A subscription Redis dropped is
caught by the script itself: this node's own channel then has no subscriber, and it publishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.exceptions import RedisError

from haip_runtime.cluster.dialing import CONNECT_TIMEOUT
from haip_runtime.cluster.health import BusHealth
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.pipe import Subscriber
from haip_runtime.cluster.translog import LogEntry, LogGap, TransactionLog, parse_message
from haip_runtime.exceptions import ClusterError

logger = logging.getLogger("haip_runtime.cluster")

#: Called in the feed's task with the next events of one transaction (gaps in place), in order.
Deliver = Callable[[Sequence[LogEntry | LogGap]], None]
#: Called in the feed's task with a message other nodes sent this one (``Bus.tell``); must not block.
Notice = Callable[[bytes], None]

CATCH_UP_PAGE = 1000
#: How long after a catch-up failed it is tried again (at once when the feed is quiet that long).
BEHIND_RETRY = 1.0
#: The first wait before reconnecting; doubled after each failure up to a second.
FIRST_RETRY = 0.05
#: How long an own append answered ahead of the feed waits for the events before it before the stream
#: is read for them (another node's message on its way; or, rarely, an append of this node that ran but
#: whose answer was lost, tried again since).
HELD_WAIT = 0.1
#: Own events held per transaction at most: past it the events before them are given up for read from
#: the store (a ``LogGap``), as if the stream had lost them, and the held ones are delivered.
MAX_HELD = 10_000


@dataclass
class Hosted:
    """One transaction this node hosts: where its delivery stands."""

    transaction: str
    deliver: Deliver
    #: The tseq delivered next; everything before it was delivered (or reported as a gap).
    next: int
    subscribed: anyio.Event = field(default_factory=anyio.Event)
    #: A catch-up failed: what the stream holds after ``next`` is read again when the feed is quiet.
    behind: bool = False
    #: This node's own appends answered past ``next``, by first tseq: delivered once the feed gets there.
    held: dict[int, list[LogEntry]] = field(default_factory=dict)
    #: How many events ``held`` holds.
    held_events: int = 0
    #: When the stream is read for what the held appends wait for (``HELD_WAIT`` after the first held).
    held_until: float = 0.0


class Feed:
    """Delivers the hosted transactions' events; owns the pub/sub connection and its reconnects."""

    def __init__(self, url: str, commands: Redis, log: TransactionLog, keys: Keyspace, health: BusHealth, node: str):
        self._url = url
        self._commands = commands
        self._log = log
        self._keys = keys
        self._health = health
        self._node_channel = keys.node_channel(node)
        #: The subscription's name in Redis's ``CLIENT LIST``.
        self.connection_name = f"{keys.prefix}:feed:{node}"
        self._hosted: dict[str, Hosted] = {}
        self._by_channel: dict[bytes, str] = {}
        self._task_status: TaskStatus[None] | None = None
        #: The (un)subscriptions written on the current connection and not confirmed yet, per channel.
        self._unconfirmed: dict[bytes, int] = {}
        self._subscription: Subscriber | None = None
        #: Transactions with own appends held (``appended``).
        self._holding: set[str] = set()
        #: When the transactions a failed catch-up left ``behind`` are read again (0: none is behind).
        self._behind_retry = 0.0
        self._delay = FIRST_RETRY
        #: Reconnections of the pub/sub connection (each followed by a catch-up of every hosted transaction).
        self.reconnects = 0
        #: Whether the subscription is up (subscribed again to everything hosted): deliveries can come.
        self.connected = False
        #: Where messages from other nodes on this node's channel go (anything but the feed's own).
        self.on_notice: Notice | None = None
        #: Called when the subscription is lost (Redis restarted, or cut off): what it held may be gone.
        self.on_lost: Callable[[], None] | None = None

    @property
    def hosted(self) -> frozenset[str]:
        return frozenset(self._hosted)

    def solo(self, transaction: str) -> bool:
        """Whether this node's next append to ``transaction`` may leave its publish out when no other node
        listens (``TransactionLog.append_batches``): the feed follows the transaction's channel now. The
        caller then hands the answer to ``appended``."""
        hosted = self._hosted.get(transaction)
        return hosted is not None and self.connected and hosted.subscribed.is_set()

    def appended(self, transaction: str, first: int, payloads: Sequence[bytes]) -> None:
        """This node appended ``payloads`` to ``transaction``, numbered from ``first``: deliver them, in
        turn (now, unless events numbered before them are still to come)."""
        hosted = self._hosted.get(transaction)
        if hosted is None or first < hosted.next:
            return  # not followed here (the stream has them for whoever hosts it next), or delivered already
        entries = [LogEntry(transaction, tseq, data) for tseq, data in enumerate(payloads, first)]
        if first == hosted.next:
            self._accept(hosted, entries)
            return
        if not hosted.held:
            hosted.held_until = time.monotonic() + HELD_WAIT
            self._holding.add(transaction)
            if self._subscription is not None:
                self._subscription.wake()  # its wait is shortened to HELD_WAIT
        hosted.held[first] = entries
        hosted.held_events += len(entries)
        if hosted.held_events > MAX_HELD:  # the stream cannot be read for what comes before them
            logger.warning(
                "transaction %s: %d own events wait for earlier ones; those are read from the store",
                transaction,
                hosted.held_events,
            )
            out: list[LogEntry | LogGap] = []
            self._reach(hosted, entries[-1].tseq + 1, out, authoritative=True)
            self._deliver(hosted, out)

    async def host(self, transaction: str, deliver: Deliver, *, after: int = 0, timeout: float = 10) -> None:
        """Deliver every event of ``transaction`` with tseq > ``after`` to ``deliver``, from now on.

        Returns once subscribed and caught up with what the stream held; ``ClusterError`` if Redis
        does not confirm within ``timeout`` (the transaction stays hosted: the feed keeps trying).
        """
        if transaction in self._hosted:
            raise ValueError(f"transaction {transaction} is already hosted")
        hosted = self._hosted[transaction] = Hosted(transaction, deliver, after + 1)
        channel = self._keys.channel(transaction)
        self._by_channel[channel.encode()] = transaction
        await self._ask_listener(b"host", transaction)
        try:
            with anyio.fail_after(timeout):
                await hosted.subscribed.wait()
        except TimeoutError:
            raise ClusterError(f"redis did not confirm subscribing to {transaction} within {timeout:g} s") from None
        await self._catch_up(hosted)

    async def unhost(self, transaction: str) -> None:
        """Stop delivering ``transaction``'s events."""
        hosted = self._hosted.pop(transaction, None)
        if hosted is None:
            return
        self._by_channel.pop(self._keys.channel(transaction).encode(), None)
        await self._ask_listener(b"unhost", transaction)

    async def _ask_listener(self, verb: bytes, transaction: str) -> None:
        """Have the listening task (un)subscribe: it alone uses the pub/sub connection, so no two tasks
        ever reconnect it at once (redis-py reconnects a connection from whichever task's command failed).

        Sent on this node's own channel, which the listener always follows; if Redis cannot be reached
        the reconnect that follows subscribes to everything hosted then.
        """
        try:
            await self._commands.publish(self._node_channel, verb + b" " + transaction.encode())
        except (RedisError, OSError) as exc:
            self._health.failed(exc)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled: connect, subscribe everything hosted, catch up, follow; again on loss."""
        self._task_status = task_status
        while True:
            subscription = Subscriber(self._url, connect_timeout=CONNECT_TIMEOUT, name=self.connection_name)
            try:
                await subscription.connect()
                await self._listen(subscription)
            except (RedisError, OSError) as exc:
                self._health.failed(exc)
                log = logger.warning if self._delay == FIRST_RETRY else logger.debug  # (once a streak)
                log("cluster feed lost redis (%s); reconnecting until it answers", self._health.error)
                if self.on_lost is not None:
                    try:
                        self.on_lost()
                    except Exception:
                        logger.exception("cluster feed: handling the loss of redis failed")
            finally:
                self.connected = False
                subscription.close()
            await anyio.sleep(self._delay)
            self._delay = min(self._delay * 2, 1.0)
            self.reconnects += 1

    async def _listen(self, subscription: Subscriber) -> None:
        awaiting = set(self._hosted)
        channels = [self._node_channel, *(self._keys.channel(t) for t in awaiting)]
        pending = {channel.encode() for channel in channels}
        node_channel = self._node_channel.encode()
        self._subscription, self._unconfirmed = subscription, {}
        self._subscribe(subscription, channels)
        while True:
            wait = HELD_WAIT if self._holding else BEHIND_RETRY
            if self._behind_retry:  # (a failed catch-up is read again on time, quiet or not)
                wait = max(0.0, min(wait, self._behind_retry - time.monotonic()))
            batch = await subscription.messages(timeout=wait)
            if self._holding:
                await self._read_held()
            # What a failed catch-up left behind is read again when the feed is quiet, or a while after
            # the failure if it never is (a node busy with other conversations: found by a reviewer).
            if self._behind_retry and (not batch or time.monotonic() >= self._behind_retry):
                await self._read_behind()
            if not batch:
                continue
            for reply in batch:
                if len(reply) != 3:  # not a (un)subscription nor a message: nothing this feed asked for
                    continue
                kind, channel, data = reply
                if kind == b"message" and channel != node_channel:
                    try:
                        await self._receive(channel, data)
                    except ValueError:  # not one of ours (someone else published on the channel): skip it
                        logger.exception("cluster feed: a message on %s is not a log message", channel)
                elif kind == b"message":
                    self._obey(subscription, data)
                elif kind == b"unsubscribe":
                    self._confirmed(channel)
                elif kind == b"subscribe" and channel in pending:
                    self._confirmed(channel)
                    pending.discard(channel)
                    if not pending:  # everything of before the loss is subscribed again: read what was missed
                        self._health.succeeded()
                        self.connected = True
                        self._delay = FIRST_RETRY
                        if self._task_status is not None:  # the first time: the bus is ready
                            self._task_status.started()
                            self._task_status = None
                        await self._catch_up_all(awaiting)
                        self._settle(subscription, awaiting)
                elif kind == b"subscribe" and self._confirmed(channel):  # a later host()'s subscription
                    self._confirm(channel)

    def _settle(self, subscription: Subscriber, subscribed: set[str]) -> None:
        """(Un)subscribe what host() and unhost() changed while this connection was being made: their
        requests on the node's channel may have come before the listener followed it."""
        self._subscribe(subscription, [self._keys.channel(t) for t in self._hosted if t not in subscribed])
        self._unsubscribe(subscription, [self._keys.channel(t) for t in subscribed if t not in self._hosted])

    def _subscribe(self, subscription: Subscriber, channels: Sequence[str]) -> None:
        self._count(channels)
        subscription.subscribe(*channels)

    def _unsubscribe(self, subscription: Subscriber, channels: Sequence[str]) -> None:
        self._count(channels)
        subscription.unsubscribe(*channels)

    def _count(self, channels: Sequence[str]) -> None:
        """Count each of ``channels`` as (un)subscribed until Redis confirms it (``_confirmed``)."""
        for channel in channels:
            key = channel.encode()
            self._unconfirmed[key] = self._unconfirmed.get(key, 0) + 1

    def _confirmed(self, channel: bytes) -> bool:
        """A confirmation of ``channel`` came: whether it was of the last (un)subscription written for it."""
        left = self._unconfirmed.get(channel, 0) - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return False
        self._unconfirmed.pop(channel, None)
        return True

    def _obey(self, subscription: Subscriber, request: bytes) -> None:
        """A host() or unhost() of this node, asking for a (un)subscription; or another node's notice."""
        if not request.startswith((b"host ", b"unhost ")):
            if self.on_notice is not None:
                try:
                    self.on_notice(request)
                except Exception:
                    logger.exception("cluster feed: handling a notice failed")
            return
        verb, _, name = request.decode(errors="replace").partition(" ")
        channel = self._keys.channel(name)
        if verb == "host" and name in self._hosted:
            self._subscribe(subscription, [channel])
        elif verb == "unhost" and name not in self._hosted:
            self._unsubscribe(subscription, [channel])

    def _confirm(self, channel: bytes) -> None:
        transaction = self._by_channel.get(channel)
        if transaction is not None and transaction in self._hosted:
            self._hosted[transaction].subscribed.set()

    async def _catch_up_all(self, transactions: set[str]) -> None:
        for transaction in list(self._hosted):
            hosted = self._hosted.get(transaction)
            if hosted is None:
                continue
            if transaction in transactions:
                await self._catch_up(hosted)
                if self._keys.channel(transaction).encode() not in self._unconfirmed:
                    hosted.subscribed.set()  # a host() waiting across the reconnect was subscribed by it

    async def _receive(self, channel: bytes, data: bytes) -> None:
        transaction = self._by_channel.get(channel)
        hosted = self._hosted.get(transaction) if transaction is not None else None
        if hosted is None:
            return
        entries = parse_message(hosted.transaction, data)
        if entries and entries[0].tseq > hosted.next:
            await self._catch_up(hosted)  # a message was missed: the stream has it
        self._accept(hosted, entries)

    async def _read_behind(self) -> None:
        """Catch up again the transactions a failed catch-up left behind."""
        self._behind_retry = 0.0
        for hosted in [hosted for hosted in self._hosted.values() if hosted.behind]:
            await self._catch_up(hosted)

    async def _catch_up(self, hosted: Hosted) -> None:
        """Deliver what the stream holds from ``hosted.next`` on, page by page."""
        while hosted.transaction in self._hosted:
            try:
                entries = await self._log.read(hosted.transaction, hosted.next - 1, limit=CATCH_UP_PAGE)
            except ClusterError:
                hosted.behind = True  # tried again within BEHIND_RETRY (``_listen``), or at the reconnect
                if not self._behind_retry:
                    self._behind_retry = time.monotonic() + BEHIND_RETRY
                return
            hosted.behind = False
            self._accept(hosted, entries, authoritative=True)
            if len(entries) < CATCH_UP_PAGE:
                return

    def _reach(self, hosted: Hosted, tseq: int, out: list[LogEntry | LogGap], authoritative: bool) -> bool:
        """Fill ``out`` up to ``tseq`` (excluded): this node's own held events, and, where the stream no
        longer has what lies between (``authoritative``: it was read), gaps around them; ``False`` if
        something before ``tseq`` is still to come."""
        while hosted.next < tseq:
            if hosted.held:
                self._release(hosted, out)
            if hosted.next >= tseq:
                break
            if not authoritative:
                return False
            upto = min([first - 1 for first in hosted.held if first - 1 >= hosted.next] + [tseq - 1])
            out.append(LogGap(hosted.transaction, hosted.next, upto))
            hosted.next = upto + 1
        return True

    def _release(self, hosted: Hosted, out: list[LogEntry | LogGap]) -> None:
        """Add to ``out`` the held own appends the feed has now reached; forget those it went past."""
        held = hosted.held
        for first in sorted(held):
            if first > hosted.next:
                break
            entries = held.pop(first)
            hosted.held_events -= len(entries)
            for entry in entries:
                if entry.tseq == hosted.next:
                    out.append(entry)
                    hosted.next += 1
        if held:
            hosted.held_until = time.monotonic() + HELD_WAIT  # the next one waits afresh
        else:
            self._holding.discard(hosted.transaction)

    async def _read_held(self) -> None:
        """Read the stream for the transactions whose held own appends have waited ``HELD_WAIT``."""
        now = time.monotonic()
        for transaction in list(self._holding):
            hosted = self._hosted.get(transaction)
            if hosted is None or not hosted.held:
                self._holding.discard(transaction)
            elif hosted.held_until <= now:
                hosted.held_until = now + HELD_WAIT
                await self._catch_up(hosted)

    def _accept(self, hosted: Hosted, entries: Sequence[LogEntry], *, authoritative: bool = False) -> None:
        """Deliver the entries not delivered yet; a hole is a gap only when the stream itself has it."""
        out: list[LogEntry | LogGap] = []
        for entry in entries:
            if entry.tseq > hosted.next and not self._reach(hosted, entry.tseq, out, authoritative):
                break  # the catch-up could not read: wait for the next one
            if entry.tseq < hosted.next:
                continue
            out.append(entry)
            hosted.next = entry.tseq + 1
        if hosted.held and out:
            self._release(hosted, out)
        self._deliver(hosted, out)

    @staticmethod
    def _deliver(hosted: Hosted, out: list[LogEntry | LogGap]) -> None:
        if out:
            try:
                hosted.deliver(out)
            except Exception:
                logger.exception("delivering events of transaction %s failed", hosted.transaction)
