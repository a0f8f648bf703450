"""Handlers of a transaction's life: TRANSACTION_START, TRANSACTION_JOIN (``{agent}`` adds an agent),
TRANSACTION_END.

A start checks the agent and the user's quota, makes the transaction and greets with
``on_start``; a join sends the history after ``since`` and then the live stream, with nothing
in between; an end stops the turns and lets the transaction leave memory.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from haip_runtime.agents.api import Agent
from haip_runtime.agents.registry import AgentSpec
from haip_runtime.auth.tokens import Principal
from haip_runtime.conversation.members import Member, describe
from haip_runtime.conversation.runs import AgentSlot
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, Event, parse_seq, secret_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.session.session import Session

logger = logging.getLogger(__name__)


async def transaction_start(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    request = parse_payload(envelope, p.TransactionStart)
    await start(ctx, session, request, envelope.id, envelope.transaction, envelope.thread_id)


async def start(
    ctx: HubContext,
    member: Member,
    request: p.TransactionStart,
    related_id: str,
    reference: str | None = None,
    thread_id: str | None = None,
) -> Transaction:
    """Start a transaction of ``member`` with the agent ``request`` names (any door: a session, an MCP caller)."""
    if not request.agent_name:
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "TRANSACTION_START names no agent: give toolName (or agent)",
            related_id=reference or related_id,
            detail={"where": "/payload/toolName"},
        )
    spec = ctx.agents.get(request.agent_name)
    if spec is not None and not member.principal.permissions.may_start(spec.name):
        message = f"you may not start {spec.name!r}"
        raise ProtocolError(ErrorCode.UNAUTHORIZED, message, related_id=reference or related_id)
    if spec is None:
        raise ProtocolError(
            ErrorCode.AGENT_NOT_FOUND,
            f"no agent named {request.agent_name!r}",
            related_id=reference or related_id,
        )
    return await begin(ctx, member, spec, request.thread_id or thread_id, request.params, reference, related_id)


async def begin(
    ctx: HubContext,
    member: Member,
    spec: AgentSpec,
    thread_id: str | None,
    params: dict[str, Any],
    reference: str | None,
    related_id: str,
    id: str | None = None,
) -> Transaction:
    """Make a transaction with ``member`` in it and ``spec``'s agent, announce it, greet: what a
    TRANSACTION_START does, for every door, after the user's quota of open transactions."""
    async with room_made(ctx, member.principal, related_id):
        transaction = create(ctx, member, spec, thread_id, params, reference, id, related_id)
    waiting = transaction.shared.unavailable() if transaction.shared is not None else None
    if waiting is not None:  # its TRANSACTION_START reaches the member only once Redis answers: say why now
        # Not related to the request (the start did not fail), nor in the transaction (not known yet): the
        # transaction and the request's reference are in its detail (an operator's find: only in the text).
        message = (
            f"the cluster's Redis does not answer ({waiting}): transaction {transaction.id} is started, and "
            "its start and what is said in it reach its members, in order, once Redis answers"
        )
        detail = {"transaction": transaction.id, **({"reference": reference} if reference else {})}
        member.deliver(Event(EventType.ERROR, error_body(ErrorCode.STORAGE_UNAVAILABLE, message, detail=detail)))
    return transaction


#: The reason a transaction ended to make room for its owner's new one says.
REPLACED = "replaced: its owner started a new transaction past limits.transactions_per_user"


@asynccontextmanager
async def room_made(ctx: HubContext, principal: Principal, related_id: str) -> AsyncIterator[None]:
    """``limits.transactions_per_user``, around the making of ``principal``'s new transaction: at the limit,
    their least recently active one with nobody in it and nothing running ends first (its history stays
    readable), as a new session replaces the user's oldest disconnected one; ``RATE_LIMITED`` if none
    can. Clients that never end what they start (the reference CLI, MCP and AG-UI callers, which have
    no way to) were otherwise refused for good at their limit. The user's starts go one at a time
    through this, so the room one makes is its own."""
    async with ctx.transactions.starting(principal.user):
        passed: set[str] = set()
        while (replaced := await ctx.transactions.room_for(principal.user, related_id, passed=passed)) is not None:
            found = await ctx.transactions.find(replaced, principal)  # brought back if it left memory
            if not isinstance(found, Transaction) or not ctx.transactions.vacant(found):
                passed.add(replaced)  # ended meanwhile (or its log says so), or someone came back: the next
                continue
            logger.info("transaction %s ends to make room for a new one of %r", replaced, principal.user)
            await end(ctx, found, REPLACED)
            break
        yield


def create(
    ctx: HubContext,
    member: Member,
    spec: AgentSpec,
    thread_id: str | None,
    params: dict[str, Any],
    reference: str | None,
    id: str | None = None,
    related_id: str = "",
) -> Transaction:
    """``begin`` without the quota check, and without an await: for a door that checked the quota
    itself and must make the transaction in the same step as it found none (the AG-UI door)."""
    transaction_id = id or secret_id()
    try:  # first: a plugin that fails to be made leaves no transaction behind (nor, in a cluster, its log)
        slot = ctx.transactions.slot(spec, transaction_id, member.user, params)
    except Exception as exc:
        logger.exception("agent %r could not be made for a new transaction: its class raised", spec.name)
        message = f"agent {spec.name!r} could not be started: {type(exc).__name__} (the server log says more)"
        raise ProtocolError(ErrorCode.INTERNAL_ERROR, message, related_id=reference or related_id) from exc
    transaction = ctx.transactions.new(member.user, thread_id, id=transaction_id)
    logger.info("transaction %s started by %r with agent %r", transaction.id, member.user, spec.name)
    transaction.add_member(member)
    transaction.add_agent(slot)
    ctx.transactions.add(transaction)
    if ctx.joined is not None:
        ctx.joined(member)
    reply = p.TransactionStarted(referenceId=reference, agent=spec.name, thread_id=transaction.thread_id)

    def tell() -> None:
        ctx.tell_servers_not_ready(transaction, member)
        ctx.send_tool_list(transaction)

    transaction.publish(Event(EventType.TRANSACTION_START, reply.dump()), then=tell)
    greet(transaction, slot, member)
    return transaction


def greet(transaction: Transaction, slot: AgentSlot, member: Member) -> None:
    if type(slot.instance).on_start is not Agent.on_start:
        transaction.start_run(slot, member, "", {}, "on_start")


async def transaction_join(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    """Join a transaction (one's own, one joined before, or another's with ``may_join_others``):
    the reply, the history after ``since``, then the live stream. ``{agent}`` adds an agent."""
    request = parse_payload(envelope, p.TransactionJoin)
    since = 0 if request.since is None else parse_seq(request.since, "since", envelope.id)
    found = await ctx.transactions.find(envelope.transaction or "", session.principal)
    if found is None:
        raise ProtocolError(
            ErrorCode.TRANSACTION_NOT_FOUND, f"no transaction {envelope.transaction!r}", related_id=envelope.id
        )
    if not isinstance(found, Transaction) or found.ended:
        raise ended_join(envelope)
    transaction = found
    if request.agent:
        await add_agent(ctx, session, envelope.id, transaction, request.agent)
        return
    transaction.check_room(session, envelope.id)
    history, omitted = await transaction.catch_up(since)
    if transaction.ended:  # meanwhile (its owner's new one took its place, say): no member of an ended one
        raise ended_join(envelope)
    admit(ctx, session, transaction, history, omitted)


def ended_join(envelope: Envelope) -> ProtocolError:
    return ProtocolError(
        ErrorCode.TRANSACTION_NOT_FOUND,
        f"transaction {envelope.transaction} has ended; its history is at "
        f"GET /haip/transactions/{envelope.transaction}/events",
        related_id=envelope.id,
    )


def admit(ctx: HubContext, session: Session, transaction: Transaction, history: list[Event], omitted: int) -> None:
    """Make ``session`` a member: the TRANSACTION_JOIN reply, ``history`` (its latest events that fit the
    session's replay window: ``fitting``), the announcement, its TOOL_LIST.

    No await in here: the member is added exactly after the history it was sent."""
    kept = fitting(history, session.window.max_bytes // HISTORY_SHARE)
    history, omitted = history[len(history) - kept :], omitted + len(history) - kept
    new_user = transaction.add_member(session)
    if ctx.joined is not None:
        ctx.joined(session)
    joined = p.TransactionJoined(members=transaction.member_users, agents=transaction.agent_names)
    reply = {**joined.dump(), "tseq": str(transaction.tseq), "omitted": omitted}
    session.send(EventType.TRANSACTION_JOIN, reply, transaction=transaction.id)
    for event in history:
        session.deliver(event)
    if new_user:
        announce(transaction, session)
    ctx.tell_servers_not_ready(transaction, session)
    ctx.send_tool_list(transaction, only=session)


#: A join's history takes at most this share (1/n) of the session's replay window (``session.replay_window_bytes``).
HISTORY_SHARE = 2
#: What an envelope's head adds to its payload's JSON, about (ids, seqs, channel, type).
ENVELOPE_HEAD = 300


def fitting(history: list[Event], budget: int) -> int:
    """How many of ``history``'s latest events fit in ``budget`` bytes as envelopes (the newest always).

    The session writes a join's history out of its replay window, which is bounded by bytes: a
    history larger than the window lost its own unsent start there, and the client was closed (1013,
    "fell behind the replay window") at every join: a voice tester's conversation of 160 s of spoken
    answers (9.5 MB of base64 audio) could not be opened again. What does not fit is ``omitted``."""
    size = 0
    for count, event in enumerate(reversed(history)):
        size += len(event.payload_json) + ENVELOPE_HEAD
        if size > budget and count:
            return count
    return len(history)


def enter(transaction: Transaction, member: Member, related_id: str) -> None:
    """Make ``member`` (an MCP caller continuing a conversation) a member from now on, announced to the others."""
    transaction.check_room(member, related_id)
    if transaction.add_member(member):
        announce(transaction, member)


def announce(transaction: Transaction, member: Member) -> None:
    joined = p.TransactionJoined(members=transaction.member_users, agents=transaction.agent_names)
    body = {**joined.dump(), "joined": member.user}
    transaction.publish(Event(EventType.TRANSACTION_JOIN, body, exclude=frozenset({member.id})))


async def rejoin(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    """A client of the transaction era reconnects without resume and goes on sending to its transaction
    (PROTOCOL.md section 12): a session that never resumed, sending to an open transaction its user owns
    or was a member of, joins it as with TRANSACTION_JOIN (from now on: the client saw the history).
    Anything else is left to the handler, which answers TRANSACTION_NOT_FOUND, revealing nothing."""
    transaction_id = envelope.transaction or ""
    if session.resumed or ctx.transactions.get_member(transaction_id, session) is not None:
        return
    found = await ctx.transactions.find(transaction_id, session.principal)
    if not isinstance(found, Transaction) or found.ended or session.user not in found.users:
        return
    found.check_room(session, envelope.id)
    logger.info("session %s of %r rejoined transaction %s by sending to it", session.id, session.user, found.id)
    admit(ctx, session, found, [], 0)
    for event in waiting_calls(ctx, found):
        session.deliver(event)  # a question asked before the drop is asked again: it may be answered now


def waiting_calls(ctx: HubContext, transaction: Transaction) -> list[Event]:
    """The recent TOOL_CALL and TOOL_UPDATE events of the calls in ``transaction`` that wait for a member's answer."""
    if ctx.tools is None:
        return []
    waiting = {call_id for (tx, call_id), call in ctx.tools.calls.items() if tx == transaction.id and call.waiting_for}
    return [
        event
        for event in transaction.recent()
        if event.type in (EventType.TOOL_CALL, EventType.TOOL_UPDATE)
        and isinstance(event.payload, dict)
        and event.payload.get("call_id") in waiting
    ]


async def add_agent(ctx: HubContext, member: Member, related_id: str, transaction: Transaction, name: str) -> None:
    spec = ctx.agents.get(name)
    if spec is None:
        raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {name!r}", related_id=related_id)
    if not member.principal.permissions.may_start(name):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {name!r}", related_id=related_id)
    if not transaction.is_member(member):
        raise ProtocolError(
            ErrorCode.TRANSACTION_NOT_FOUND,
            f"join transaction {transaction.id} before adding an agent to it",
            related_id=related_id,
        )
    if transaction.shared is not None and not transaction.runs_here:  # the node running the turns adds it
        transaction.shared.control("add_agent", name=name, member=describe(member))
        return
    attach_agent(ctx, member, transaction, spec)


def attach_agent(ctx: HubContext, member: Member, transaction: Transaction, spec: AgentSpec) -> None:
    """Add ``spec``'s agent (if it is not there yet), tell the members, greet: ``add_agent`` once checked."""
    name = spec.name
    slot = None if name in transaction.agents else ctx.transactions.slot(spec, transaction.id, member.user, {})
    if slot is not None:
        transaction.add_agent(slot)
    joined = p.TransactionJoined(members=transaction.member_users, agents=transaction.agent_names)
    tell = (lambda: ctx.send_tool_list(transaction)) if slot is not None else None
    transaction.publish(Event(EventType.TRANSACTION_JOIN, joined.dump()), then=tell)
    if slot is not None:
        greet(transaction, slot, member)


def mirror_agents(ctx: HubContext, transaction: Transaction, names: list[str]) -> None:
    """In a cluster, agents another node added: their slots here too (this node may run the turns
    next), and a fresh TOOL_LIST for the members here."""
    added = False
    for name in names:
        spec = ctx.agents.get(name)
        if spec is not None and name not in transaction.agents:
            transaction.agents[name] = ctx.transactions.slot(spec, transaction.id, transaction.owner, {})
            added = True
        elif spec is None and name not in transaction.absent_agents:
            logger.warning(
                "transaction %s: agent %r, added on another node, is not configured on this one (every node of"
                " a cluster should run the same agents)",
                transaction.id,
                name,
            )
            transaction.absent_agents.append(name)
    if added:
        ctx.send_tool_list(transaction)


async def transaction_end(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    reason = parse_payload(envelope, p.TransactionEnd).reason or f"ended by {session.user}"
    logger.info("transaction %s ended by %r: %s", transaction.id, session.user, reason)
    ctx.spawn(end, ctx, transaction, reason)  # it waits for turns to stop; the connection reads on meanwhile


async def end(ctx: HubContext, transaction: Transaction, reason: str) -> None:
    await transaction.end(reason)
    for member in list(transaction.members.values()):
        member.transactions.discard(transaction.id)
    ctx.transactions.forget(transaction)
