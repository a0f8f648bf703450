"""``AgentHarness``: one agent class in a real in-memory transaction, each turn's events kept as a ``TurnResult``.

The agent runs with the real tool proxy over ``FakeTools`` (``fakes.py``), and the harness's own
member records what a HAIP client would receive and answers approvals and input requests as told.
Plugin authors import it from ``haip_runtime.testing``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from haip_runtime.agents.api import Agent
from haip_runtime.agents.registry import AgentSpec, validate_options
from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import AgentConfig, SessionConfig
from haip_runtime.conversation.runs import AgentSlot, RunLimit
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.messages import checked_message
from haip_runtime.llm.provider import Provider
from haip_runtime.protocol.envelope import Envelope, Event, new_id
from haip_runtime.protocol.events import ALL_EVENTS, EventType, RunOutcome, ToolStatus
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.testing.fakes import FakeTools, ToolFunc
from haip_runtime.tools.proxy import ToolProxy


@dataclass(frozen=True)
class TurnResult:
    """What one turn sent to the transaction's members, in order."""

    events: list[Event]

    @property
    def status(self) -> str:
        """A ``RunOutcome``: ``OK``, ``CANCELLED`` (RUN_FINISHED) or ``ERROR`` (RUN_ERROR)."""
        last = self.events[-1]
        return RunOutcome.ERROR if last.type == EventType.RUN_ERROR else str(_payload(last).get("status"))

    @property
    def messages(self) -> list[str]:
        """Each message the agent sent, whole."""
        texts: dict[str, list[str]] = {}
        for event in self.events:
            body = _payload(event)
            if event.type == EventType.MESSAGE_START:
                texts[str(body["message_id"])] = []
            elif event.type == EventType.MESSAGE_PART:
                texts[str(body["message_id"])].append(str(body["text"]))
        return ["".join(parts) for parts in texts.values()]

    @property
    def text(self) -> str:
        return "\n".join(self.messages)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [_payload(e) for e in self.events if e.type == EventType.TOOL_CALL]

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        return [_payload(e) for e in self.events if e.type == EventType.TOOL_DONE]

    @property
    def error(self) -> dict[str, Any] | None:
        return _payload(self.events[-1]) if self.status == RunOutcome.ERROR else None


class AgentHarness:
    """Runs one agent class in an in-memory transaction with fake tools named ``server.tool``."""

    def __init__(
        self,
        agent: type[Agent[Any]],
        *,
        options: Mapping[str, Any] | None = None,
        tools: Mapping[str, ToolFunc] | None = None,
        require_approval: Iterable[str] = (),
        approve: bool = True,
        user_input: Mapping[str, Any] | None = None,
        user: str = "tester",
        params: Mapping[str, Any] | None = None,
        llm: Provider | None = None,
        instructions: str | None = None,
    ) -> None:
        self._fakes = FakeTools(tools or {})
        servers = self._fakes.servers(set(require_approval))
        name = agent.name or agent.__name__.lower()
        plugin = f"{agent.__module__}:{agent.__qualname__}"
        config = AgentConfig(plugin=plugin, mcp_servers=sorted(servers), instructions=instructions)
        validated = validate_options(agent, dict(options or {}), f"agents.{name}.options")
        self.spec = AgentSpec(name, agent, validated, config, llm)
        self.llm = llm
        self.proxy = ToolProxy(servers, self._fakes)
        self.member = _Member(Principal(user), self, approve, user_input)
        self.params = dict(params or {})
        #: The ``on_start`` turn, if the agent has one.
        self.greeting: TurnResult | None = None
        self._stack = AsyncExitStack()
        self._task_group: TaskGroup | None = None
        self.transaction: Transaction | None = None

    @property
    def events(self) -> list[Event]:
        """Everything the transaction sent so far."""
        return self.member.events

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        self.transaction = Transaction(
            owner=self.member.user,
            thread_id=None,
            spawn=self._task_group.start_soon,
            tools=self.proxy,
            run_limit=RunLimit(sys.maxsize),  # the run limit is a session's policy; a plugin's test has none
        )
        self.transaction.add_member(self.member)
        instance = self.spec.create(transaction_id=self.transaction.id, started_by=self.member.user, params=self.params)
        self.slot = AgentSlot(self.spec.name, instance, tuple(self.spec.config.mcp_servers))
        self.transaction.add_agent(self.slot)
        if type(instance).on_start is not Agent.on_start:
            self.greeting = await self._finish(self.transaction.start_run(self.slot, self.member, "", {}, "on_start"))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._task_group is not None and self.transaction is not None
        with anyio.CancelScope(shield=True):
            await self.transaction.end("harness closed")
        self._task_group.cancel_scope.cancel()
        # The body's exception is not handed to the task group, which would wrap it in an ExceptionGroup (a
        # newcomer's find: ``pytest.raises(ProtocolError)`` around the block, or a failed assert, read as one);
        # it goes on unwrapped once the group has ended.
        await self._stack.__aexit__(None, None, None)

    async def send(self, message: str | dict[str, Any], *, timeout: float = 30) -> TurnResult:
        """Send a user message (text, or an object payload) and wait for the agent's turn to end."""
        assert self.transaction is not None, "use `async with AgentHarness(...)`"
        payload = {"text": message} if isinstance(message, str) else dict(message)
        # checked as the server checks it (the agent's input_schema): ProtocolError INVALID_PAYLOAD if refused
        envelope = Envelope(
            id="harness", session="harness", seq="1", ts="0", channel="USER", type="MESSAGE", payload=payload
        )
        text = checked_message(envelope, [self.spec.cls.input_schema]).text
        message_id = payload.setdefault("message_id", new_id())
        with anyio.fail_after(timeout):  # (one deadline for its wait and its turn)
            runs = self.transaction.user_message(self.member, text, payload)
            while not runs:  # it waits its turn (the agent's ``concurrent_turns``): until its run starts
                given_up = [
                    body.get("reason")
                    for event in self.member.events
                    if (body := _payload(event)).get("event") == "run.unqueued" and body.get("message_id") == message_id
                ]
                if given_up:  # (a reviewer's find: a cancelled waiting message waited out the whole timeout)
                    raise RuntimeError(f"AgentHarness: message {message_id} never ran: {given_up[0]}")
                await self.member.arrived()
                runs = [r for r in self.transaction.runs.values() if r.message_id == message_id]
            return await self._finish(runs[0], math.inf)

    async def _finish(self, run: Any, timeout: float = 30) -> TurnResult:
        with anyio.fail_after(timeout):
            await run.wait()
        refused, self.member.refused = self.member.refused, None
        if refused is not None:  # the harness's own answer did not fit: the test's mistake, said at once
            raise refused
        return TurnResult([e for e in self.events if e.run_id == run.id])


class _Member(Session):
    """The harness's user: records what it is sent and answers approvals as told."""

    def __init__(
        self, principal: Principal, harness: AgentHarness, approve: bool, user_input: Mapping[str, Any] | None
    ) -> None:
        super().__init__(principal, negotiate(ALL_EVENTS), SessionConfig())
        self.events: list[Event] = []
        self._harness = harness
        self._approve = approve
        self._input = None if user_input is None else dict(user_input)
        #: The runtime refused an answer the harness gave (a ``user_input`` that does not fit the request):
        #: the run is cancelled and ``send`` raises this (it waited out its timeout: an agent author's find).
        self.refused: ProtocolError | None = None
        self._arrived = anyio.Event()

    async def arrived(self) -> None:
        """Until the transaction sends something more (to every task waiting)."""
        await self._arrived.wait()

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()
        self._arrived = anyio.Event()
        body = _payload(event)
        if event.type != EventType.TOOL_UPDATE or event.transaction is None:
            return
        if body.get("status") == ToolStatus.AWAITING_APPROVAL:
            answer: dict[str, Any] = {"decision": "approve" if self._approve else "reject", "reason": "harness"}
        elif body.get("status") == ToolStatus.INPUT_REQUIRED:
            answer = {"decision": "decline"} if self._input is None else {"input": self._input}
        else:
            return
        try:
            self._harness.proxy.answer(str(body["call_id"]), event.transaction, self.user, answer, event.id)
        except ProtocolError as refusal:
            calls = [_payload(e) for e in self.events if e.type == EventType.TOOL_CALL]
            tool = next((c.get("tool") for c in calls if c.get("call_id") == body["call_id"]), body["call_id"])
            said = f"AgentHarness: the runtime refused its answer to {tool}: {refusal.message}"
            self.refused = ProtocolError(refusal.code, said, detail=refusal.detail)
            transaction = self._harness.transaction
            if transaction is not None and event.run_id is not None:
                transaction.cancel_run(event.run_id)


def _payload(event: Event) -> dict[str, Any]:
    return event.payload if isinstance(event.payload, dict) else {"text": event.payload}
