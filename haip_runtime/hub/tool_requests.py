"""Handlers of tools: TOOL_LIST, TOOL_SCHEMA, a member's own TOOL_CALL, TOOL_UPDATE (approvals and
input), TOOL_CANCEL; and what members are told when an MCP server comes, goes or changes its tools.

Every call goes through the ``ToolProxy``, as an agent's would; a member sees and calls only the
tools of the transaction's agents that their role allows.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel

from haip_runtime.agents.registry import AgentSpec
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext, check_open
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, Event, new_id
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.session.session import Session
from haip_runtime.tools.proxy import ToolView

logger = logging.getLogger(__name__)

#: How the agents' TOOL_LIST marks one that hears members' audio (a client offers a microphone for it).
HEARS = {"hearsAudio": True}


async def tool_list(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    if envelope.transaction is None:
        permissions = session.principal.permissions
        tools = [
            p.ToolEntry(name=name, description=spec.description, annotations=HEARS if spec.hears else None)
            for name, spec in sorted(ctx.agents.items())
            if permissions.may_start(name)
        ]
        session.send(EventType.TOOL_LIST, p.ToolList(tools=tools).dump())
        return
    ctx.send_tool_list(ctx.member_transaction(session, envelope), only=session)


async def server_changed(
    ctx: HubContext, server: str, state: str, error: str | None, *, tools_changed: bool = False
) -> None:
    """An MCP server (re)connected, dropped or changed its tools: tell every transaction using it.

    Members get ``INFO {"event": "mcp.server", "server", "state", "error"}`` (with ``"tools_changed": true``
    when a server connected all along changed its tools) and a fresh TOOL_LIST. In a
    cluster the INFO comes from the node running the transaction's turns, and every node sends its
    members a fresh TOOL_LIST when it comes through the log (``tools_changed_elsewhere``).
    Yields to other tasks every 100 transactions, so thousands of them never stall the loop.
    """
    for count, transaction in enumerate(list(ctx.transactions.live.values()), 1):
        if count % 100 == 0:
            await anyio.lowlevel.checkpoint()
        if not transaction.ended and any(server in slot.tool_servers for slot in transaction.agents.values()):
            if transaction.runs_here:  # in a cluster, the agents' tools are those of the node running them
                info: dict[str, Any] = {"event": "mcp.server", "server": server, "state": state, "error": error}
                if tools_changed:
                    info["tools_changed"] = True
                transaction.publish(Event(EventType.INFO, info))  # to members on every node
            ctx.send_tool_list(transaction)


def visible_tool(ctx: HubContext, session: Session, envelope: Envelope, name: str) -> tuple[Transaction, ToolView]:
    transaction = ctx.member_transaction(session, envelope)
    for tool in ctx.transaction_tools(transaction, session):
        if tool.name == name:
            return transaction, tool
    code = ErrorCode.TOOL_NOT_FOUND
    if ctx.tools is not None and not session.principal.permissions.may_use_tool(name):
        code = ErrorCode.UNAUTHORIZED
    message = f"you may not use {name!r}" if code == ErrorCode.UNAUTHORIZED else f"no tool {name!r} here"
    raise ProtocolError(code, message, related_id=envelope.id)


async def tool_schema(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    request = parse_payload(envelope, p.ToolSchemaRequest)
    if envelope.transaction is None:
        spec = ctx.agents.get(request.tool)
        if spec is None or not session.principal.permissions.may_start(request.tool):
            raise ProtocolError(ErrorCode.TOOL_NOT_FOUND, f"no agent {request.tool!r}", related_id=envelope.id)
        schema = {"name": spec.name, "description": spec.description, "inputSchema": agent_input(spec)}
        session.send(EventType.TOOL_SCHEMA, {"tool": request.tool, "schema": schema})
        return
    transaction, tool = visible_tool(ctx, session, envelope, request.tool)
    session.send(EventType.TOOL_SCHEMA, {"tool": tool.name, "schema": tool.schema()}, transaction=transaction.id)


async def tool_call(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    """A member calls a tool directly (PROTOCOL.md section 8), through the same proxy as agents."""
    request = parse_payload(envelope, p.ToolCall)
    transaction, server = callable_tool(ctx, session, envelope, request.tool)
    check_open(transaction, envelope.id)
    assert ctx.tools is not None
    made = (
        transaction.called_before(session.user, request.call_id, request.tool, request.params)
        if request.call_id
        else None
    )
    if made is not None:
        # The same call again (a client sending anew what a session lost to a restart had not acknowledged):
        # taken once, as a message is (a reviewer's find: a tool with side effects ran twice). Its end goes to
        # the sender again, so a client waiting for it is answered (one still running ends for every member).
        logger.info("transaction %s: call %s came again; taken once", transaction.id, request.call_id)
        if made.type == EventType.TOOL_DONE:
            session.send(EventType.TOOL_DONE, made.payload, transaction=transaction.id, channel=made.channel)
        return
    request = request.model_copy(update={"call_id": request.call_id or new_id()})
    # In a cluster the id may be a call made on another node, the agents' included (a prober's find: reused
    # there while it waited for an approval, the approval ran the reuser's call).
    shared = transaction.shared
    elsewhere = shared is not None and (request.call_id in shared.open_calls or request.call_id in shared.waiting_calls)
    session.claim_tool_call(envelope.id)
    if elsewhere or not ctx.tools.reserve(transaction.id, str(request.call_id)):
        session.release_tool_call()
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"call_id {request.call_id!r} is already in use",
            related_id=envelope.id,
            detail={"where": "/payload/call_id"},
        )
    ctx.spawn(direct_call, ctx, transaction, session, server, request)


def callable_tool(ctx: HubContext, session: Session, envelope: Envelope, name: str) -> tuple[Transaction, str]:
    """The transaction and server of a tool a member may call: one it sees, or one of a server that is
    down (that call ends in TOOL_DONE SERVER_UNAVAILABLE, exactly as an agent's call would)."""
    try:
        transaction, tool = visible_tool(ctx, session, envelope, name)
        return transaction, tool.server
    except ProtocolError as error:
        transaction = ctx.member_transaction(session, envelope)
        server = name.partition(".")[0]
        used = {each for slot in transaction.agents.values() for each in slot.tool_servers}
        if error.code != ErrorCode.TOOL_NOT_FOUND or ctx.tools is None or not ctx.tools.is_down(server, used):
            raise
        return transaction, server


async def direct_call(
    ctx: HubContext, transaction: Transaction, session: Session, server: str, request: p.ToolCall
) -> None:
    def emit(type: str, payload: dict[str, Any] | str, *, channel: str = Channel.SYSTEM) -> None:
        transaction.publish(Event(type, payload, channel=channel))

    assert ctx.tools is not None
    try:
        if ctx.ready is not None:
            await ctx.ready([server])  # just after start-up: the server may still be connecting
        await ctx.tools.call(
            request.tool,
            request.params,
            transaction_id=transaction.id,
            run_id=None,
            allowed_servers=[server],
            caller=session.user,
            emit=emit,
            permissions=session.principal.permissions,
            call_id=request.call_id,
        )
    finally:
        session.release_tool_call()


async def tool_update(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    update = parse_payload(envelope, p.ToolUpdate)
    answer = {k: v for k, v in update.dump().items() if k in ("decision", "reason", "input")}
    if ctx.tools is None or not answer:
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "TOOL_UPDATE from a client needs decision or input",
            related_id=envelope.id,
            detail={"where": "/payload"},
        )
    ctx.answer_call(transaction, update.call_id, session.user, answer, envelope.id)


async def tool_cancel(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    request = parse_payload(envelope, p.ToolCancel)
    if ctx.tools is None:
        raise ProtocolError(ErrorCode.INVALID_PAYLOAD, "no tool calls here", related_id=envelope.id)
    ctx.cancel_call(transaction, request.call_id, session.user, request.reason, envelope.id)


def agent_input(spec: AgentSpec) -> dict[str, Any]:
    schema = spec.cls.input_schema
    return {"type": "string"} if schema is None else schema.model_json_schema()


def tools_changed_elsewhere(ctx: HubContext, transaction: Transaction) -> None:
    """Another node announced a change of an MCP server in ``transaction``: a fresh TOOL_LIST here."""
    ctx.send_tool_list(transaction)
