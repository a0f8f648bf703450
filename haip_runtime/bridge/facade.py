"""haip-runtime's agents as an MCP server: the MCP-SDK side of the `[mcp_server]` door.

`agent_server` builds the SDK's low-level `Server` and its streamable HTTP app (both protocol eras
the SDK serves: the 2025-11-25 handshake and the 2026-07-28 stateless protocol). It knows MCP and
nothing of HAIP: who the caller is, which agents they may start and how a run goes are an
`AgentHost`'s (the server's `McpDoor`). Progress notifications and cancellation are the SDK's.

With a `TaskHost` it also offers the agents as MCP tasks (2025-11-25 "tasks"), which the SDK does
not serve: it advertises the `tasks` capability on `initialize`, marks each tool
`execution.taskSupport = "optional"`, answers a task-augmented `tools/call` with a
`CreateTaskResult` from a server middleware (the SDK would check the answer as a plain
`CallToolResult` and refuse it), and serves `tasks/get`, `tasks/result`, `tasks/cancel` and
`tasks/list` as request handlers of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp

from haip_runtime.exceptions import TaskRefusedError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES: int = DEFAULT_MAX_REQUEST_BODY_SIZE
"""The largest request body the SDK takes (the door reads bodies itself, within its deadline)."""

CALLER = "haip.mcp_caller"
"""The ASGI scope key where the server's authentication puts the caller (opaque here)."""

Report = Callable[[str], Awaitable[None]]
"""Tell the MCP client how the run goes (a progress notification carrying the text)."""
Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
"""Ask the MCP client's user (elicitation, form mode): the values if they accepted, else ``None``."""


@dataclass(frozen=True)
class AgentTool:
    name: str
    description: str


@dataclass(frozen=True)
class AgentAnswer:
    text: str
    """The agent's answer (its messages of the run, joined)."""
    structured: dict[str, Any] = field(default_factory=dict)
    """`conversation_id`, `agent`, `status`, `tool_calls`."""
    is_error: bool = False


@dataclass(frozen=True)
class TaskView:
    """Where a task stands, as the host says."""

    task_id: str
    status: str
    """`working`, `input_required`, `completed`, `failed` or `cancelled`."""
    message: str | None
    created_at: datetime
    updated_at: datetime
    ttl_ms: int
    poll_ms: int


OnStatus = Callable[[TaskView], Coroutine[Any, Any, None]]


class TaskHost(Protocol):
    """Runs agent turns as tasks that outlive the request creating them; raises `TaskRefusedError`."""

    def start_task(
        self,
        caller: Any,
        agent: str,
        message: str,
        conversation_id: str | None,
        *,
        ttl_ms: int | None,
        report: Report,
        on_status: OnStatus,
        can_ask: bool,
    ) -> TaskView: ...

    def task(self, caller: Any, task_id: str) -> TaskView: ...

    def tasks(self, caller: Any) -> list[TaskView]: ...

    async def task_result(self, caller: Any, task_id: str, ask: Ask | None) -> AgentAnswer: ...

    def cancel_task(self, caller: Any, task_id: str) -> TaskView: ...


TASK_META = "io.modelcontextprotocol/related-task"
NOTIFY_TIMEOUT = 5.0
"""Seconds a notification about a task may take to be queued (the client may not be reading)."""


class AgentHost(Protocol):
    def agents(self, caller: Any) -> list[AgentTool]: ...

    async def run(
        self, caller: Any, agent: str, message: str, conversation_id: str | None, report: Report, ask: Ask | None
    ) -> AgentAnswer: ...


INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "description": "What to say to the agent."},
        "conversation_id": {
            "type": "string",
            "description": "Continue this conversation (an earlier answer's conversation_id) instead of a new one.",
        },
    },
    "required": ["message"],
    "additionalProperties": False,
}

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "conversation_id": {"type": "string"},
        "agent": {"type": "string"},
        "status": {"type": "string", "description": "How the run ended: OK, CANCELLED or an error code."},
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "call_id": {"type": "string"},
                    "tool": {"type": "string"},
                    "params": {},
                    "status": {"type": "string"},
                    "result": {},
                    "error": {},
                },
                "required": ["call_id", "tool"],
            },
        },
        "error": {
            "type": "object",
            "description": "Why the run failed, when it did: {code, message}.",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    },
    "required": ["conversation_id", "agent", "status", "tool_calls"],
}


@dataclass
class AgentServer:
    app: ASGIApp
    """The streamable HTTP endpoint, to mount at the door's path (it serves its own root)."""
    lifespan: Callable[[], AbstractAsyncContextManager[None]]
    """Enter for as long as the app serves (the SDK's session manager)."""


def agent_server(host: AgentHost, *, name: str, version: str, tasks: TaskHost | None = None) -> AgentServer:
    """The MCP server offering `host`'s agents as tools (and as tasks, given `tasks`); mount `app`, and
    keep `lifespan` entered."""
    execution = types.ToolExecution(task_support="optional") if tasks is not None else None

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        tools = [
            types.Tool(
                name=agent.name,
                description=agent.description,
                input_schema=INPUT_SCHEMA,
                output_schema=OUTPUT_SCHEMA,
                execution=execution,
            )
            for agent in host.agents(_caller(ctx))
        ]
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        try:
            message, conversation = _arguments(params)
        except ValueError as refusal:
            return _error(f"INVALID_PAYLOAD: {refusal}")  # (an error's text starts with its code)
        steps = 0

        async def report(text: str) -> None:
            nonlocal steps
            steps += 1
            await ctx.session.report_progress(steps, None, text)

        answer = await host.run(_caller(ctx), params.name, message, conversation, report, _asker(ctx))
        return _answer(answer)

    server: Server[Any]
    if tasks is None:
        server = Server(name, version=version, on_list_tools=list_tools, on_call_tool=call_tool)
    else:
        server = _TaskServer(name, version=version, on_list_tools=list_tools, on_call_tool=call_tool)
        _serve_tasks(server, tasks)
    # The door's authentication runs before the SDK and checks Origin itself: no SDK host checks here.
    app = server.streamable_http_app(streamable_http_path="/", host="0.0.0.0")
    return AgentServer(app=app, lifespan=lambda: server.session_manager.run())


def _caller(ctx: ServerRequestContext[Any, Any]) -> Any:
    request = ctx.request
    scope = getattr(request, "scope", None)
    return scope.get(CALLER) if isinstance(scope, dict) else None


def _asker(ctx: ServerRequestContext[Any, Any]) -> Ask | None:
    """How to ask this call's client, if it can be asked: it declared elicitation, and it speaks the
    2025-11-25 protocol (there a request may go to the client during the call, on the call's stream)."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    capabilities = ctx.session.client_capabilities
    if capabilities is None or capabilities.elicitation is None:
        return None

    async def ask(message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return dict(result.content or {}) if result.action == "accept" else None

    return ask


def _arguments(params: types.CallToolRequestParams) -> tuple[str, str | None]:
    arguments = params.arguments or {}
    unknown = sorted(set(arguments) - set(INPUT_SCHEMA["properties"]))
    if unknown:  # (the schema says additionalProperties: false: a tester's call with one more was answered)
        raise ValueError(
            f"arguments: unknown {', '.join(map(repr, unknown))}; these take 'message' and 'conversation_id'"
        )
    message, conversation = arguments.get("message"), arguments.get("conversation_id")
    if not isinstance(message, str):
        got = "none" if message is None else type(message).__name__
        raise ValueError(f"arguments: 'message' (a string) is required; got {got}")
    if not (conversation is None or isinstance(conversation, str)):
        raise ValueError(f"arguments: 'conversation_id' must be a string, not {type(conversation).__name__}")
    return message, conversation


def _answer(answer: AgentAnswer) -> types.CallToolResult:
    content = [types.TextContent(type="text", text=answer.text)]
    return types.CallToolResult(content=content, structured_content=answer.structured, is_error=answer.is_error)


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


# --- tasks (2025-11-25) ------------------------------------------------------------------------------


class _TaskServer(Server[Any]):
    """The low-level server, advertising the `tasks` capability to 2025-11-25 clients."""

    def get_capabilities(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        *,
        protocol_version: str | None = None,
    ) -> types.ServerCapabilities:
        capabilities = super().get_capabilities(
            notification_options, experimental_capabilities, extensions, protocol_version=protocol_version
        )
        if protocol_version in MODERN_PROTOCOL_VERSIONS:  # there tasks are an extension, not served here
            return capabilities
        offered = types.ServerTasksCapability(
            list=types.TasksListCapability(),
            cancel=types.TasksCancelCapability(),
            requests=types.ServerTasksRequestsCapability(
                tools=types.TasksToolsCapability(call=types.TasksCallCapability())
            ),
        )
        return capabilities.model_copy(update={"tasks": offered})


def _serve_tasks(server: Server[Any], tasks: TaskHost) -> None:
    async def get(ctx: ServerRequestContext[Any, Any], params: types.GetTaskRequestParams) -> dict[str, Any]:
        return _wire(types.GetTaskResult(**_task(_asked(lambda: tasks.task(_caller(ctx), params.task_id)))))

    async def cancel(ctx: ServerRequestContext[Any, Any], params: types.CancelTaskRequestParams) -> dict[str, Any]:
        view = _asked(lambda: tasks.cancel_task(_caller(ctx), params.task_id))
        return _wire(types.CancelTaskResult(**_task(view)))

    async def listed(ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams) -> dict[str, Any]:
        views = tasks.tasks(_caller(ctx))  # at most [mcp_server] max_tasks_per_user: one page
        return _wire(types.ListTasksResult(tasks=[types.Task(**_task(view)) for view in views]))

    async def result(ctx: ServerRequestContext[Any, Any], params: types.GetTaskPayloadRequestParams) -> dict[str, Any]:
        try:
            answer = await tasks.task_result(_caller(ctx), params.task_id, _task_asker(ctx, params.task_id))
        except TaskRefusedError as refusal:
            raise MCPError(types.INVALID_PARAMS, str(refusal)) from None
        return _wire(_answer(answer), meta={TASK_META: {"taskId": params.task_id}})

    server.add_request_handler("tasks/get", types.GetTaskRequestParams, get)
    server.add_request_handler("tasks/cancel", types.CancelTaskRequestParams, cancel)
    server.add_request_handler("tasks/list", types.PaginatedRequestParams, listed)
    server.add_request_handler("tasks/result", types.GetTaskPayloadRequestParams, result)
    server.middleware.append(_TaskCalls(tasks))


class _TaskCalls:
    """A server middleware: a task-augmented `tools/call` (2025-11-25) starts a task and is answered with
    it at once. Everything else goes on to the SDK, whose handler would refuse to send a task."""

    def __init__(self, tasks: TaskHost) -> None:
        self._tasks = tasks

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        raw = ctx.params
        if (
            ctx.method != "tools/call"
            or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
            or not isinstance(raw, Mapping)
            or raw.get("task") is None
        ):
            return await call_next(ctx)
        try:
            params = types.CallToolRequestParams.model_validate(raw, by_name=False)
            message, conversation = _arguments(params)
        except (ValidationError, ValueError) as invalid:  # (a refusal's message starts with its HAIP code)
            raise MCPError(types.INVALID_PARAMS, f"INVALID_PAYLOAD: {invalid}") from None
        ttl = params.task.ttl if params.task is not None else None
        notify = _Notifier(ctx, progress_token_from_params(raw))
        capabilities = ctx.session.client_capabilities
        view = _asked(
            lambda: self._tasks.start_task(
                _caller(ctx),
                params.name,
                message,
                conversation,
                ttl_ms=ttl,
                report=notify.progress,
                on_status=notify.status,
                can_ask=capabilities is not None and capabilities.elicitation is not None,
            )
        )
        notify.task_id = view.task_id
        return _wire(types.CreateTaskResult(task=types.Task(**_task(view))))


class _Notifier:
    """A task's notifications to its client, on the session's standalone stream (the request that
    created the task has been answered): progress under the call's token, and each status change.
    Best effort: the client may have gone, or not be listening."""

    def __init__(self, ctx: ServerRequestContext[Any, Any], token: str | int | None) -> None:
        self._session = ctx.session
        self._token = token
        self._steps = 0
        self.task_id = ""

    async def progress(self, text: str) -> None:
        if self._token is None:
            return
        self._steps += 1
        params = types.ProgressNotificationParams(
            progress_token=self._token, progress=self._steps, message=text, meta={TASK_META: {"taskId": self.task_id}}
        )
        await self._send(types.ProgressNotification(params=params))

    async def status(self, view: TaskView) -> None:
        await self._send(types.TaskStatusNotification(params=types.TaskStatusNotificationParams(**_task(view))))

    async def _send(self, notification: Any) -> None:
        with anyio.move_on_after(NOTIFY_TIMEOUT):
            try:
                await self._session.send_notification(notification)
            except Exception as exc:  # a closed session: the task goes on, its client may come back to poll
                logger.debug("task %s: notification not sent: %r", self.task_id, exc)


def _task_asker(ctx: ServerRequestContext[Any, Any], task_id: str) -> Ask | None:
    """How `tasks/result` asks its client the task's questions: on its own response stream, tagged with
    the task, if the client declared elicitation."""
    capabilities = ctx.session.client_capabilities
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS or capabilities is None or capabilities.elicitation is None:
        return None

    async def ask(message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        params = types.ElicitRequestFormParams(
            message=message, requested_schema=schema, meta={TASK_META: {"taskId": task_id}}
        )
        result = await ctx.session.send_request(
            types.ElicitRequest(params=params),
            types.ElicitResult,
            metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
        )
        return dict(result.content or {}) if result.action == "accept" else None

    return ask


def _asked(question: Callable[[], TaskView]) -> TaskView:
    try:
        return question()
    except TaskRefusedError as refusal:
        raise MCPError(types.INVALID_PARAMS, str(refusal)) from None


def _task(view: TaskView) -> dict[str, Any]:
    return {
        "task_id": view.task_id,
        "status": view.status,
        "status_message": view.message,
        "created_at": view.created_at.isoformat().replace("+00:00", "Z"),
        "last_updated_at": view.updated_at.isoformat().replace("+00:00", "Z"),
        "ttl": view.ttl_ms,
        "poll_interval": view.poll_ms,
    }


def _wire(result: BaseModel, *, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result as the 2025-11-25 wire has it (no 2026 `resultType`)."""
    data = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    data.pop("resultType", None)
    if meta is not None:
        data["_meta"] = {**data.get("_meta", {}), **meta}
    return data
