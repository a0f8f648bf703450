"""Transactions: conversations shared by members and agents, with their runs and event log.

A ``Transaction`` belongs to the runtime, not to a socket. Every event it publishes gets the next
transaction sequence ``tseq``, goes to the store (the durable log) and to the members, which never
block it. In memory it keeps only what live work needs: the members, the agents, the running
turns, a short tail of recent events (so a member joining mid-stream misses nothing) and the
agents' bounded history. Agent turns run as ``Run``s in the hub's task group, each with its own
cancel scope, so one failing or cancelled turn costs only itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import anyio

from haip_runtime.agents.api import Turn, concurrent_turns
from haip_runtime.config.models import LimitsConfig, SessionConfig, TransactionsConfig
from haip_runtime.conversation.backlog import Backlog
from haip_runtime.conversation.history import History
from haip_runtime.conversation.members import Member
from haip_runtime.conversation.runs import AgentSlot, Run, RunLimit, make_turn
from haip_runtime.exceptions import LlmError, ProtocolError
from haip_runtime.llm.provider import HistoryEntry
from haip_runtime.observability import tracing
from haip_runtime.protocol.codec import DEFAULT_MAX_FRAME_BYTES, ENVELOPE_ROOM
from haip_runtime.protocol.envelope import Event, new_id, secret_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import Channel, ErrorCode, EventType, RunOutcome
from haip_runtime.session.limits import limited
from haip_runtime.store.base import Store, TransactionRecord, TransactionState

if TYPE_CHECKING:
    from haip_runtime.conversation.shared import Shared
    from haip_runtime.tools.proxy import ToolProxy

logger = logging.getLogger(__name__)

#: How long ending a transaction waits for cancelled turns and ``on_end`` hooks.
END_GRACE_SECONDS = 5.0
#: How many numbers past its last a live transaction keeps reserved in its record (``reserve``): what
#: a crash may have handed out unstored. Renewed when half are used; a crash leaves a gap this large at most
#: (more while the store is behind: twice its pending writes).
RESERVED_AHEAD = 4096


@dataclass(frozen=True)
class _Queued:
    """A user message waiting its turn: room under its member's run limit, or its agents' next turn."""

    member: Member
    text: str
    payload: dict[str, Any]
    traceparent: str | None = None


class Transaction:
    """One conversation: members, agents, runs, history; its log lives in the store."""

    def __init__(
        self,
        *,
        owner: str,
        thread_id: str | None,
        spawn: Callable[..., object],
        tools: ToolProxy | None = None,
        store: Store | None = None,
        config: TransactionsConfig | None = None,
        limits: LimitsConfig | None = None,
        run_limit: RunLimit | None = None,
        ready: Callable[[Iterable[str]], Awaitable[None]] | None = None,
        id: str | None = None,
        tseq: int = 0,
        reserved: int = 0,
        created_at: float | None = None,
        active_at: float | None = None,
        users: Iterable[str] = (),
        history: Iterable[HistoryEntry] = (),
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.config = config or TransactionsConfig()
        #: ``server.max_frame_bytes``: an agent's message is cut to fit one frame (``TurnServices``).
        self.max_frame_bytes = max_frame_bytes
        #: The runtime is stopping: no waiting message starts (``Hub._stop_for_restart``).
        self.stopping = False
        self.limits = limits or LimitsConfig()
        #: How many runs a member may have at once (shared by the transactions of one registry).
        self.run_limit = run_limit or RunLimit(SessionConfig().max_concurrent_runs)
        self.id = id or secret_id()
        self.owner = owner
        self.thread_id = thread_id
        self.members: dict[str, Member] = {}
        self.agents: dict[str, AgentSlot] = {}
        #: In a cluster, the transaction's agents this node's config lacks (its nodes should all run the
        #: same ones): they stay the transaction's, run by the nodes that have them.
        self.absent_agents: list[str] = []
        self.runs: dict[str, Run] = {}
        self.history = History(
            history, maxlen=self.config.agent_history_messages, max_bytes=self.config.agent_history_bytes
        )
        self.ended = False
        self.tools = tools
        self.store = store
        self.tseq = tseq
        #: Numbers up to this are reserved in its record: a runtime bringing it back after a crash
        #: numbers on after them (``reserve``); renewed once ``tseq`` passes ``_renew_at``.
        self.reserved = reserved
        self._renew_at = reserved - RESERVED_AHEAD // 2
        self.created_at = created_at or time.time()
        #: When something last happened in it (seconds): its record's ``updated_at``, which conversation
        #: lists sort by. Set from the ``ts`` of each event logged but ``INFO`` (a member's session that
        #: expired, a server's state: not the conversation's), so a save (at a shutdown, say) moves nothing.
        self.active_at = active_at or self.created_at
        self._active_ts = ""
        #: Users who have ever been members: who may read it back.
        self.users: dict[str, None] = dict.fromkeys([owner, *users])
        #: When the last member left (monotonic), for eviction of idle transactions.
        self.memberless_since: float | None = time.monotonic()
        #: User messages waiting for room under the run limit, in order.
        self._queue: list[_Queued] = []
        self._backlog = Backlog()
        #: What members sent, from the stored log of one brought back (``remember_sent``).
        self._stored_sent: list[Event] = []
        self._spawn = spawn
        #: Waits for MCP servers still making their first connection (``tools.readiness``), if any are configured.
        self._ready = ready
        #: Called with (agent, status or error code) when a run ends.
        self.on_run_end: Callable[[str, str], None] | None = None
        #: Called with every event after it is published (the hub's speech follows the answers it speaks).
        self.watchers: list[Callable[[Event], None]] = []
        #: In a cluster: the log on the bus that numbers and delivers the events, and whether this
        #: node runs the turns (``conversation/relay.py``); ``None``: this process alone.
        self.shared: Shared | None = None
        #: In a cluster, while ending: set when the ``TRANSACTION_END`` came back through the log.
        self.end_seen: anyio.Event | None = None

    # --- the record ------------------------------------------------------------------------------

    @property
    def agent_names(self) -> list[str]:
        """The transaction's agents, those this node lacks included (``absent_agents``)."""
        return [*self.agents, *(name for name in self.absent_agents if name not in self.agents)]

    def record(self, end_reason: str | None = None) -> TransactionRecord:
        return TransactionRecord(
            id=self.id,
            owner=self.owner,
            agents=tuple(self.agent_names),
            members=tuple(self.users),
            state=TransactionState.ENDED if self.ended else TransactionState.OPEN,
            created_at=self.created_at,
            updated_at=self.last_active,
            last_tseq=self.tseq,
            thread_id=self.thread_id,
            end_reason=end_reason,
            reserved_tseq=self.reserved,
        )

    @property
    def last_active(self) -> float:
        """When something last happened in it, in seconds: the last event's ``ts`` that counts (``logged``)."""
        latest = self._active_ts
        return max(self.active_at, int(latest) / 1000) if latest.isdigit() else self.active_at

    def save(self, end_reason: str | None = None) -> None:
        if self.store is not None:
            self.store.save_transaction(self.record(end_reason))

    def reserve(self) -> None:
        """Reserve the next ``RESERVED_AHEAD`` numbers in its record, written at once. The store writes in batches, so
        the events members just got may not be stored when the process is killed; without this the
        runtime bringing it back would number new events as those members already saw, and a member
        rejoining from the last tseq it saw would miss one. Brought back after a crash, it numbers on
        after the reservation (a gap; ``Registry._bring_back``)."""
        # A store behind (under load, in an outage) holds more of this one's events unwritten: reserve past them.
        ahead = max(RESERVED_AHEAD, 2 * self.store.pending) if self.store is not None else RESERVED_AHEAD
        self.reserved = self.tseq + ahead
        self._renew_at = self.tseq + ahead // 2
        self.save()
        if self.store is not None:
            self.store.hurry()  # stored in one batch's time, not the batching interval's

    def put_away(self) -> None:
        """Saved as it leaves memory cleanly (idle, the runtime stopping): what it numbered is stored or
        queued before this, so its reservation is given back (brought back, it numbers on from its last).
        An event published after this reserves again."""
        self.reserved = self._renew_at = self.tseq
        self.save()

    # --- membership and fan-out ------------------------------------------------------------------

    @property
    def member_users(self) -> list[str]:
        here = {member.user for member in self.members.values()}
        return sorted(here | self.shared.users_elsewhere if self.shared is not None else here)

    @property
    def runs_here(self) -> bool:
        """Whether this node runs the agents' turns (always, but in a cluster where another node does)."""
        return self.shared is None or self.shared.owner

    def add_member(self, member: Member) -> bool:
        """Add a member; ``True`` if its user was not among the members already."""
        new_user = member.user not in {m.user for m in self.members.values()}
        self.members[member.id] = member
        member.transactions.add(self.id)
        self.memberless_since = None
        if member.user not in self.users:
            self.users[member.user] = None
            self.save()
        return new_user

    def remove_member(self, member: Member, *, quietly: bool = False) -> None:
        """Take ``member`` out; the others are told when its user has no member left, unless ``quietly``
        (the member moved to another node of a cluster, where it goes on)."""
        if self.members.pop(member.id, None) is None:
            return
        member.transactions.discard(self.id)
        if not self.members:
            self.memberless_since = time.monotonic()
        if not quietly and not self.ended and member.user not in {m.user for m in self.members.values()}:
            self.publish(Event(EventType.INFO, {"event": "member.left", "user": member.user}))

    def is_member(self, member: Member) -> bool:
        return member.id in self.members

    def check_room(self, member: Member, related_id: str) -> None:
        """Before ``member`` joins: ``RATE_LIMITED`` if the transaction is full (``limits.members_per_transaction``)."""
        if not self.is_member(member) and len(self.members) >= self.limits.members_per_transaction:
            raise limited(
                f"transaction {self.id} already has {len(self.members)} members", "members_per_transaction", related_id
            )

    def add_agent(self, slot: AgentSlot) -> None:
        self.agents[slot.name] = slot
        self.save()

    def publish(self, event: Event, then: Callable[[], None] | None = None) -> Event:
        """Log ``event`` (next ``tseq``, stamped in place: a new event, not yet seen by anyone) and
        deliver it to every member it is meant for; ``then``: called once the members here have it.
        In a cluster the bus's log numbers it and delivery follows from the feed (``logged``), on
        every node alike."""
        if self.shared is not None:
            self.shared.send(event, then=then)
            return event
        event.payload_json  # noqa: B018  (encoded once, here: a payload JSON cannot hold takes no number)
        self.tseq += 1
        if self.tseq > self._renew_at:
            self.reserve()
        event.stamp(self.id, self.tseq, self.thread_id)
        self.logged(event)
        if then is not None:
            then()
        return event

    def logged(self, event: Event, *, store: bool = True, members: bool = True) -> None:
        """``event`` is the log's next: keep it, store it, deliver it to the members here (unless
        ``members`` is false: the caller delivers it to them with ``to_members``, merged with others)."""
        if event.tseq is not None and event.tseq > self.tseq:
            self.tseq = event.tseq
        if event.type != EventType.INFO:
            self._active_ts = event.ts  # (made a number when a record needs it: ``last_active``)
        self._backlog.remember(event)
        if store and self.store is not None:
            self.store.append(event)
        if members:
            self.to_members(event)
        for watch in self.watchers:
            watch(event)

    def to_members(self, event: Event) -> None:
        """Deliver ``event`` to the members here it is meant for."""
        exclude = event.exclude
        for member_id, member in list(self.members.items()):
            if member_id not in exclude:
                try:
                    member.deliver(event)
                except Exception:  # one member's failure costs only that member
                    logger.exception("transaction %s: delivering to member %s failed", self.id, member_id)

    def recent(self) -> list[Event]:
        """The latest events, as kept in memory (``backlog.TAIL_EVENTS`` at most), oldest first."""
        return self._backlog.recent()

    async def catch_up(self, since: int) -> tuple[list[Event], int]:
        """The latest events after ``since`` (at most ``join_history_events``), and how many were left out.
        The caller adds the member without awaiting in between, so nothing falls between history and
        live stream."""
        most = self.config.join_history_events
        start = max(since, self.tseq - most)
        events = await self._backlog.catch_up(self.store, self.id, start, lambda: self.tseq)
        if start == since or len(events) >= most or self.store is None:
            return events, start - since
        # Fewer events than numbers: the numbering has gaps (a crash's reserved numbers, a cluster's control
        # entries), so the latest ``most`` reach further back; what is left out is counted, not subtracted.
        first = events[0].tseq or start + 1 if events else self.tseq + 1
        older = [event for event in await self.store.tail(self.id, limit=most) if since < (event.tseq or 0) < first]
        events = older[max(0, len(older) - (most - len(events))) :] + events
        start = (events[0].tseq or 1) - 1 if events else start
        return events, await self.store.count_events(self.id, after=since, upto=start) if start > since else 0

    # --- messages and runs -----------------------------------------------------------------------

    def admit_runs(self, member: Member, wanted: int, related_id: str) -> None:
        """Room for ``wanted`` more runs started by ``member`` (``RUN_LIMIT_EXCEEDED`` if not); check
        before publishing what the runs answer, so a refused message costs nothing."""
        self.run_limit.check(member, wanted, related_id)

    def check_message(self, member: Member, related_id: str, *, joining: int = 0) -> bool:
        """Whether a message of ``member`` now would wait in the queue; ``RUN_LIMIT_EXCEEDED`` if it could
        not even wait (the queue is full, or it needs more runs than the limit). Publishes nothing.
        ``joining``: agents about to be added for it (a door adding the agent it names), counted too."""
        wanted = len(self.agents) + joining
        if not wanted:
            return False
        busy = self._agents_busy()
        waits = busy or not self.run_limit.room(member, wanted) or any(q.member.id == member.id for q in self._queue)
        if waits:
            self.run_limit.check_queue(len(self._queue), wanted, related_id, agents_busy=busy)
        return waits

    def user_message(
        self,
        member: Member,
        text: str,
        payload: dict[str, Any],
        related_id: str = "",
        traceparent: str | None = None,
        *,
        echo: bool = False,
    ) -> list[Run]:
        """Forward a user's message to the other members and start a turn for every agent.

        A message for which ``member`` has no room (or that follows one of theirs still waiting) waits
        in the transaction's queue (``INFO run.queued``) and its turns start, in order, when runs end;
        past the queue's bound it is ``RUN_LIMIT_EXCEEDED``, with nothing published. Returns the runs
        started now (none if it waits). ``traceparent`` is the client's trace, which the runs continue;
        ``echo``: the author gets the MESSAGE too (a transcript of their audio)."""
        message_id = str(payload.get("message_id") or new_id())
        forwarded = {**payload, "text": text, "author": member.user, "message_id": message_id}
        exclude = frozenset() if echo else frozenset({member.id})
        message = Event(EventType.MESSAGE, forwarded, channel=Channel.USER, exclude=exclude)
        shared = self.shared
        if shared is not None and not shared.owner:  # the node running the turns answers it
            answered = bool(self.agents or self.absent_agents)
            shared.send(message, turn=shared.turn(member, traceparent, answered=False) if answered else None)
            return []
        waits = self.check_message(member, related_id)
        if shared is not None and self.agents:  # should this node lose the turns, the next owner knows it
            shared.send(message, turn=shared.turn(member, traceparent, answered=True))
        else:
            self.publish(message)
        return self._answer_or_wait(member, text, {**payload, "message_id": message_id}, traceparent, waits)

    def answer_elsewhere(self, member: Member, text: str, payload: dict[str, Any], traceparent: str | None) -> None:
        """A message a member on another node published (this node runs the turns): answered, or
        queued, as ``user_message`` does; past the queue's bound it is given up with ``INFO
        run.unqueued`` (the member's node could not know the limit when it published)."""
        try:
            waits = self.check_message(member, "")
        except ProtocolError as refusal:
            unqueued = {"event": "run.unqueued", "message_id": payload["message_id"], "reason": refusal.message}
            self.publish(Event(EventType.INFO, unqueued, channel=Channel.AGENT))
            return
        self._answer_or_wait(member, text, payload, traceparent, waits)

    def _answer_or_wait(
        self, member: Member, text: str, payload: dict[str, Any], traceparent: str | None, waits: bool
    ) -> list[Run]:
        if not waits:
            return self._answer(member, text, payload, traceparent)
        self._queue.append(_Queued(member, text, payload, traceparent))
        self.run_limit.wait(member, self.id, self._drain)
        position = len(self._queue)
        queued = {
            "event": "run.queued",
            "message_id": payload["message_id"],
            "position": position,
            "agents": list(self.agents),
        }
        self.publish(Event(EventType.INFO, queued, channel=Channel.AGENT))
        return []

    def _answer(self, member: Member, text: str, payload: dict[str, Any], traceparent: str | None) -> list[Run]:
        message_id = str(payload["message_id"])
        self.history.append(HistoryEntry("user", member.user, text, message_id))
        if self.absent_agents and not self.agents:  # this node runs the turns, and has none of the agents
            missing = ", ".join(repr(name) for name in self.absent_agents)
            reason = f"agent {missing} is not configured on the node running this conversation's turns now"
            logger.warning("transaction %s: message %s not answered: %s", self.id, message_id, reason)
            unqueued = {"event": "run.unqueued", "message_id": message_id, "reason": reason}
            self.publish(Event(EventType.INFO, unqueued, channel=Channel.AGENT))
        runs = [self.start_run(slot, member, text, payload, "on_message", traceparent) for slot in self.agents.values()]
        if not runs:
            self.save()  # otherwise the end of each run saves (the log has the message meanwhile)
        return runs

    def _drain(self) -> None:
        """Start the waiting messages that have room now, in order (a member's stay behind its first blocked one)."""
        if self.stopping:  # the runtime is stopping: nothing starts now (``Hub._stop_for_restart``)
            return
        if self.ended or not self.runs_here:  # ended; or another node runs the turns now, and answers these
            self.unqueue_all("the transaction ended") if self.ended else self._queue.clear()
            return
        blocked: set[str] = set()
        for waiting in list(self._queue):
            if self._agents_busy():
                return  # the next is started when a turn of theirs ends (``_finish``), in order
            if waiting.member.id in blocked:
                continue
            if self.run_limit.room(waiting.member, len(self.agents)):
                self._queue.remove(waiting)
                self._answer(waiting.member, waiting.text, waiting.payload, waiting.traceparent)
            else:
                blocked.add(waiting.member.id)
                self.run_limit.wait(waiting.member, self.id, self._drain)

    def _agents_busy(self) -> bool:
        """Whether an agent of the transaction runs as many turns as it may at once (``concurrent_turns``):
        a message now waits its turn (a front-end developer's find: three lines typed fast to an LLM agent
        ran at once and were answered out of order, none seeing the others' answers)."""
        if not self.runs:
            return False
        for slot in self.agents.values():
            most = concurrent_turns(slot.instance)
            if most is not None and sum(run.agent == slot.name for run in self.runs.values()) >= most:
                return True
        return False

    def drop_queue(self) -> None:
        """This node no longer runs the turns: the waiting messages are the next owner's to answer (it
        knows them from the log), this node's among them, should it be the next owner itself."""
        self._queue.clear()

    def unqueue_all(self, reason: str) -> None:
        """Every waiting message leaves the queue unanswered, each with ``INFO run.unqueued`` (doors wait on it)."""
        waiting, self._queue = self._queue, []
        for each in waiting:
            unqueued = {"event": "run.unqueued", "message_id": each.payload["message_id"], "reason": reason}
            self.publish(Event(EventType.INFO, unqueued, channel=Channel.AGENT))

    @property
    def queued(self) -> list[str]:
        """The message ids waiting for room, in order."""
        return [str(waiting.payload["message_id"]) for waiting in self._queue]

    def message_id_taken(self, message_id: str) -> bool:
        """Whether a message this transaction holds in memory (the agents' history, the recent log) has
        ``message_id``: a member may not give theirs the id of another (edits go by it)."""
        return self.message_author(message_id) is not None

    def message_author(self, message_id: str) -> str | None:
        """Who wrote the message with ``message_id`` this transaction holds in memory (the agents'
        history, the recent log): a user, or an agent's name; ``None`` if it holds none."""
        for entry in self.history:
            if entry.message_id == message_id and entry.role in ("user", "agent"):
                return entry.author
        for event in self.recent():
            if (
                event.type in (EventType.MESSAGE, EventType.MESSAGE_START)
                and isinstance(event.payload, dict)
                and event.payload.get("message_id") == message_id
            ):
                return str(event.payload.get("author") or "")
        return None

    def said_before(self, user: str, message_id: str, text: str) -> bool:
        """Whether ``user`` said ``text`` as ``message_id`` here already: the same message again (a client
        sending anew what a session lost to a restart had not acknowledged), to be taken once. Its text as
        sent or as edited since (the resend may follow its edit: a reviewer's find)."""
        for entry in self.history:
            if entry.message_id == message_id and entry.role == "user" and entry.author == user and entry.text == text:
                return True
        for event in [*self._stored_sent, *self.recent()]:
            payload = event.payload
            if (
                event.type == EventType.MESSAGE
                and isinstance(payload, dict)
                and payload.get("message_id") == message_id
            ):
                return payload.get("author") == user and payload.get("text") == text
        return False

    def called_before(self, user: str, call_id: str, tool: str, params: dict[str, Any]) -> Event | None:
        """The end (``TOOL_DONE``) of ``user``'s call of ``tool`` with ``params`` as ``call_id`` here, if it was
        made: the same call again (a client sending anew what a lost session had not acknowledged), which
        must not run twice; its end goes to the sender again. ``None`` if it was not made; the call itself
        (no end yet) while it runs."""
        made: Event | None = None
        for event in [*self._stored_sent, *self.recent()]:
            payload = event.payload
            if not isinstance(payload, dict) or payload.get("call_id") != call_id:
                continue
            if event.type == EventType.TOOL_CALL and made is None:
                if payload.get("caller") != user or payload.get("tool") != tool or payload.get("params") != params:
                    return None
                made = event
            elif event.type == EventType.TOOL_DONE and made is not None:
                return event
        return made

    def remember_sent(self, events: Iterable[Event]) -> None:
        """What members sent themselves among ``events`` (the latest of the stored log, for one brought back):
        their messages as sent, their own tool calls and those calls' ends. What a client sends again after a
        restart is known for what it is (``said_before``, ``called_before``)."""

        def call_of(event: Event) -> str | None:
            direct = event.type in (EventType.TOOL_CALL, EventType.TOOL_DONE) and event.run_id is None
            return str(event.payload.get("call_id")) if direct and isinstance(event.payload, dict) else None

        calls = {call_of(event) for event in events if event.type == EventType.TOOL_CALL} - {None}
        said = [event for event in events if event.type == EventType.MESSAGE and event.channel == Channel.USER]
        self._stored_sent = said + [event for event in events if call_of(event) in calls]

    def edit_message(self, user: str, message_id: str, text: str) -> bool:
        """Apply a MESSAGE_UPDATE by its author; ``False`` if it is not theirs (or too old to edit). A
        node that does not run the turns keeps no history: it checks the recent log (the owner edits)."""
        for index, entry in enumerate(self.history):
            if entry.message_id == message_id and entry.author == user and entry.role == "user":
                self.history[index] = replace(entry, text=text)
                return True
        for index, waiting in enumerate(self._queue):  # (a reviewer's find: refused, and the old text answered)
            if waiting.payload.get("message_id") == message_id and waiting.member.user == user:
                self._queue[index] = replace(waiting, text=text, payload={**waiting.payload, "text": text})
                return True
        return self.shared is not None and not self.shared.owner and self.shared.authored(user, message_id)

    def start_run(
        self,
        slot: AgentSlot,
        member: Member | None,
        text: str,
        payload: dict[str, Any],
        hook: str,
        traceparent: str | None = None,
    ) -> Run:
        message_id = payload.get("message_id")
        run = Run(id=new_id(), agent=slot.name, member=member, message_id=str(message_id) if message_id else None)
        self.runs[run.id] = run
        if member is not None:
            self.run_limit.claim(member)
        pace = None if self.shared is None else self.shared.pace
        turn = make_turn(
            self.id,
            self.owner,
            self.publish,
            self.history,
            self.tools,
            slot,
            run,
            text,
            payload,
            member,
            pace,
            self.max_frame_bytes - ENVELOPE_ROOM,
        )
        self._spawn(self._execute, run, getattr(slot.instance, hook), turn, slot.tool_servers, traceparent)
        return run

    async def _execute(
        self,
        run: Run,
        hook: Callable[[Turn], Awaitable[None]],
        turn: Turn,
        servers: tuple[str, ...] = (),
        traceparent: str | None = None,
    ) -> None:
        started = {"run_id": run.id, "agent": run.agent}
        if turn.payload.get("message_id"):
            started["message_id"] = str(turn.payload["message_id"])  # the message it answers (it may have waited)
        self.publish(Event(EventType.RUN_STARTED, started, channel=Channel.AGENT, run_id=run.id))
        logged = False  # the failure was logged in the run's span (its line carries the trace's ids)
        try:
            with run.scope, tracing.agent_span(run.agent, self.id, run.id, traceparent):
                try:
                    if servers and self._ready is not None:
                        await self._ready(servers)  # the agent is offered the tools of servers still connecting
                    await hook(turn)
                except LlmError as exc:
                    logger.warning("agent %r: LLM error %s in run %s: %s", run.agent, exc.code, run.id, exc.message)
                    logged = True
                    raise
                except Exception:
                    logger.exception("agent %r failed in run %s of transaction %s", run.agent, run.id, self.id)
                    logged = True
                    raise
        except LlmError as exc:  # the provider failed: tell the user why, in words they can act on
            self._finish(run, EventType.RUN_ERROR, error_body(exc.code, exc.message))
        except Exception as exc:
            if not logged:  # raised around the hook (leaving the run's scope, say): a reviewer's find
                logger.exception("agent %r failed in run %s of transaction %s", run.agent, run.id, self.id)
            message = f"agent {run.agent!r} failed: {type(exc).__name__} (the server's log has its traceback)"
            self._finish(run, EventType.RUN_ERROR, error_body(ErrorCode.INTERNAL_ERROR, message))
        else:
            status = RunOutcome.CANCELLED if run.scope.cancel_called else RunOutcome.OK
            ended = {"status": status.value}
            if status is RunOutcome.CANCELLED and run.reason:
                ended["reason"] = run.reason
            self._finish(run, EventType.RUN_FINISHED, ended)
        finally:
            if self.runs.pop(run.id, None) is not None:  # cancelled from outside its own scope (shutdown)
                if run.member is not None:
                    self.run_limit.release(run.member)
                run.finish()

    def _finish(self, run: Run, type: str, body: dict[str, Any]) -> None:
        self.runs.pop(run.id, None)
        self.publish(Event(type, {"run_id": run.id, **body}, channel=Channel.AGENT, run_id=run.id))
        if self.on_run_end is not None:
            self.on_run_end(run.agent, body.get("status") or body["code"])
        self.save()
        run.finish()
        if run.member is not None:
            self.run_limit.release(run.member)  # after RUN_FINISHED: a waiting message may start now
        if self._queue:
            self._drain()  # its agent is free again: the next message waiting for it

    def cancel_run(self, run_id: str, by: str = "") -> bool:
        """Cancel a running turn, or take a waiting message (named by its message id) out of the queue; a
        message id whose message is answered already cancels the turns answering it (a client that pressed
        "stop" right after sending cannot know which it is: a prober's find)."""
        run = self.runs.get(run_id)
        if run is not None:
            run.scope.cancel()
            return True
        answering = [run for run in self.runs.values() if run.message_id == run_id]
        for run in answering:
            run.scope.cancel()
        if answering:
            return True
        shared = self.shared
        if (
            shared is not None
            and not shared.owner
            and (run_id in shared.open_runs or run_id in shared.unanswered or run_id in shared.answering.values())
        ):
            shared.control("cancel", run_id=run_id, by=by)
            return True
        for waiting in self._queue:
            if waiting.payload["message_id"] == run_id:
                self._queue.remove(waiting)
                unqueued = {"event": "run.unqueued", "message_id": run_id, "reason": f"cancelled by {by}".strip()}
                self.publish(Event(EventType.INFO, unqueued, channel=Channel.AGENT))
                return True
        return False

    @property
    def busy(self) -> bool:
        """Whether anything is running or waiting in it (turns, queued messages, tool calls members started)."""
        return bool(self.runs or self._queue) or (self.tools is not None and self.tools.has_calls(self.id))

    async def end(self, reason: str) -> None:
        """Cancel running turns, call every agent's ``on_end``, tell the members. Idempotent.

        In a cluster the node running the turns ends it (asked through the log from elsewhere), and
        this returns once the ``TRANSACTION_END`` came back through the log to the members here."""
        if self.ended:
            return
        if self.shared is not None and not self.shared.owner:
            self.shared.control("end", reason=reason)
        else:
            self.ended = True
            await self.stop_turns(f"the transaction ended: {reason}", hooks=reason)
            self.publish(Event(EventType.TRANSACTION_END, {"reason": reason}))
        if self.shared is not None:
            if self.end_seen is None:  # one for every caller: an end asked here may be carried out here too
                self.end_seen = anyio.Event()  # (this node took the turns over meanwhile, and ends it again)
            seen = self.end_seen
            # (a node lacking one of the agents takes the turns over only after they stayed free for a
            # handover more: ``Succession._defer``; its ends wait for that too)
            wait = END_GRACE_SECONDS + 2 + self.shared.handover * (2 if self.absent_agents else 1) + 1
            with anyio.move_on_after(wait, shield=True):
                await seen.wait()
            if not seen.is_set():  # nobody runs it, or the bus is away: it ends here regardless
                logger.warning("transaction %s: its end did not come back through the log", self.id)
                self.ended = True
        self.save(end_reason=reason)

    async def stop_turns(self, reason: str, *, hooks: str | None = None) -> None:
        """Unqueue the waiting messages, cancel the runs and tool calls and wait for them (bounded);
        with ``hooks``, call each agent's ``on_end`` with it."""
        self.unqueue_all(reason)
        runs = list(self.runs.values())
        for run in runs:
            run.scope.cancel()
        calls = self.tools.cancel_transaction(self.id, reason) if self.tools else []
        with anyio.move_on_after(END_GRACE_SECONDS, shield=True):
            for run in runs:
                await run.wait()
            for call in calls:
                await call.finished.wait()
            for slot in self.agents.values() if hooks is not None else ():
                await self._call_end_hook(slot, reason if hooks is None else hooks)

    async def _call_end_hook(self, slot: AgentSlot, reason: str) -> None:
        try:
            await slot.instance.on_end(reason)
        except Exception:
            logger.exception("agent %r failed in on_end of transaction %s", slot.name, self.id)
