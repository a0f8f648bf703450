"""Tool calls through a live MCP client: timeouts, cancellation, progress, and where elicitations go.

Owns the translation of one `tools/call` (and of the server's questions during it) between the MCP
SDK and the bridge's values. Does not own connections: the supervisor hands over the live client.

Elicitation routing: the SDK runs the elicitation callback in the calling task's context for
2026-protocol servers (input_required is driven inside `call_tool`) and for 2025-protocol servers
over HTTP (the request arrives on the call's own response stream), so `current_call` names the
call. Over stdio with the 2025 protocol a request for a task names the task in its `_meta`; nothing
else links the request to its call: it goes to the only call in flight on that server, and is
declined when there are several. A call run as an MCP task is carried by `tasks.py`.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from mcp import Client, InputRequiredRoundsExceededError, MCPError
from mcp.client import ClientRequestContext
from mcp.client.session import ElicitationFnT
from mcp.shared.dispatcher import ProgressFnT
from pydantic import BaseModel, ValidationError

from haip_runtime.bridge.models import (
    ElicitationAnswer,
    ElicitationRequest,
    OnElicit,
    OnProgress,
    Progress,
    ToolResult,
)
from haip_runtime.exceptions import ToolError, ToolTimeoutError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """A tool call in flight: where its elicitations go; its deadline pauses while one waits for a human."""

    server: str
    on_elicit: OnElicit | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False
    task_id: str | None = None
    """The MCP task running the call, once the server created it."""
    report: Callable[..., Awaitable[None]] | None = None
    """Where the task's states go (`tasks.py`)."""
    progress_token: str | None = None
    """The `progressToken` a call run as an MCP task sent: the task's progress notifications carry it."""
    on_progress: OnProgress | None = None
    """Where those go (`tasks.route_progress`): the SDK follows a request's progress only until it is
    answered, and a task's `tools/call` is answered at once."""
    _waiting: int = 0
    _remaining: float = 0.0

    @property
    def asking(self) -> bool:
        """Whether the call is waiting for a human's answer to the server's question."""
        return self._waiting > 0

    @contextmanager
    def deadline_paused(self) -> Iterator[None]:
        if self._waiting == 0:
            self._remaining = self.scope.deadline - anyio.current_time()
            self.scope.deadline = math.inf
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self.scope.deadline = anyio.current_time() + self._remaining


#: The call the current task is making (see the module docstring).
current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("haip_mcp_call", default=None)

RELATED_TASK = "io.modelcontextprotocol/related-task"
"""The `_meta` key tying a server's request (an elicitation) to the task it is for."""

TaskRunner = Callable[[], Awaitable[types.CallToolResult]]
"""Runs the call as an MCP task (`tasks.run_task`, bound to its call and its server's connection)."""


async def call_tool(
    client: Client,
    call: Call,
    tool: str,
    arguments: dict[str, Any],
    *,
    limit: float,
    on_progress: OnProgress | None,
    on_lost: Callable[[str], None],
    as_task: TaskRunner | None = None,
) -> ToolResult:
    """Run `tools/call` on the live `client` (as an MCP task with `as_task`); `on_lost` is told when
    the connection turns out dead."""
    token = current_call.set(call)
    try:
        with anyio.fail_after(limit) as call.scope:
            if as_task is not None:
                result = await as_task()
            else:
                progress = _progress_callback(call, on_progress)
                result = await client.call_tool(tool, arguments, progress_callback=progress)
    except TimeoutError as exc:
        raise ToolTimeoutError(
            f"MCP tool '{call.server}.{tool}' did not finish within {limit:g} s; it was cancelled on the server"
        ) from exc
    except MCPError as exc:
        if exc.code != types.CONNECTION_CLOSED:
            raise ToolError(f"MCP server {call.server!r} refused the call to {tool!r}: {exc.message}") from exc
        on_lost("the connection closed during a call")
        raise ToolError(f"MCP server {call.server!r} disconnected during the call") from exc
    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        on_lost("the connection closed during a call")
        raise ToolError(f"MCP server {call.server!r} disconnected during the call") from exc
    except (ValidationError, InputRequiredRoundsExceededError) as exc:
        raise ToolError(f"MCP server {call.server!r} answered the call to {tool!r} wrongly: {exc}") from exc
    except RuntimeError as exc:  # the SDK's check of a result against the tool's own outputSchema
        why = str(exc).partition("\n")[0]  # (jsonschema's message goes on to print the schema)
        raise ToolError(f"MCP server {call.server!r} answered the call to {tool!r} wrongly: {why}") from exc
    finally:
        call.done = True
        current_call.reset(token)
    return ToolResult(
        is_error=bool(result.is_error),
        content=[wire(block) for block in result.content],
        structured_content=result.structured_content,
    )


def _progress_callback(call: Call, on_progress: OnProgress | None) -> ProgressFnT | None:
    """Hand the call's progress to `on_progress`, never after the call returned (the SDK can be late)."""
    if on_progress is None:
        return None

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        if not call.done:
            await on_progress(Progress(progress, total, message))

    return progress


ELICIT_GRACE = 5.0
"""Seconds past `approval_timeout_seconds` before the bridge declines an unanswered elicitation itself.

Callers time the human out (the tool proxy does, with that same setting); this is the backstop
for a callback that never returns, since the call's own deadline is paused while it runs.
"""


def elicitation_callback(server: str, calls: set[Call], patience: float) -> ElicitationFnT:
    """The SDK callback for one server's elicitations: find the asking call and ask its caller."""

    async def elicit(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        call = _asking_call(server, calls, _task_of(context.meta))
        if call is None or call.on_elicit is None or not isinstance(params, types.ElicitRequestFormParams):
            logger.info("MCP server %r asked for input no caller can answer; declined", server)
            return types.ElicitResult(action="decline")
        request = ElicitationRequest(message=params.message, schema=dict(params.requested_schema))
        answer = await _ask(call, call.on_elicit, request, patience)
        try:
            return types.ElicitResult(action=answer.action, content=answer.content)
        except ValidationError:
            logger.warning("an answer to MCP server %r does not fit an elicitation result; declined", server)
            return types.ElicitResult(action="decline")

    return elicit


def _asking_call(server: str, calls: set[Call], task_id: str | None) -> Call | None:
    if task_id is not None:
        return next((call for call in calls if call.task_id == task_id), None)
    call = current_call.get()
    if call is not None and call.server == server:
        return call
    if len(calls) == 1:
        return next(iter(calls))
    return None


async def _ask(call: Call, on_elicit: OnElicit, request: ElicitationRequest, patience: float) -> ElicitationAnswer:
    """Ask the caller, with the call's own deadline paused; no answer or a failing callback declines."""
    with call.deadline_paused(), anyio.move_on_after(patience + ELICIT_GRACE):
        try:
            return await on_elicit(request)
        except Exception:  # the caller's bug must not break the MCP session's request handling
            logger.exception("on_elicit failed; declining the elicitation")
    return ElicitationAnswer(action="decline")


def _task_of(meta: Any) -> str | None:
    """The task id a server's request names in its `_meta`, if any."""
    related = meta.get(RELATED_TASK) if isinstance(meta, dict) else None
    task_id = related.get("taskId") if isinstance(related, dict) else None
    return task_id if isinstance(task_id, str) else None


def wire(model: BaseModel) -> dict[str, Any]:
    """An MCP model in wire form, without the SDK's `resultType` bookkeeping key."""
    data: dict[str, Any] = model.model_dump(by_alias=True, mode="json", exclude_none=True)
    data.pop("resultType", None)
    return data
