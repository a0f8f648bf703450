"""Handlers of a transaction's life: TRANSACTION_START, TRANSACTION_JOIN (``{agent}`` adds an agent),
TRANSACTION_END.

A start checks the agent and the user's quota, makes the transaction and greets with
``on_start``; a join sends the history after ``since`` and then the live stream, with nothing
in between; an end stops the turns and lets the transaction leave memory.
"""

from __future__ import annotations

import logging

from haip_runtime.agents.api import Agent
from haip_runtime.conversation.transaction import AgentSlot, Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, Event, parse_seq
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.session.session import Session

logger = logging.getLogger(__name__)


async def transaction_start(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    request = parse_payload(envelope, p.TransactionStart)
    spec = ctx.agents.get(request.agent_name or "")
    if spec is not None and not session.principal.permissions.may_start(spec.name):
        raise ProtocolError(
            ErrorCode.UNAUTHORIZED,
            f"you may not start {spec.name!r}",
            related_id=envelope.transaction or envelope.id,
        )
    if spec is None:
        raise ProtocolError(
            ErrorCode.AGENT_NOT_FOUND,
            f"no agent named {request.agent_name!r}",
            related_id=envelope.transaction or envelope.id,
        )
    await ctx.transactions.check_room(session.user, envelope.id)
    transaction = ctx.transactions.new(session.user, request.thread_id or envelope.thread_id)
    slot = ctx.transactions.slot(spec, transaction, session.user, request.params)  # a failing plugin costs nothing
    logger.info("transaction %s started by %r with agent %r", transaction.id, session.user, spec.name)
    transaction.add_member(session)
    transaction.add_agent(slot)
    ctx.transactions.add(transaction)
    reply = p.TransactionStarted(referenceId=envelope.transaction, agent=spec.name, thread_id=transaction.thread_id)
    transaction.publish(Event(EventType.TRANSACTION_START, reply.dump()))
    ctx.send_tool_list(transaction)
    greet(transaction, slot, session)


def greet(transaction: Transaction, slot: AgentSlot, session: Session) -> None:
    if type(slot.instance).on_start is not Agent.on_start:
        transaction.start_run(slot, session, "", {}, "on_start")


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
        raise ProtocolError(
            ErrorCode.TRANSACTION_NOT_FOUND,
            f"transaction {envelope.transaction} has ended; its history is at "
            f"GET /haip/transactions/{envelope.transaction}/events",
            related_id=envelope.id,
        )
    transaction = found
    if request.agent:
        await add_agent(ctx, session, envelope, transaction, request.agent)
        return
    transaction.check_room(session, envelope.id)
    history, omitted = await transaction.catch_up(since)
    # No await from here on: the member is added exactly after the history it was sent.
    new_user = transaction.add_member(session)
    joined = p.TransactionJoined(members=transaction.member_users, agents=list(transaction.agents))
    reply = {**joined.dump(), "tseq": str(transaction.tseq), "omitted": omitted}
    session.send(EventType.TRANSACTION_JOIN, reply, transaction=transaction.id)
    for event in history:
        session.deliver(event)
    if new_user:
        announce = {**joined.dump(), "joined": session.user}
        transaction.publish(Event(EventType.TRANSACTION_JOIN, announce, exclude=frozenset({session.id})))
    ctx.send_tool_list(transaction, only=session)


async def add_agent(ctx: HubContext, session: Session, envelope: Envelope, transaction: Transaction, name: str) -> None:
    spec = ctx.agents.get(name)
    if spec is None:
        raise ProtocolError(ErrorCode.AGENT_NOT_FOUND, f"no agent named {name!r}", related_id=envelope.id)
    if not session.principal.permissions.may_start(name):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not start {name!r}", related_id=envelope.id)
    if not transaction.is_member(session):
        raise ProtocolError(
            ErrorCode.TRANSACTION_NOT_FOUND,
            f"join transaction {transaction.id} before adding an agent to it",
            related_id=envelope.id,
        )
    slot = None if name in transaction.agents else ctx.transactions.slot(spec, transaction, session.user, {})
    if slot is not None:
        transaction.add_agent(slot)
    joined = p.TransactionJoined(members=transaction.member_users, agents=list(transaction.agents))
    transaction.publish(Event(EventType.TRANSACTION_JOIN, joined.dump()))
    if slot is not None:
        ctx.send_tool_list(transaction)
        greet(transaction, slot, session)


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
