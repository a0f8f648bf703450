"""Who runs a shared transaction's turns: the lease ``run:<transaction>``, held, lost and taken over.

``Succession`` is the owner side of ``relay.SharedLog`` (its base class): every node hosting a
transaction contends for the lease; the holder renews it from the moment it has it (a takeover that
reads the store for a while must not let it run out unnoticed); a holder that cannot renew stops its
turns; the next holder ends the runs the log shows open with ``RUN_ERROR NODE_LOST``, rebuilds the
agents' history from the log, carries out an end asked while nobody held the lease, and answers
the messages no run has answered. A node that leaves gives the lease back and says so in the log,
so a waiting node takes it at once. The holder also does what members elsewhere ask through the log
(control entries: answers, cancels, an end, an agent added) and starts the turns their messages ask for.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.conversation.history import History, history_from_events
from haip_runtime.conversation.members import remote_member
from haip_runtime.conversation.shared import end_lost
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import EventType

if TYPE_CHECKING:
    from haip_runtime.cluster import Bus
    from haip_runtime.conversation.members import Member
    from haip_runtime.conversation.sender import Pending
    from haip_runtime.conversation.transaction import Transaction
    from haip_runtime.store.base import Store

logger = logging.getLogger(__name__)

#: The longest wait between two tries while Redis does not answer.
MAX_RETRY = 1.0
#: Events read back from the store to rebuild the agents' history when this node takes the runs over.
REHYDRATE_EVENTS = 20_000
#: Messages kept for a takeover while no node runs the turns (the oldest stay unanswered past it).
MAX_UNANSWERED = 10_000
#: How often a node lacking some of a transaction's agents looks whether its lease is free (``_defer``).
DEFER_POLL = 0.5
LOST = "the node running this turn was lost; send the message again"
CALL_LOST = "the node running this call was lost; its result, if any, is lost with it"


class Succession:
    """The lease of one transaction's turns, from one node (``SharedLog`` sets what is declared here)."""

    bus: Bus
    store: Store
    node: str
    transaction: Transaction
    lease_name: str
    #: Whether this node runs the transaction's turns (holds its lease, or started it just now).
    owner: bool
    open_runs: dict[str, str]
    answering: dict[str, str]
    open_calls: dict[str, str | None]
    open_messages: dict[str, str]
    unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]]
    answered_here: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]]
    #: An end a member asked for while no node held the lease: the next holder carries it out.
    end_asked: str | None
    #: How long the turns may take to move to another node (the lease's time).
    handover: float
    #: The lease is being given to a node with every agent (``_hand_over_when_wanted``).
    _handing: bool
    #: This node said it wants the lease (``Leases.want``): taken back when it has it, or leaves.
    _wanting: bool
    _given_up: set[str]
    _outbox: Pending
    _stopped: bool
    _lease_free: anyio.Event
    _progress: anyio.Event
    #: Set while events are read from the store in place of the bus's (a gap, or a log Redis lost).
    _filling: list[Any] | None

    def _end(self, reason: str) -> None:
        raise NotImplementedError

    def control(self, kind: str, **fields: Any) -> None:
        raise NotImplementedError

    def _add_agent(self, member: dict[str, Any], name: str) -> None:
        raise NotImplementedError

    def _silence(self, named: str, by: str) -> None:
        raise NotImplementedError

    # --- the log's entries for whoever runs the turns ------------------------------------------------

    def _control(self, tseq: int, body: dict[str, Any]) -> None:
        self.transaction.tseq = max(self.transaction.tseq, tseq)  # a number no member sees
        self._progress.set()
        if body["ctl"] == "released":
            self._lease_free.set()
        elif self.transaction.ended:
            return
        elif self.owner:
            self._obey(body)
        elif body["ctl"] == "end":  # nobody may hold the lease now: the next holder ends it
            self.end_asked = str(body.get("reason", ""))

    def _asked(self, event: Event, turn: dict[str, Any], node: str | None) -> None:
        """A message the agents answer: the owner starts the turns (unless it did as it sent it); the
        others keep it until a run starts for it, in case they take over first.

        A message a node answered as it sent it (it ran the turns then) is kept until its run shows in
        the log (``follow``), or that node says it gave the run up with its lease (``given_up``): then it
        is answered by whoever runs the turns. This node's own too: it may have lost the lease and taken
        it back before its message was appended, and its run for it was stopped (a tester's message sent
        during a Redis restart was never answered). Not answered a second time otherwise (a node cut
        from Redis appended its message and its run after this one took the lease over)."""
        payload = event.payload if isinstance(event.payload, dict) else {"text": event.payload}
        message_id = str(payload.get("message_id", ""))
        claimed = bool(turn.get("answered"))
        if not self.owner or claimed or self.bus.leases.doubting(self.lease_name):
            # In doubt (Redis was lost, the lease not renewed since): another node may hold it now, and
            # answer this too. Answered once the lease is renewed (``confirmed``), else by the new owner.
            self.unanswered[message_id] = ({**turn, "by": node}, payload)
            if len(self.unanswered) > MAX_UNANSWERED:  # no owner for a long while: the oldest stay unanswered
                self.unanswered.popitem(last=False)
            return
        self._answer(turn, payload)

    def confirmed(self) -> None:
        """The lease was renewed after Redis was lost: still this node's. The messages kept meanwhile
        (not those another node answered as it sent them: their runs come) are answered now."""
        if not self.owner:
            return
        for message_id in [m for m, (turn, _) in self.unanswered.items() if not turn.get("answered")]:
            self._answer(*self.unanswered.pop(message_id))

    def _given_up_by(self, node: str, runs: list[str], messages: list[str]) -> None:
        """``node`` lost the lease and stopped ``runs``, after publishing what it had: those that reached
        the log end with ``NODE_LOST``, and the messages it answered that no run reached the log for are
        answered here (everything ``node`` published before this is in the log before it): its members'
        and, named in ``messages``, those of members elsewhere it answered as the owner."""
        for run_id in runs:
            if run_id in self.open_runs:
                self._node_lost(run_id)
        named = set(messages)
        for message_id in [m for m, (turn, _) in self.unanswered.items() if turn.get("by") == node or m in named]:
            self._answer(*self.unanswered.pop(message_id))

    def _answered_in_log(self, event: Event) -> None:
        """A run started for a message this node answered (or the message was refused, ``run.unqueued``):
        it is in the log, whoever holds the lease from now on."""
        payload = event.payload if isinstance(event.payload, dict) else {}
        if event.type == EventType.RUN_STARTED or payload.get("event") == "run.unqueued":
            self.answered_here.pop(str(payload.get("message_id", "")), None)

    def _node_lost(self, run_id: str) -> None:
        """End ``run_id``, which a node that lost the lease left open in the log, its streamed message cut
        short (``MESSAGE_END``, as a run cancelled on one node ends it: clients that show a message at its
        end showed nothing) and its tool calls not done (the node that made them stopped them, or died:
        their ``TOOL_DONE`` never came)."""
        self._given_up.discard(run_id)  # this node may be the one that gave it up: its end must go out
        end_lost(self.transaction.publish, self, run_id, LOST, CALL_LOST)

    def _answer(self, turn: dict[str, Any], payload: dict[str, Any]) -> None:
        transaction = self.transaction
        if transaction.ended:
            return
        message_id = str(payload.get("message_id", ""))
        if message_id:  # until its run shows in the log: a lease lost before gives it back (``_lose``)
            self.answered_here[message_id] = (turn, payload)
            if len(self.answered_here) > MAX_UNANSWERED:
                self.answered_here.popitem(last=False)
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
            elif kind == "end":
                self._end(str(body.get("reason", "")))
            elif kind == "silence":
                self._silence(str(body["run_id"]), str(body.get("by", "")))
            elif kind == "add_agent":
                self._add_agent(body["member"], str(body["name"]))
            elif kind == "given_up":
                runs = [str(run_id) for run_id in body.get("runs", ())]
                self._given_up_by(str(body.get("n", "")), runs, [str(m) for m in body.get("messages", ())])
        except Exception as error:  # answered by someone else meanwhile, or the call has ended
            logger.info("transaction %s: %s from node %s not done: %s", transaction.id, kind, body.get("n"), error)

    async def _contend(self) -> None:
        """Hold the lease while the transaction is here; wait for it while another node holds it."""
        delay = 0.05
        try:
            while not self._stopped:
                try:
                    token = await self._acquire()
                except ClusterError:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY)
                    continue
                delay = 0.05
                if await self._hold(token) and not self._handing:  # (a hand-over lost the turns already)
                    self._lose()
                self._handing = False
        finally:
            if self._wanting:  # (left waiting: a holder lacking agents must not give the turns to nobody)
                with anyio.move_on_after(1, shield=True), contextlib.suppress(ClusterError):
                    await self.bus.leases.unwant(self.lease_name)

    async def _hold(self, token: str) -> bool:
        """Renew the lease from now on, taking over meanwhile; ``True`` once it is lost, ``False`` if
        the node let it go (leaving, or the transaction left its memory)."""
        lost = False
        try:
            async with anyio.create_task_group() as tg:

                async def keep() -> None:
                    nonlocal lost
                    await self.bus.leases.keep(self.lease_name, token)
                    lost = True
                    tg.cancel_scope.cancel()  # a takeover still under way stops: another node has it

                tg.start_soon(keep)
                if self.transaction.absent_agents:
                    tg.start_soon(self._hand_over_when_wanted, tg.cancel_scope)
                if not self.owner:
                    await self._taking_over()
                await anyio.sleep_forever()
        finally:
            if not lost:
                with anyio.move_on_after(2, shield=True):
                    await self._release(token)
        return lost

    async def _hand_over_when_wanted(self, scope: anyio.CancelScope) -> None:
        """Holding the lease without every agent: give it back (and the turns with it) as soon as a node
        that has them all wants it. A reviewer: the lacking node kept the turns for good once it had
        them, the full node back from a restart never got them."""
        transaction = self.transaction
        while True:
            try:
                if not await self.bus.nodes.able(transaction.agent_names):
                    await anyio.sleep(self.handover)  # (no node could take them: asked again now and then)
                    continue
                wanting = await self.bus.leases.wanted(self.lease_name)
                # Only to a node that is live and has every agent, and not while anything of a run is here
                # (a member opening the conversation elsewhere cut an answer as NODE_LOST: a reviewer).
                if wanting and self._idle() and await self.bus.nodes.able(transaction.agent_names, node=wanting):
                    if self._idle():  # (again, after the last await: a message may have started a run)
                        break
            except ClusterError:
                pass  # (Redis away: the lease's renewal says what that means)
            await anyio.sleep(DEFER_POLL)
        logger.warning(
            "transaction %s: node %s, with all its agents (%s), wants its turns: given to it",
            transaction.id,
            wanting,
            ", ".join(transaction.agent_names),
        )
        self._handing = True
        self._lose()  # (at once, no await since the check: nothing of a run is cut; then the lease goes)
        scope.cancel()

    def _idle(self) -> bool:
        """Nothing of a run here: none under way, none waiting, nothing of one still to append (the end
        of a run that finished here: a hand-over before it reached the log had it ended NODE_LOST)."""
        transaction = self.transaction
        return not transaction.runs and not transaction.queued and all(run is None for *_, run in self._outbox)

    async def _acquire(self) -> str:
        """The lease, once free: tried again when the holder's would run out, or at once when the log
        says the holder gave it back. A node lacking some of the agents defers to one that has them
        all (``_defer``), which says it wants the lease while another holds it (``Leases.want``)."""
        leases = self.bus.leases
        while True:
            partial = bool(self.transaction.absent_agents)
            if partial:
                await self._defer()
            token, holder = await leases.acquire_or_holder(self.lease_name, partial=partial)
            if token is not None and self._wanting:
                self._wanting = False
                with contextlib.suppress(ClusterError):  # (it runs out by itself)
                    await leases.unwant(self.lease_name)
            if token is not None:
                return token
            if not partial and holder.endswith(leases.PARTIAL):
                self._wanting = True  # (first: a stop during the write still takes it back)
                await leases.want(self.lease_name)  # (a holder lacking agents gives it: ``_hand_over_when_wanted``)
            self._lease_free = anyio.Event()
            with anyio.move_on_after(max(await leases.left(self.lease_name), 0.001)):
                await self._lease_free.wait()

    async def _defer(self) -> None:
        """This node lacks some of the transaction's agents: a node hosting it that runs them all takes the
        lease first (it contends at once); this one only once the lease has stayed free ``handover``
        seconds (nobody else would take it: then the agents it has answer, and a message none of them
        answers gets ``INFO run.unqueued`` saying why). Before, such a node took the turns over like any
        other, and nobody was answered (a tester's cluster of nodes configured differently)."""
        leases, free_since = self.bus.leases, None
        while True:
            now = anyio.current_time()
            if not await self.bus.nodes.able(self.transaction.agent_names):
                return  # no live node runs them all (an agent retired everywhere): as on one node, at once
            if await leases.holder(self.lease_name) is not None:
                free_since = None
            elif free_since is None:
                free_since = now
            elif now - free_since >= self.handover:
                return
            await anyio.sleep(DEFER_POLL)

    async def _release(self, token: str) -> None:
        """Give the lease back and say so in the log, so a node waiting for it takes it now."""
        try:
            if await self.bus.leases.release(self.lease_name, token):
                released = fastjson.dumps({"n": self.node, "ctl": "released"}).encode()
                await self.bus.log.append(self.transaction.id, released, floor=self.transaction.tseq)
        except ClusterError:
            pass  # it runs out by itself

    def _lose(self) -> None:
        """Another node runs the turns now (this one could not renew its lease): stop what runs here, and
        drop what every run published that has not reached the log (one that ended here meanwhile too:
        the next owner ends with ``NODE_LOST`` the runs the log shows open, and a run ends once); the
        waiting messages are the next owner's to answer (it knows them from the log)."""
        self.owner = False
        unlogged = [run_id for _, _, _, run_id in self._outbox if run_id is not None]
        stopped = list(dict.fromkeys([*self.transaction.runs, *unlogged]))
        # (Said when it stops something: a Redis restarted without its data loses every lease at once.)
        log = logger.warning if stopped else logger.debug
        log("transaction %s: its lease was lost; %d run(s) stop here", self.transaction.id, len(stopped))
        self._given_up.update(stopped)
        for run in list(self.transaction.runs.values()):
            run.scope.cancel()
        # Its waiting messages too (left here, a queued one would also be answered again from the log when
        # this node takes the lease back, and run twice: a reviewer).
        self.transaction.drop_queue()
        self._outbox.keep(lambda queued: queued[3] not in self._given_up)
        # The messages of members elsewhere it answered whose runs the log does not show: whoever holds the
        # lease next answers them, this node too (a tester's message sent as Redis stopped was never
        # answered: this node had answered it, lost the lease before its run reached the log, took the
        # lease back, and had kept it nowhere).
        given_back, self.answered_here = list(self.answered_here.items()), OrderedDict()
        for message_id, (turn, payload) in given_back:
            self.unanswered[message_id] = ({**turn, "by": self.node}, payload)
        # After what is kept: the next owner ends those runs and answers what this node answered in vain.
        named = {"messages": [message_id for message_id, _ in given_back]} if given_back else {}
        self.control("given_up", runs=stopped, **named)

    async def _caught_up(self, timeout: float) -> None:
        """Until the feed has delivered what the log held when the lease came (what the last owner
        published before it let go, a cancelled run's end among it), or ``timeout``."""
        try:
            last = await self.bus.log.last_tseq(self.transaction.id)
        except ClusterError:
            return
        with anyio.move_on_after(timeout):
            while self.transaction.tseq < last or self._filling is not None:  # (a fill from the store too)
                self._progress = anyio.Event()
                await self._progress.wait()

    async def _taking_over(self) -> None:
        """``_take_over``, whatever fails in it: this node holds the lease, so it runs the turns from now on.
        A failure escaping it ended the transaction's following of the log here, and everything it
        published after was dropped, unsaid to its members (a reviewer's find)."""
        try:
            await self._take_over()
        except Exception:
            logger.exception("transaction %s: taking its turns over failed; they run here even so", self.transaction.id)
            self.owner = True

    async def _take_over(self) -> None:
        """This node runs the turns from now on: end what the last owner left running, rebuild the
        agents' history from the log, answer the messages no run has answered. Reading is bounded by
        a third of the lease each (it is renewed meanwhile)."""
        transaction = self.transaction
        # (Said when there is something to take over: after a Redis restart every transaction takes its lease again.)
        log = logger.info if self.open_runs or self.unanswered or self.end_asked is not None else logger.debug
        log("transaction %s: its turns run on this node now", transaction.id)
        third = self.bus.config.lease_seconds / 3
        await self._caught_up(min(2.0, third))
        stored: list[Event] = []
        with anyio.move_on_after(third):
            try:
                await self.store.flush()
                start = max(0, transaction.tseq - REHYDRATE_EVENTS)
                stored = await self.store.events(transaction.id, after=start, limit=REHYDRATE_EVENTS)
            except Exception:
                logger.exception(
                    "transaction %s: its history could not be read; the agents start afresh", transaction.id
                )
        last = stored[-1].tseq or 0 if stored else 0
        newer = [event for event in transaction.recent() if (event.tseq or 0) > last]
        try:
            past = history_from_events([*stored, *newer])
        except Exception:  # (an event not as this version writes them): the messages waiting are answered even so
            logger.exception("transaction %s: its history could not be rebuilt; agents start afresh", transaction.id)
            past = []
        config = transaction.config
        transaction.history = History(past, maxlen=config.agent_history_messages, max_bytes=config.agent_history_bytes)
        self.owner = True
        for run_id in [run_id for run_id in self.open_runs if run_id not in transaction.runs]:
            try:  # (each step costs itself: the ones after it are still done)
                self._node_lost(run_id)
            except Exception:
                logger.exception("transaction %s: ending run %s NODE_LOST failed", transaction.id, run_id)
        if self.end_asked is not None:
            self._end(self.end_asked)
            return
        waiting, self.unanswered = list(self.unanswered.values()), OrderedDict()
        for turn, payload in waiting:
            try:
                self._answer(turn, payload)
            except Exception:
                logger.exception("transaction %s: answering a waiting message failed", transaction.id)
