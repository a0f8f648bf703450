"""MCP tasks as a client (the 2025-11-25 wire): a tool call the server runs as a task, followed to its end.

A task-augmented `tools/call` answers at once with a task. The bridge then asks `tasks/result`, which
the server holds until the task ends (sending the task's input requests, elicitations tagged with
its id, meanwhile), and follows the task's state beside it: `notifications/tasks/status` (bound
through the SDK's `ClientExtension`) and `tasks/get` polls. Cancelling the call (TOOL_CANCEL, the
timeout) sends `tasks/cancel` and reports the server's answer.

A task outlives its connection: when the connection dies mid-task, the call waits (its timeout
running) for the supervisor's next connection, tells its caller meanwhile that it is waiting, and
follows the same task id there; a server that no longer knows the task ends the call with an error.
A cancel while the connection is down goes out on the next one, if that comes within the grace.

The SDK has typed models for these methods but no runtime; it also validates every `tools/call`
answer as a plain result, so `_create` is the one place that sends below `ClientSession.send_request`
(the SDK's public way around that check, `ClientExtension` result claims, exists only for the 2026
protocol).

The task's progress notifications carry the `progressToken` the call sent, for the task's whole life;
the SDK stops following a request's progress once it is answered, but hands every progress
notification to the client's `message_handler` too, where `route_progress` gives it to its call.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp import MCPError
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.session import ClientSession
from pydantic import ValidationError

from haip_runtime.bridge.calls import Call
from haip_runtime.bridge.models import OnProgress, OnTask, Progress, TaskState
from haip_runtime.exceptions import ToolError, ToolUnavailableError

logger = logging.getLogger(__name__)

POLL_DEFAULT = 1.0
POLL_MIN = 0.1
POLL_MAX = 5.0
"""Seconds between `tasks/get` polls: the server's `pollInterval`, kept within these bounds."""
CANCEL_GRACE = 5.0
"""Seconds a cancelled call waits for the server's answer to `tasks/cancel`."""

OnTaskEnd = Callable[[str, str], None]
"""Told (server, final status) when a task the bridge started ends: `completed`, `failed`, `cancelled` or `lost`."""


class Line(Protocol):
    """The connection a task call follows its task on, across reconnects (the supervisor's `TaskLine`)."""

    @property
    def session(self) -> ClientSession:
        """The session of the connection the call holds now."""
        ...

    @property
    def lost(self) -> anyio.Event:
        """Set once that connection is lost."""
        ...

    def lose(self, why: str) -> None:
        """Tell the supervisor the connection is dead (it reconnects)."""

    async def reconnect(self) -> ClientSession:
        """The session of the next connection; `ToolUnavailableError` once the bridge stops."""
        ...


async def run_task(
    line: Line,
    call: Call,
    tool: str,
    arguments: dict[str, Any],
    *,
    ttl_seconds: float,
    on_task: OnTask | None,
    on_end: OnTaskEnd | None,
    on_progress: OnProgress | None = None,
) -> types.CallToolResult:
    """Run `tool` as a task on `line` to its result; cancelling this cancels the task on the server.

    A connection lost after the task was created does not end the call: it waits for the supervisor's
    next connection and follows the same task there (`_Follow`), within the call's own timeout."""
    if on_progress is not None:
        call.progress_token, call.on_progress = f"haip-{uuid.uuid4()}", on_progress
    created = await _create(line.session, tool, arguments, ttl_seconds, call.progress_token)
    call.task_id = created.task.task_id
    call.report = report = _Reporter(call, on_task)
    follow = _Follow(line, call, report, created.task)
    final = "lost"
    try:
        await report(_state(created.task))
        result = await follow.to_end()
        final = "failed" if result.is_error else "completed"
        return result
    except anyio.get_cancelled_exc_class():
        final = await follow.cancel()
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


_WIRE_ERRORS = (MCPError, ValidationError, anyio.BrokenResourceError, anyio.ClosedResourceError)
"""What a request on a session can fail with: the server's refusal, a malformed answer, or a dead line."""


def _broke(exc: BaseException) -> bool:
    """Whether `exc` says the connection died (rather than the server answering with an error)."""
    if isinstance(exc, MCPError):
        return exc.code == types.CONNECTION_CLOSED
    return isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError))


class _Follow:
    """One call's hold on its task: `tasks/result` with `tasks/get` polls beside it on the current
    connection and, when that connection dies, the same task again on the supervisor's next one.

    A server that kept the task answers `tasks/get` on the new session and the call goes on to the
    task's real result; one that answers with an error has lost the task, and the call ends with a
    `ToolError` saying so. The call's own deadline runs throughout (`calls.call_tool`).
    """

    def __init__(self, line: Line, call: Call, report: _Reporter, task: types.Task) -> None:
        self._line = line
        self._call = call
        self._report = report
        self._task_id = task.task_id
        self._interval = min(max((task.poll_interval or POLL_DEFAULT * 1000) / 1000, POLL_MIN), POLL_MAX)
        self._attached = True

    async def to_end(self) -> types.CallToolResult:
        while True:
            result = await self._attached_result()
            if result is not None:
                return result
            await self._rejoin()

    async def _attached_result(self) -> types.CallToolResult | None:
        """The task's result through `tasks/result` on the current session, or None once it is lost."""
        session = self._line.session
        outcome: list[types.CallToolResult | Exception] = []
        request = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=self._task_id))
        async with anyio.create_task_group() as group:
            group.start_soon(self._poll, session, group.cancel_scope)
            group.start_soon(self._until_lost, self._line.lost, group.cancel_scope)
            try:
                outcome.append(await session.send_request(request, types.CallToolResult))
            except _WIRE_ERRORS as exc:  # raised past the task group, which would wrap it in a group
                outcome.append(exc)
            group.cancel_scope.cancel()
        answer = outcome[0] if outcome else None
        if isinstance(answer, types.CallToolResult):
            return answer
        if answer is None or _broke(answer):  # a poll or the supervisor saw the line die first, or tasks/result did
            self._lose("the connection closed while following a task")
            return None
        raise answer

    async def _poll(self, session: ClientSession, attached: anyio.CancelScope) -> None:
        request = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id=self._task_id))
        while True:
            await anyio.sleep(self._interval)  # the server's pollInterval: polling is the protocol here
            try:
                state = _state(await session.send_request(request, types.GetTaskResult))
            except _WIRE_ERRORS as exc:
                if _broke(exc):
                    attached.cancel()
                else:  # tasks/result, which the call waits on, says what happened
                    logger.debug("tasks/get for %s failed: %s", self._task_id, exc)
                return
            await self._report(state)
            if state.terminal:
                return

    @staticmethod
    async def _until_lost(lost: anyio.Event, attached: anyio.CancelScope) -> None:
        await lost.wait()
        attached.cancel()

    def _lose(self, why: str) -> None:
        self._attached = False
        self._line.lose(why)

    async def _rejoin(self) -> None:
        """Wait for the server's next connection and find the task there; `ToolError` if it is gone."""
        server = self._call.server
        waiting = f"the connection to MCP server {server!r} was lost; waiting for it to come back"
        request = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id=self._task_id))
        while True:
            await self._report(replace(self._report.known, message=waiting, local=True))
            try:
                session = await self._line.reconnect()
                state = _state(await session.send_request(request, types.GetTaskResult))
            except ToolUnavailableError as exc:
                raise ToolError(f"MCP server {server!r} went away during task {self._task_id}: {exc}") from exc
            except _WIRE_ERRORS as exc:
                if _broke(exc):
                    self._lose("the connection closed while finding a task again")
                    continue
                raise ToolError(
                    f"MCP server {server!r} lost task {self._task_id} while the connection was down: {exc}"
                ) from exc
            logger.info("MCP server %r still has task %s (%s) after a reconnect", server, self._task_id, state.status)
            self._attached = True
            await self._report(state)
            return

    async def cancel(self) -> str:
        """Send `tasks/cancel` (shielded: the call itself is being cancelled) and report the server's answer.

        On a dead connection it goes on the next one, if the supervisor gets one within `CANCEL_GRACE`;
        else the caller is told the cancel could not reach the server (the task may run on there)."""
        self._report.closing = True
        server = self._call.server
        request = types.CancelTaskRequest(params=types.CancelTaskRequestParams(task_id=self._task_id))
        why = f"no connection within {CANCEL_GRACE:g} s"
        with anyio.move_on_after(CANCEL_GRACE, shield=True):
            while True:
                try:
                    session = self._line.session if self._attached else await self._line.reconnect()
                    self._attached, why = True, f"no answer within {CANCEL_GRACE:g} s"
                    answer = _state(await session.send_request(request, types.CancelTaskResult))
                except ToolUnavailableError as exc:
                    why = str(exc)
                    break
                except _WIRE_ERRORS as exc:
                    if _broke(exc):
                        self._lose("the connection closed while cancelling a task")
                        continue
                    logger.info("MCP server %r did not cancel task %s: %s", server, self._task_id, exc)
                    return "lost"
                await self._report(replace(answer, cancel=True), final=True)
                return answer.status
        logger.info("tasks/cancel for %s could not reach MCP server %r: %s", self._task_id, server, why)
        unreached = f"the cancel could not reach MCP server {server!r} ({why}); its task may still run there"
        await self._report(replace(self._report.known, message=unreached, local=True, cancel=True), final=True)
        return "lost"


def _state(task: types.Task) -> TaskState:
    return TaskState(task.task_id, task.status, task.status_message)


class _Reporter:
    """Tells the caller each new state of a call's task, once, and never while it is asking a human
    (a late poll saying `input_required` must not hide the question being answered); once the call
    is being cancelled, only the cancel's own outcome (`final`)."""

    def __init__(self, call: Call, on_task: OnTask | None) -> None:
        self._call = call
        self._on_task = on_task
        self._last: TaskState | None = None
        self.known = TaskState(call.task_id or "", "working", None)
        """The task's latest state from the server, told or not."""
        self.closing = False

    async def __call__(self, state: TaskState, *, final: bool = False) -> None:
        if not state.local:
            self.known = state
        if self._on_task is None or state == self._last:
            return
        if not final and (self.closing or self._call.done or self._call.asking or self._ended):
            return
        self._last = state
        await self._on_task(state)

    @property
    def _ended(self) -> bool:
        return self._last is not None and self._last.terminal


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
