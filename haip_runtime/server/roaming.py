"""Sessions that outlive their node (``[cluster]``): resumed on any node, POSTs to them taken by any node.

- **Mirrored.** Each session this node admits is mirrored to its window in Redis (``mirror.py``).
- **Taken over.** A resume (a ``HAI`` with ``last_rx_seq``, SSE ``Last-Event-ID`` or ``?session=``)
  naming a session this node does not hold looks for its window (``ReplayStreams.take_over``). If the
  node that holds it still listens (a client that reconnected through a load balancer), it is asked
  to let the session go: it flushes what it recorded, leaves the session's transactions without a
  word to the others, closes the old connection and answers; unless the resume would fail there
  (``ahead``, ``too_old``): then it keeps the session and says why, and the resume fails here. Then
  this node claims the window (from then on the old node's mirroring is refused: two nodes never both
  deliver to the session; a dead node's session is claimed at the first look), reads what the client
  missed, makes the session with the same id, seqs, inbound order and recent inbound ids (dedup), and
  rejoins its transactions: each from the last tseq the session was sent there, so what was published
  after the old node died reaches the client once, after the frames it missed. The caller attaches it as any resume.
- **POSTs forwarded.** ``POST /haip/sse/{session}`` at a node that does not hold the session is sent to
  the node that does, on that node's channel (``Bus.tell``); 202 once it was handed over (a listening
  node got it), 404 ``RESUME_FAILED`` if no node holds the session.

Notices on a node's channel: ``release <session> <asking node> <last seq the client has>``, answered
``released <session>`` or, when that resume would fail at the holder, ``kept <session> <reason>``; and
``post ["<session>", "<user>"]`` followed by a newline and the request's body; those of the `/mcp`
door's sessions (``mcp...``) go to ``on_mcp`` (``mcp_relay.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from haip_runtime.auth.tokens import Principal
from haip_runtime.cluster import Bus, Claimed, ReplayOutcome, ReplayRead, Taken
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ClusterError, DecodeError, ProtocolError
from haip_runtime.hub.router import Hub
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol.events import ALL_EVENTS, CloseCode, ErrorCode
from haip_runtime.server.fleet import Fleet
from haip_runtime.server.mirror import WindowMirror, parse_inbound, unwire
from haip_runtime.session.session import Session
from haip_runtime.transports.base import Inbound
from haip_runtime.transports.sse import parse_batch

logger = logging.getLogger(__name__)

#: How long a node taking a session over waits for the old node (still listening) to let it go.
HANDOVER_SECONDS = 2.0
#: The most nodes' sessions a new session asks to make room for it (``make_room``), one after the other.
MAX_ASKED = 3
#: How long a POST forwarded to the node holding its session waits to hear whether it was taken there (a
#: node of a release before this answer never says: taken, as it was then).
FORWARD_SECONDS = 2.0
#: How long a rejoin waits for this node's copy of a transaction to catch up with what the session was sent.
REJOIN_SECONDS = 5.0
#: How long a handshake waits for its new session's window to reach Redis (one flush) before it goes on.
PUBLISH_SECONDS = 1.0
REJOIN_CHECK = 0.05
#: Hands POSTed envelopes to the stream serving a session of this node (``doors.py``); ``False`` if none.
LocalPost = Callable[[str, str, list[Inbound]], Awaitable[bool]]


class Roaming:
    """This node's part in sessions moving between nodes; entered after the ``Fleet``, before the hub."""

    def __init__(self, config: HaipConfig, fleet: Fleet, hub: Hub, metrics: Metrics) -> None:
        self.config = config
        self.fleet = fleet
        self.hub = hub
        self.metrics = metrics
        self.mirror: WindowMirror | None = None
        #: Where POSTs forwarded here go (set by the SSE door).
        self.local_post: LocalPost | None = None
        #: Where the `/mcp` door's notices go (``mcp_relay.McpRelay.notice``), when it is served.
        self.on_mcp: Callable[[bytes, bytes], None] | None = None
        #: Take-overs waiting for the node holding the session to let it go: (answered, [why it kept it]).
        self._released: dict[str, tuple[anyio.Event, list[str]]] = {}
        #: What this node asked other nodes (a forwarded POST, room for a session) and is not answered yet,
        #: by ticket: (answered, [yes or no]).
        self._posted: dict[str, tuple[anyio.Event, list[bool]]] = {}
        self._stack = AsyncExitStack()
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        bus = self.bus
        async with AsyncExitStack() as stack:
            self.mirror = WindowMirror(bus, self._let_go)
            stack.push_async_callback(self._last_flush)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            stack.callback(setattr, self, "_tg", None)  # (``spawn`` starts nothing once it is gone)
            self._tg.start_soon(self.mirror.run)
            bus.feed.on_notice = self._notice
            stack.callback(setattr, bus.feed, "on_notice", None)
            self.hub.sessions.roaming = self
            stack.callback(setattr, self.hub.sessions, "roaming", None)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._stack.aclose()

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in a task that lives as long as this node follows the bus (not if it stopped)."""
        if self._tg is not None:
            self._tg.start_soon(func, *args)

    @property
    def bus(self) -> Bus:
        assert self.fleet.bus is not None, "roaming is entered after the fleet"
        return self.fleet.bus

    async def _last_flush(self) -> None:
        """Stopping: what the sessions recorded goes to Redis, so their clients resume on another node."""
        if self.mirror is not None:
            with anyio.move_on_after(2, shield=True):
                try:
                    await self.mirror.flush()
                except ClusterError as error:
                    logger.warning("cluster: stopping without mirroring the sessions' last frames: %s", error)

    # --- Roaming (the session registry's) ----------------------------------------------------------

    def admitted(self, session: Session) -> None:
        if self.mirror is not None and session.id not in self.mirror:
            self.mirror.track(session)

    async def published(self, session: Session) -> None:
        if self.mirror is not None and not self.mirror.made(session.id):  # (a session taken over: already there)
            with anyio.move_on_after(PUBLISH_SECONDS):
                try:
                    await self.mirror.flush(lingering=False)  # the new window; others' ids may linger on
                except ClusterError:
                    pass  # the flusher keeps trying; meanwhile only this node knows the session

    def dropped(self, session: Session) -> None:
        if self.mirror is not None:
            self.mirror.forget(session, delete=True)

    async def adopt(self, session_id: str, principal: Principal, last_seq: int, related_id: str) -> Session | None:
        try:
            return await self._take_over(session_id, principal, last_seq)
        except ClusterError as error:
            raise ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"the session could not be looked for in the cluster ({error.message}); started a new one",
                related_id=related_id,
                detail={"reason": "unavailable", "epoch": self.hub.sessions.epoch},
            ) from error

    async def _take_over(self, session_id: str, principal: Principal, last_seq: int) -> Session | None:
        bus = self.bus
        taken = await self._claim(session_id, principal.user, last_seq)
        if taken is Taken.UNKNOWN:
            # Gone, or Redis lost everything: then the epoch is new, and the failure says "restarted"
            # (with the transactions to rejoin) even before this node's next heartbeat reads it.
            self.hub.sessions.epoch = await bus.nodes.epoch()
            return None
        if not isinstance(taken, tuple):
            return None
        claimed, read = taken
        if read.outcome is not ReplayOutcome.OK:
            raise ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"the session's window in the cluster cannot resume after seq {last_seq} ({read.outcome})",
                detail={"where": "/payload/last_rx_seq", "reason": str(read.outcome)},
            )
        session = self._make(session_id, principal, claimed.fields)
        session.questions.restore(claimed.fields.get("q", ""))
        frames = [(seq, *unwire(kept)) for seq, kept in read.envelopes]
        session.carry_on(frames, read.last, parse_inbound(claimed.fields.get("in", "")), claimed.ids)
        assert self.mirror is not None
        self.mirror.track(session, epoch=claimed.epoch, state=claimed.fields)
        rejoined = await self._rejoin(session, principal, json.loads(claimed.fields.get("tx", "{}")))
        # Asked in words and not answered: the calls the log shows waiting still (the window may be behind).
        session.questions.retain({call for found in rejoined if found.shared for call in found.shared.waiting_calls})
        logger.info("session %s of %r taken over from node %s", session_id, principal.user, claimed.holder)
        return session

    async def _claim(self, session_id: str, user: str, last_seq: int) -> tuple[Claimed, ReplayRead] | Taken:
        """The session claimed for this node and its window read (``take_over``: two round trips); if the
        node holding it still listens, it is asked to let the session go first, and given
        ``HANDOVER_SECONDS`` to."""
        replay = self.bus.replay
        # Before the notice: the answer may come first.
        answered, kept = self._released[session_id] = (anyio.Event(), [])
        try:
            taken = await replay.take_over(session_id, user, last_seq)
            if taken is not Taken.ASKED:
                return taken
            with anyio.move_on_after(HANDOVER_SECONDS):
                await answered.wait()
        finally:
            self._released.pop(session_id, None)
        if kept:  # the holder keeps it, with its connection: this resume would fail there as here
            raise ProtocolError(
                ErrorCode.RESUME_FAILED,
                f"the session cannot resume after seq {last_seq} ({kept[0]})",
                detail={"where": "/payload/last_rx_seq", "reason": kept[0]},
            )
        return await replay.take_over(session_id, user, last_seq, force=True)

    def _make(self, session_id: str, principal: Principal, fields: dict[str, str]) -> Session:
        accepted = frozenset(json.loads(fields.get("accepted", "[]"))) or frozenset(ALL_EVENTS)
        config = self.config
        session = Session(
            principal, accepted, config.session, id=session_id, flow=config.flow_control, limits=config.limits
        )
        session.on_sent = self.metrics.sent
        session.binary_frames = fields.get("binary") == "1"
        return session

    async def _rejoin(self, session: Session, principal: Principal, tseqs: dict[str, int]) -> list[Transaction]:
        """Back into each transaction the session was in, with every event after the last it was sent;
        the transactions it is back in."""
        rejoined: list[Transaction] = []
        for transaction_id, tseq in tseqs.items():
            found = await self.hub.transactions.find(transaction_id, principal)
            if not isinstance(found, Transaction) or found.ended:
                continue
            rejoined.append(found)
            await self._reached(found, int(tseq))
            history, _ = await found.catch_up(int(tseq))
            found.add_member(session)  # no await since the catch-up: nothing falls between
            for event in history:
                if session.id not in event.exclude:
                    session.deliver(event)
        return rejoined

    @staticmethod
    async def _reached(transaction: Transaction, tseq: int) -> None:
        """Wait (briefly) until this node's copy of ``transaction`` is at ``tseq``, the last the session was
        sent: a transaction just brought back from the store starts a little behind it and has its newest
        events delivered again from the bus, which the member must not get twice. Woken by each event
        logged; checked every ``REJOIN_CHECK`` too, as a number taken by a control entry logs nothing."""
        if transaction.tseq >= tseq:
            return
        logged = anyio.Event()
        transaction.watchers.append(lambda event: logged.set())
        watch = transaction.watchers[-1]
        try:
            with anyio.move_on_after(REJOIN_SECONDS):
                while transaction.tseq < tseq:
                    with anyio.move_on_after(REJOIN_CHECK):
                        await logged.wait()
                    logged = anyio.Event()
        finally:
            transaction.watchers.remove(watch)
        if transaction.tseq < tseq:
            logger.warning(
                "transaction %s: at tseq %d here, not %d; rejoined from there", transaction.id, transaction.tseq, tseq
            )

    # --- notices from other nodes ------------------------------------------------------------------

    def _notice(self, message: bytes) -> None:
        verb, _, rest = message.partition(b" ")
        if self._tg is None:
            return
        if verb == b"release":
            session_id, _, tail = rest.decode(errors="replace").partition(" ")
            asker, _, after = tail.partition(" ")  # (``after``: not sent by a node of an earlier version)
            self._tg.start_soon(self._release, session_id, asker, int(after) if after.isdecimal() else None)
        elif verb in (b"released", b"kept"):
            session_id, _, reason = rest.decode(errors="replace").partition(" ")
            waiting = self._released.get(session_id)
            if waiting is not None:
                if verb == b"kept":
                    waiting[1].append(reason or "kept")
                waiting[0].set()
        elif verb in (b"post", b"postback"):
            self._tg.start_soon(self._take_post, rest)
        elif verb == b"evict":
            try:
                session_id, user, asker, ticket = (str(part) for part in json.loads(rest))
            except (ValueError, TypeError):
                logger.warning("cluster: a request to make room with a bad body %r", rest[:80])
                return
            self._tg.start_soon(self._evict, session_id, user, asker, ticket)
        elif verb in (b"evicted", b"posted"):  # another node's yes or no to a ticket of this node's
            ticket, _, said = rest.decode(errors="replace").partition(" ")
            asked = self._posted.get(ticket)
            if asked is not None:
                asked[1].append(said == "1")
                asked[0].set()
        elif verb.startswith(b"mcp") and self.on_mcp is not None:
            self.on_mcp(verb, rest)
        else:
            logger.warning("cluster: an unknown notice %r", message[:40])

    async def _release(self, session_id: str, asker: str, after: int | None = None) -> None:
        """Another node takes this session over for a resume after seq ``after``: let it go, with everything
        it recorded in its window (once a take-over of it under way here is done: it is let go then). Unless
        that resume would fail here (``ahead``, ``too_old``): then the session stays, with its connection, as
        a failed resume leaves it on one node (an earlier note's gap: the user's live connection closed)."""
        async with self.hub.sessions.moving(session_id):
            session = self.hub.sessions.get(session_id)
            refusal = session.resume_refusal(after) if session is not None else None
            if refusal is None:
                await self._let_go_of(session_id)
        reason = None if refusal is None else str((refusal.detail or {}).get("reason", "refused"))
        answer = f"released {session_id}" if reason is None else f"kept {session_id} {reason}"
        try:
            await self.bus.tell(asker, answer.encode())
        except ClusterError as error:
            logger.info("cluster: could not tell %s that session %s was let go: %s", asker, session_id, error)

    async def _let_go_of(self, session_id: str) -> None:
        session = self.hub.sessions.get(session_id)
        if session is not None:
            assert self.mirror is not None
            self.mirror.hand_over(session)
            self._let_go(session, flushed=False)
            try:
                await self.mirror.flush()  # what the session recorded, up to its connection's close
            except ClusterError as error:
                logger.warning("cluster: session %s let go without its last frames: %s", session_id, error)
            self.mirror.forget(session, delete=False)

    def _let_go(self, session: Session, *, flushed: bool = True) -> None:
        """The session goes on at another node: out of this node's registry and transactions (quietly),
        its slot handed over (the other node holds it under the same id), its connection closed."""
        self.hub.sessions.give_up(session)
        self.fleet.handed_over(session.user, session.id)
        if session.outbox is not None:
            session.outbox.close(CloseCode.NORMAL, "the session was resumed on another node")
        if flushed and self.mirror is not None:
            self.mirror.forget(session, delete=False)

    # --- room for a user's new session, made on the node holding their oldest disconnected one ------

    async def make_room(self, user: str) -> bool:
        """Ask the nodes holding ``user``'s sessions, one session at a time, to drop one that waits for its
        client (disconnected), releasing its slot before they answer; ``True`` once one did. An operator's
        find: a node holding none of the user's sessions (just restarted, or the balancer's pick) refused
        every new session of a user whose disconnected ones were all on other nodes."""
        try:
            holders = await self.fleet.holders(user)
        except ClusterError:
            return False
        asked = 0
        for session_id in holders:
            if session_id in self.hub.sessions.sessions:
                continue  # (this node's own: ``admit`` dropped what it could of them)
            if asked == MAX_ASKED:  # (a handshake waits for the answers: nodes that do not answer cost 2 s each)
                return False
            asked += 1
            try:
                held = await self.bus.replay.holder(session_id)
                if held is None or held[1] != user or held[0] == self.bus.node_id:
                    continue
                asking = functools.partial(_notice, "evict", [session_id, user, self.bus.node_id])
                if await self._ask(held[0], asking):
                    return True
            except ClusterError:
                return False
        return False

    async def _ask(self, node: str, notice: Callable[[str], bytes]) -> bool | None:
        """Send ``node`` the notice made with a new ticket, and wait (``FORWARD_SECONDS``) for its yes or no
        to that ticket; ``False`` if ``node`` does not listen, ``None`` if it did not answer in time."""
        ticket = secrets.token_hex(8)
        answered, said = self._posted[ticket] = (anyio.Event(), [])
        try:
            if not await self.bus.tell(node, notice(ticket)):
                return False
            with anyio.move_on_after(FORWARD_SECONDS):
                await answered.wait()
            return said[0] if said else None
        finally:
            self._posted.pop(ticket, None)

    async def _evict(self, session_id: str, user: str, asker: str, ticket: str) -> None:
        """Another node makes room for ``user``'s new session: drop this one if it waits for its client."""
        session = self.hub.sessions.get(session_id)
        done = session is not None and session.user == user and session.outbox is None
        if done and session is not None:
            logger.info("cluster: session %s of %r dropped to make room on node %s", session_id, user, asker)
            self.hub.sessions.drop(session)
            await self.fleet.release_now(user, session_id)
        try:
            await self.bus.tell(asker, f"evicted {ticket} {int(done)}".encode())
        except ClusterError as error:
            logger.info("cluster: could not answer node %s making room: %s", asker, error)

    # --- POSTs at a node that does not hold the session --------------------------------------------

    async def stream_opened(self, session_id: str, user: str) -> None:
        """A new SSE stream here: noted, so that its first POSTs (sent before the session has a window)
        are forwarded here from any node. Redis away: those POSTs must reach this node themselves."""
        try:
            await self.bus.replay.stream_opened(session_id, user)
        except ClusterError as error:
            logger.warning("cluster: the stream of session %s is not noted: %s", session_id, error)

    async def forward(self, session_id: str, user: str, body: bytes) -> bool:
        """Send a POST's body to the node holding ``user``'s session; ``False`` if no node (listening) does."""
        holder = await self.bus.replay.holder(session_id) or await self.bus.replay.stream_holder(session_id)
        if holder is None or holder[1] != user or holder[0] == self.bus.node_id:
            return False

        # "postback": answered with whether the holder took it (a prober's find: a POST to a WebSocket session
        # held elsewhere was answered 202, and dropped there). A node from before it does not know the verb
        # and never answers: then the POST goes again as "post", which such a node takes.
        def postback(ticket: str) -> bytes:
            return b"postback " + json.dumps([session_id, user, self.bus.node_id, ticket]).encode() + b"\n" + body

        taken = await self._ask(holder[0], postback)
        if taken is not None:
            return taken
        return await self.bus.tell(holder[0], b"post " + json.dumps([session_id, user]).encode() + b"\n" + body)

    async def _take_post(self, message: bytes) -> None:
        header, _, body = message.partition(b"\n")
        try:
            session_id, user, *reply = json.loads(header)  # (reply: the asking node and its ticket)
        except (ValueError, TypeError):
            logger.warning("cluster: a forwarded POST with a bad header %r", header[:80])
            return
        items: list[Inbound]
        try:
            items = parse_batch(body, self.config.server.max_frame_bytes)
        except DecodeError as error:
            items = [error]
        taken = self.local_post is not None and await self.local_post(str(user), str(session_id), items)
        if not taken:
            logger.info("cluster: a POST forwarded to session %s found no SSE stream of it here", session_id)
        if len(reply) == 2:
            try:
                await self.bus.tell(str(reply[0]), f"posted {reply[1]} {int(taken)}".encode())
            except ClusterError as error:
                logger.info("cluster: could not answer a forwarded POST: %s", error)


def _notice(verb: str, fields: list[str], ticket: str) -> bytes:
    """A notice that asks for a yes or no: ``verb`` with ``fields`` and the ticket, as JSON."""
    return f"{verb} {json.dumps([*fields, ticket])}".encode()
