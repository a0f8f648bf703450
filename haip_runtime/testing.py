"""An in-memory harness for agent plugins: run turns with fake tools and a scripted LLM, no server or network.

    llm = ScriptedLLM([ScriptedLLM.call("tickets.search", {"q": "printer"}), "Ticket 42 it is."])
    async with AgentHarness(Helpdesk, tools={"tickets.search": search}, llm=llm) as agent:
        turn = await agent.send("my printer is on fire")
        assert turn.status == "OK" and "42" in turn.text
        assert turn.tool_calls[0]["tool"] == "tickets.search"

The agent runs in a real transaction with the real tool proxy, so what a turn records is what a
HAIP client would receive: RUN_*, MESSAGE_START/PART/END and TOOL_CALL/UPDATE/DONE events. A fake
tool's return value becomes the result a real MCP server (the SDK's ``MCPServer``) would give.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from haip_runtime.agents.api import Agent
from haip_runtime.agents.registry import AgentSpec, validate_options
from haip_runtime.auth.tokens import Principal
from haip_runtime.bridge.models import (
    ElicitationRequest,
    OnElicit,
    OnProgress,
    Progress,
    ServerState,
    ServerStatus,
    ToolInfo,
    ToolResult,
)
from haip_runtime.config.models import AgentConfig, McpServerConfig, SessionConfig
from haip_runtime.conversation.transaction import AgentSlot, Transaction
from haip_runtime.exceptions import FakeToolError
from haip_runtime.llm.provider import Provider
from haip_runtime.llm.scripted import ScriptedLLM
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS, EventType, RunOutcome, ToolStatus
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.tools.proxy import ToolProxy

#: A fake tool: takes the arguments and returns what an MCP tool function would (a str, number, dict,
#: list...) or a ``ToolResult``; may be async. The result is what a real MCP server makes of that
#: value: ``5.0`` gives text ``"5.0"`` and structured ``{"result": 5.0}``; a dict gives its JSON as
#: text and itself as structured content. Raising ``FakeToolError`` makes an error result. A fake
#: that takes a second argument gets a ``FakeToolContext`` to report progress and ask the user.
ToolFunc = Callable[..., Any]


class FakeToolContext:
    """What a fake tool with a second parameter gets: the means an MCP tool has to talk to the user."""

    def __init__(self, on_progress: OnProgress | None, on_elicit: OnElicit | None) -> None:
        self._on_progress = on_progress
        self._on_elicit = on_elicit

    async def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """Members see ``TOOL_UPDATE {progress, total, message}`` (coalesced like real progress)."""
        if self._on_progress is not None:
            await self._on_progress(Progress(progress, total, message))

    async def elicit(self, message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the user (``TOOL_UPDATE INPUT_REQUIRED``); the harness answers with its ``user_input``.

        Returns the answer, or ``None`` if it was declined.
        """
        if self._on_elicit is None:
            return None
        answer = await self._on_elicit(ElicitationRequest(message, schema))
        return answer.content if answer.action == "accept" else None


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
        agent: type[Agent],
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
        self._fakes = _FakeTools(tools or {})
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
            owner=self.member.user, thread_id=None, spawn=self._task_group.start_soon, tools=self.proxy
        )
        self.transaction.add_member(self.member)
        instance = self.spec.create(transaction_id=self.transaction.id, started_by=self.member.user, params=self.params)
        self.slot = AgentSlot(self.spec.name, instance, tuple(self.spec.config.mcp_servers))
        self.transaction.add_agent(self.slot)
        if type(instance).on_start is not Agent.on_start:
            self.greeting: TurnResult | None = await self._finish(
                self.transaction.start_run(self.slot, self.member, "", {}, "on_start")
            )
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._task_group is not None and self.transaction is not None
        with anyio.CancelScope(shield=True):
            await self.transaction.end("harness closed")
        self._task_group.cancel_scope.cancel()
        await self._stack.__aexit__(*exc_info)

    async def send(self, message: str | dict[str, Any], *, timeout: float = 30) -> TurnResult:
        """Send a user message (text, or an object payload) and wait for the agent's turn to end."""
        assert self.transaction is not None, "use `async with AgentHarness(...)`"
        payload = {"text": message} if isinstance(message, str) else dict(message)
        (run,) = self.transaction.user_message(self.member, str(payload.get("text", "")), payload)
        return await self._finish(run, timeout)

    async def _finish(self, run: Any, timeout: float = 30) -> TurnResult:
        with anyio.fail_after(timeout):
            await run.wait()
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

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        body = _payload(event)
        if event.type == EventType.TOOL_UPDATE and body.get("status") == ToolStatus.AWAITING_APPROVAL:
            decision = {"decision": "approve" if self._approve else "reject", "reason": "harness"}
            assert event.transaction is not None
            self._harness.proxy.answer(str(body["call_id"]), event.transaction, self.user, decision, event.id)
        elif event.type == EventType.TOOL_UPDATE and body.get("status") == ToolStatus.INPUT_REQUIRED:
            answer = {"decision": "decline"} if self._input is None else {"input": self._input}
            assert event.transaction is not None
            self._harness.proxy.answer(str(body["call_id"]), event.transaction, self.user, answer, event.id)


class _FakeTools:
    """A ``ToolBackend`` of Python functions, standing in for the MCP bridge."""

    def __init__(self, funcs: Mapping[str, ToolFunc]) -> None:
        self._funcs: dict[str, ToolFunc] = {}
        self._infos: dict[str, ToolInfo] = {}
        for full_name, func in funcs.items():
            server, dot, tool = full_name.partition(".")
            if not dot or not tool:
                raise ValueError(f"fake tool names are 'server.tool', not {full_name!r}")
            self._funcs[full_name] = func
            description = inspect.getdoc(func) or ""
            self._infos[full_name] = ToolInfo(server, tool, description, {"type": "object"}, None, None)

    def servers(self, require_approval: set[str]) -> dict[str, McpServerConfig]:
        names = {info.server for info in self._infos.values()}
        return {
            server: McpServerConfig(
                transport="stdio",
                command="(fake)",
                require_approval=[n.partition(".")[2] for n in require_approval if n.startswith(server + ".")],
            )
            for server in names
        }

    def tools(self, servers: Iterable[str] | None = None) -> list[ToolInfo]:
        wanted = None if servers is None else set(servers)
        return [info for info in self._infos.values() if wanted is None or info.server in wanted]

    def find_tool(self, full_name: str) -> ToolInfo | None:
        return self._infos.get(full_name)

    def status(self) -> dict[str, ServerStatus]:
        """Fake servers are always connected."""
        connected = ServerState.CONNECTED
        servers = {info.server for info in self._infos.values()}
        return {s: ServerStatus(s, connected, tuple(self.tools([s])), None, 1) for s in sorted(servers)}

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        on_progress: OnProgress | None = None,
        on_elicit: OnElicit | None = None,
        timeout: float | None = None,
    ) -> ToolResult:
        func = self._funcs[f"{server}.{tool}"]
        try:
            if _takes_context(func):
                value = func(arguments, FakeToolContext(on_progress, on_elicit))
            else:
                value = func(arguments)
            if inspect.isawaitable(value):
                value = await _awaited(value)
        except FakeToolError as exc:
            return ToolResult(True, [{"type": "text", "text": str(exc)}], None)
        return _as_result(value)


def _takes_context(func: ToolFunc) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called with the arguments only
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def _as_result(value: Any) -> ToolResult:
    """What the MCP SDK's ``MCPServer`` returns for a tool function's return ``value``."""
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, dict):
        return ToolResult(False, [_text_block(value)], value)
    if isinstance(value, list | tuple):
        return ToolResult(False, [_text_block(item) for item in value], {"result": list(value)})
    if value is None:
        return ToolResult(False, [], {"result": None})
    return ToolResult(False, [_text_block(value)], {"result": value})


def _text_block(value: Any) -> dict[str, Any]:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
    return {"type": "text", "text": text}


def _payload(event: Event) -> dict[str, Any]:
    return event.payload if isinstance(event.payload, dict) else {"text": event.payload}


__all__ = ["AgentHarness", "FakeToolContext", "FakeToolError", "ScriptedLLM", "ToolFunc", "ToolResult", "TurnResult"]
