"""MCP tasks as a client (the 2025-11-25 wire): a tool call the server runs as a task, followed to its end.

A task-augmented `tools/call` answers at once with a task. The bridge then asks `tasks/result`, which
the server holds until the task ends (sending the task's input requests, elicitations tagged with
its id, meanwhile), and follows the task's state beside it: `notifications/tasks/status` (bound
through the SDK's `ClientExtension`) and `tasks/get` polls. Cancelling the call (TOOL_CANCEL, the
timeout) sends `tasks/cancel` and reports the server's answer. The SDK has typed models for these
methods but no runtime; it also validates every `tools/call` answer as a plain result, so `_create`
is the one place that sends below `ClientSession.send_request` (the SDK's public way around that
check, `ClientExtension` result claims, exists only for the 2026 protocol).

The task's progress notifications carry the `progressToken` the call sent, for the task's whole life;
the SDK stops following a request's progress once it is answered, but hands every progress
notification to the client's `message_handler` too, where `route_progress` gives it to its call.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.session import ClientSession
from pydantic import ValidationError

from haip_runtime.bridge.calls import Call
from haip_runtime.bridge.models import OnProgress, OnTask, Progress, TaskState

logger = logging.getLogger(__name__)

POLL_DEFAULT = 1.0
POLL_MIN = 0.1
POLL_MAX = 5.0
"""Seconds between `tasks/get` polls: the server's `pollInterval`, kept within these bounds."""
CANCEL_GRACE = 5.0
"""Seconds a cancelled call waits for the server's answer to `tasks/cancel`."""

OnTaskEnd = Callable[[str, str], None]
"""Told (server, final status) when a task the bridge started ends: `completed`, `failed`, `cancelled` or `lost`."""


async def run_task(
    session: ClientSession,
    call: Call,
    tool: str,
    arguments: dict[str, Any],
    *,
    ttl_seconds: float,
    on_task: OnTask | None,
    on_end: OnTaskEnd | None,
    on_progress: OnProgress | None = None,
) -> types.CallToolResult:
    """Run `tool` as a task on `session` to its result; cancelling this cancels the task on the server."""
    if on_progress is not None:
        call.progress_token, call.on_progress = f"haip-{uuid.uuid4()}", on_progress
    created = await _create(session, tool, arguments, ttl_seconds, call.progress_token)
    call.task_id = created.task.task_id
    call.report = _Reporter(call, on_task)
    final = "lost"
    try:
        await call.report(_state(created.task))
        async with anyio.create_task_group() as polls:
            polls.start_soon(_poll, session, created.task, call.report)
            result = await session.send_request(
                types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=call.task_id)),
                types.CallToolResult,
            )
            polls.cancel_scope.cancel()
        final = "failed" if result.is_error else "completed"
        return result
    except anyio.get_cancelled_exc_class():
        final = await _cancel(session, call)
        raise
    finally:
        if on_end is not None:
            on_end(call.server, final)


async def _create(
    session: ClientSession, tool: str, arguments: dict[str, Any], ttl: float, progress_token: str | None = None
) -> types.CreateTaskResult:
    """Send the task-augmented `tools/call` and read its `CreateTaskResult`.

    `send_request` would validate the answer as a `CallToolResult` (right for plain calls, wrong here),
    so this stamps and sends the request as it does, through the session's dispatcher.
    """
    request = types.CallToolRequest(
        params=types.CallToolRequestParams(name=tool, arguments=arguments, task=types.TaskMetadata(ttl=int(ttl * 1000)))
    )
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    if progress_token is not None:
        data["params"].setdefault("_meta", {})["progressToken"] = progress_token
    options: Any = {}
    session._stamp(data, options)  # private: see the docstring
    raw = await session._dispatcher.send_raw_request(data["method"], data.get("params"), options)
    try:
        return types.CreateTaskResult.model_validate(raw, by_name=False)
    except ValidationError as exc:
        raise MCPError(types.INVALID_PARAMS, f"the server did not answer the task call with a task: {exc}") from exc


async def _poll(session: ClientSession, task: types.Task, report: _Reporter) -> None:
    interval = min(max((task.poll_interval or POLL_DEFAULT * 1000) / 1000, POLL_MIN), POLL_MAX)
    request = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id=task.task_id))
    while True:
        await anyio.sleep(interval)
        try:
            state = _state(await session.send_request(request, types.GetTaskResult))
        except (MCPError, ValidationError) as exc:  # tasks/result, which the call waits on, says what happened
            logger.debug("tasks/get for %s failed: %s", task.task_id, exc)
            return
        await report(state)
        if state.terminal:
            return


async def _cancel(session: ClientSession, call: Call) -> str:
    """Send `tasks/cancel` (shielded: the call itself is being cancelled) and report the server's answer."""
    assert call.task_id is not None and call.report is not None
    request = types.CancelTaskRequest(params=types.CancelTaskRequestParams(task_id=call.task_id))
    with anyio.move_on_after(CANCEL_GRACE, shield=True):
        try:
            answer = _state(await session.send_request(request, types.CancelTaskResult))
        except (MCPError, ValidationError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            logger.info("MCP server %r did not cancel task %s: %s", call.server, call.task_id, exc)
            return "lost"
        await call.report(answer, final=True)
        return answer.status
    logger.info("MCP server %r did not answer tasks/cancel for %s in time", call.server, call.task_id)
    return "lost"


def _state(task: types.Task) -> TaskState:
    return TaskState(task.task_id, task.status, task.status_message)


class _Reporter:
    """Tells the caller each new state of a call's task, once, and never while it is asking a human
    (a late poll saying `input_required` must not hide the question being answered)."""

    def __init__(self, call: Call, on_task: OnTask | None) -> None:
        self._call = call
        self._on_task = on_task
        self._last: TaskState | None = None

    async def __call__(self, state: TaskState, *, final: bool = False) -> None:
        if self._on_task is None or state == self._last:
            return
        if not final and (self._call.done or self._call.asking or (self._last is not None and self._last.terminal)):
            return
        self._last = state
        await self._on_task(state)


async def route_progress(calls: set[Call], params: types.ProgressNotificationParams) -> None:
    """Give a progress notification to the task call whose token it carries (others have their own
    request's callback), never after the call returned."""
    call = next((each for each in calls if each.progress_token == params.progress_token), None)
    if call is not None and call.on_progress is not None and not call.done:
        await call.on_progress(Progress(params.progress, params.total, params.message))


class TaskStatusListener(ClientExtension):
    """Hands `notifications/tasks/status` to the call whose task it names (an SDK extension point)."""

    identifier = "dev.haip-runtime/task-status"

    def __init__(self, calls: set[Call]) -> None:
        self._calls = calls

    def notifications(self) -> Sequence[NotificationBinding[Any]]:
        return (
            NotificationBinding(
                method="notifications/tasks/status",
                params_type=types.TaskStatusNotificationParams,
                handler=self._status,
            ),
        )

    async def _status(self, params: types.TaskStatusNotificationParams) -> None:
        call = next((each for each in self._calls if each.task_id == params.task_id), None)
        if call is not None and call.report is not None:
            await call.report(_state(params))
