"""What the hub's handlers work with: ``HubContext``, a narrow view of the hub.

Handlers (``lifecycle.py``, ``messages.py``, ``audio.py``, ``tool_requests.py``) are functions of a
context, the sending session and its envelope. The context holds what they share (the config,
the agents, the tool proxy, the transaction registry, the hub's task spawner) and the checks
every topic makes (the sender is a member; the transaction is open; which tools it sees).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from haip_runtime.agents.registry import AgentSpec
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.members import Member
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.voice import SpeechDesk
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.envelope import Envelope, Event
from haip_runtime.protocol.events import ErrorCode, EventType
from haip_runtime.session.session import Session
from haip_runtime.tools.proxy import ToolProxy, ToolView, check_answer

#: How a handler is called; each is bound to the hub's context.
Handler = Callable[[Session, Envelope], Awaitable[None]]


@dataclass(frozen=True)
class HubContext:
    config: HaipConfig
    agents: Mapping[str, AgentSpec]
    tools: ToolProxy | None
    transactions: TransactionRegistry
    #: Run a coroutine function as a task of the hub (turns, tool calls, ends of transactions).
    spawn: Callable[..., None]
    #: Wait for MCP servers still making their first connection (``tools.readiness``); ``None``: nothing to wait for.
    ready: Callable[[Iterable[str]], Awaitable[None]] | None = None
    #: Agents that listen and answer aloud; ``None``: no agent uses speech.
    speech: SpeechDesk | None = None
    #: Told of a member that joined a transaction (a session's record is saved with it: a client
    #: resuming after a crash is told what to rejoin).
    joined: Callable[[Member], None] | None = None

    def member_transaction(self, session: Session, envelope: Envelope) -> Transaction:
        """The transaction the envelope names, if the sender is a member (else not found)."""
        transaction = self.transactions.get_member(envelope.transaction, session)
        if transaction is None:
            named = envelope.transaction
            message = f"no transaction {named!r} for this session" if named else f"{envelope.type} names no transaction"
            raise ProtocolError(ErrorCode.TRANSACTION_NOT_FOUND, message, related_id=envelope.id)
        return transaction

    def open_transaction(self, session: Session, envelope: Envelope) -> Transaction:
        """As ``member_transaction``, and not ended: something is to happen in it."""
        transaction = self.member_transaction(session, envelope)
        check_open(transaction, envelope.id)
        return transaction

    def transaction_tools(self, transaction: Transaction, member: Member) -> list[ToolView]:
        """The MCP tools the transaction's agents may call, as ``member`` may see them."""
        if self.tools is None:
            return []
        return self.tools.visible_tools(_tool_servers(transaction), member.principal.permissions)

    def tell_servers_not_ready(self, transaction: Transaction, member: Member) -> None:
        """To a member just in (started or joined): ``INFO mcp.server`` for each of the transaction's MCP
        servers that is not connected now (connecting, reconnecting, failed), as each change of state is
        told, so a client can tell "no tools" from "tools still coming" (a tester's client could not)."""
        if self.tools is None:
            return
        used = _tool_servers(transaction)
        bridge = self.tools.bridge  # (none yet: the runtime still imports the MCP SDK; every server is to connect)
        statuses = bridge.status() if bridge is not None else {}
        states = {name: (status.state.value, status.error) for name, status in statuses.items()}
        for name in used:
            state, error = states.get(name, ("connecting", None))
            if state != "connected":
                info = {"event": "mcp.server", "server": name, "state": state, "error": error}
                member.deliver(Event(EventType.INFO, info, transaction=transaction.id))

    def send_tool_list(self, transaction: Transaction, only: Member | None = None) -> None:
        """TOOL_LIST of the transaction's tools to each member (or to ``only``), as each may see them."""
        for member in [only] if only is not None else list(transaction.members.values()):
            tools = [tool.entry() for tool in self.transaction_tools(transaction, member)]
            member.deliver(Event(EventType.TOOL_LIST, p.ToolList(tools=tools).dump(), transaction=transaction.id))

    def answer_call(
        self, transaction: Transaction, call_id: str, user: str, answer: dict[str, Any], related_id: str
    ) -> None:
        """A member's answer to a call waiting for one (approval, input): here, or in a cluster to the
        node running the transaction's turns, where the agents' calls are."""
        if self._elsewhere(transaction, call_id, related_id):
            shared = transaction.shared
            assert shared is not None
            asked = shared.asked.get(call_id)
            if asked is not None:  # refused here: the node running the turns would only log it
                check_answer(*asked, answer, related_id)
            shared.control("answer", call_id=call_id, user=user, answer=answer)
        elif self.tools is not None:
            self.tools.answer(call_id, transaction.id, user, answer, related_id)

    def cancel_call(
        self, transaction: Transaction, call_id: str, user: str, reason: str | None, related_id: str
    ) -> None:
        if self._elsewhere(transaction, call_id, related_id, waiting=False):
            assert transaction.shared is not None
            transaction.shared.control("tool_cancel", call_id=call_id, user=user, reason=reason)
        elif self.tools is not None:
            self.tools.cancel(call_id, transaction.id, user, reason, related_id)

    def _elsewhere(self, transaction: Transaction, call_id: str, related_id: str, *, waiting: bool = True) -> bool:
        """Whether the call is the agents' on the node running the turns (not one of this node's)."""
        shared = transaction.shared
        if shared is None or shared.owner or (self.tools is not None and (transaction.id, call_id) in self.tools.calls):
            return False
        if waiting and call_id not in shared.waiting_calls:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"call {call_id} is not waiting for an answer",
                related_id=related_id,
                detail={"where": "/payload/call_id"},
            )
        return True


def check_open(transaction: Transaction, related_id: str) -> None:
    if transaction.ended:
        raise ProtocolError(
            ErrorCode.TRANSACTION_NOT_FOUND, f"transaction {transaction.id} has ended", related_id=related_id
        )


def bind(context: HubContext, handler: Callable[[HubContext, Session, Envelope], Coroutine[Any, Any, None]]) -> Handler:
    async def bound(session: Session, envelope: Envelope) -> None:
        await handler(context, session, envelope)

    return bound


def _tool_servers(transaction: Transaction) -> list[str]:
    """The MCP servers whose tools the transaction's agents may call, sorted."""
    return sorted({server for slot in transaction.agents.values() for server in slot.tool_servers})
