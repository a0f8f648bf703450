"""The tool proxy: the one path every tool call takes, from an agent or from a member.

It checks the catalog (the agent's servers, ``allowed_tools``, the user's permissions), asks the
transaction's members for approval where ``require_approval`` says so, relays MCP elicitations
to them, coalesces MCP progress, and tells the members everything as TOOL_CALL, TOOL_UPDATE
and TOOL_DONE. Cancellation (TOOL_CANCEL, RUN_CANCEL) cancels the MCP request itself through
the bridge. A tool failure, a refusal or a cancelled call is a ``ToolCallResult``, not an error.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio

from haip_runtime.auth.permissions import UNRESTRICTED, Permissions
from haip_runtime.config.models import McpServerConfig, tool_matches
from haip_runtime.exceptions import ProtocolError, ToolError, ToolTimeoutError, ToolUnavailableError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.codec import DEFAULT_MAX_FRAME_BYTES
from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import (
    ErrorCode,
    EventType,
    ServerState,
    ToolErrorCode,
    ToolOutcome,
    ToolStatus,
)
from haip_runtime.protocol.payloads import ToolEntry
from haip_runtime.tools.cutting import cut_result
from haip_runtime.tools.updates import Emit as Emit  # re-exported: agents publish through it
from haip_runtime.tools.updates import Updates, server_text

if TYPE_CHECKING:
    from haip_runtime.bridge import (
        ElicitationAnswer,
        ElicitationRequest,
        OnElicit,
        OnProgress,
        OnTask,
        ServerStatus,
        ToolInfo,
        ToolResult,
    )

logger = logging.getLogger(__name__)


class ToolBackend(Protocol):
    """What the proxy needs of the MCP bridge (``McpBridge``; the test harness has a fake)."""

    def tools(self, servers: Iterable[str] | None = None) -> list[ToolInfo]: ...

    def find_tool(self, full_name: str) -> ToolInfo | None: ...

    def status(self) -> dict[str, ServerStatus]: ...

    async def call_tool(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        on_progress: OnProgress | None = None,
        on_elicit: OnElicit | None = None,
        timeout: float | None = None,
        on_task: OnTask | None = None,
    ) -> ToolResult: ...


@dataclass(frozen=True)
class ToolView:
    """A tool as agents and humans see it: named ``server.tool``."""

    info: ToolInfo

    @property
    def name(self) -> str:
        return self.info.full_name

    @property
    def server(self) -> str:
        return self.info.server

    @property
    def description(self) -> str:
        return self.info.description

    @property
    def input_schema(self) -> dict[str, Any]:
        return self.info.input_schema

    def entry(self) -> ToolEntry:
        return ToolEntry(
            name=self.name, description=self.description, server=self.server, annotations=self.info.annotations
        )

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"name": self.name, "description": self.description, "inputSchema": self.input_schema}
        if self.info.output_schema is not None:
            schema["outputSchema"] = self.info.output_schema
        return schema


@dataclass(frozen=True)
class ToolCallResult:
    """How a call ended. ``status`` OK: the tool ran; ERROR: it failed or could not run; CANCELLED:
    cancelled or refused (``error["code"]``, a ``ToolErrorCode``, says which)."""

    call_id: str
    tool: str
    status: ToolOutcome
    content: list[dict[str, Any]] = field(default_factory=list)
    structured_content: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == ToolOutcome.OK

    @property
    def text(self) -> str:
        """The text content blocks, joined (or the error message)."""
        if self.error is not None:
            return str(self.error.get("message", ""))
        return content_text(self.content)

    @property
    def model_text(self) -> str:
        """What a model is told the call returned: its text, else its structured content, else the error."""
        if self.error is not None:
            return f"{self.error.get('code', 'ERROR')}: {self.error.get('message', '')}"
        if self.text or self.structured_content is None:
            return self.text
        return json.dumps(self.structured_content)

    @classmethod
    def from_done(cls, tool: str, done: dict[str, Any]) -> ToolCallResult:
        """The result a ``TOOL_DONE`` payload carries (a transaction's log, read back)."""
        given, error = done.get("result"), done.get("error")
        result: dict[str, Any] = given if isinstance(given, dict) else {}
        content, structured = result.get("content"), result.get("structuredContent")
        return cls(
            str(done.get("call_id", "")),
            tool,
            next((outcome for outcome in ToolOutcome if outcome == done.get("status")), ToolOutcome.ERROR),
            content if isinstance(content, list) else [],
            structured if isinstance(structured, dict) else None,
            error if isinstance(error, dict) else None,
        )

    def done_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"call_id": self.call_id, "status": self.status.value}
        if self.status != ToolOutcome.CANCELLED and (self.content or self.structured_content is not None):
            payload["result"] = {"content": self.content, "structuredContent": self.structured_content}
        if self.error is not None:
            payload["error"] = self.error
        return payload


@dataclass
class ActiveCall:
    """A call in flight, reachable by its ``call_id`` for TOOL_CANCEL and member answers."""

    call_id: str
    transaction_id: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    waiting_for: Literal["approval", "input"] | None = None
    #: The JSON Schema an input request's answer must fit (the server's ``requestedSchema``).
    schema: dict[str, Any] | None = None
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer: dict[str, Any] | None = None
    cancel_reason: str | None = None
    finished: anyio.Event = field(default_factory=anyio.Event)
    updates: Updates | None = None

    def ask(self, kind: Literal["approval", "input"], schema: dict[str, Any] | None = None) -> None:
        self.waiting_for, self.schema, self.answer, self.answered = kind, schema, None, anyio.Event()


class ToolProxy:
    """Runs tool calls through the MCP bridge with approval, elicitation, progress and cancellation."""

    def __init__(
        self,
        servers: Mapping[str, McpServerConfig],
        bridge: ToolBackend | None = None,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.servers = servers
        self.bridge = bridge
        #: A result is cut to its server's ``max_result_bytes``, and never past what one frame holds.
        self.max_frame_bytes = max_frame_bytes
        self.calls: dict[tuple[str, str], ActiveCall] = {}
        """Calls in flight by (transaction id, call id): call ids are scoped per transaction, so one
        user cannot learn which ids another user's transaction is using."""
        self._reserved: set[tuple[str, str]] = set()
        #: Called with (server, status, seconds) when a call ends (the runtime's metrics).
        self.on_done: Callable[[str, str, float], None] | None = None

    def reserve(self, transaction_id: str, call_id: str) -> bool:
        """Claim a client-chosen ``call_id`` in a transaction before its call starts; ``False`` if in use."""
        key = (transaction_id, call_id)
        if key in self.calls or key in self._reserved:
            return False
        self._reserved.add(key)
        return True

    def attach(self, bridge: ToolBackend) -> None:
        """Start using ``bridge`` (until then no tool is available: the servers are starting)."""
        self.bridge = bridge

    # --- the catalog -------------------------------------------------------------------------------

    def visible_tools(self, servers: Iterable[str], permissions: Permissions = UNRESTRICTED) -> list[ToolView]:
        """Tools of connected ``servers``, after ``allowed_tools`` and the user's permissions."""
        if self.bridge is None:
            return []
        tools = self.bridge.tools(list(servers))
        return [ToolView(info) for info in tools if permissions.may_use_tool(info.full_name)]

    def find(self, name: str) -> ToolView | None:
        info = None if self.bridge is None else self.bridge.find_tool(name)
        return None if info is None else ToolView(info)

    # --- calling -----------------------------------------------------------------------------------

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        transaction_id: str,
        run_id: str | None,
        allowed_servers: Iterable[str],
        caller: str,
        emit: Emit,
        permissions: Permissions = UNRESTRICTED,
        call_id: str | None = None,
    ) -> ToolCallResult:
        """Call ``name`` (``server.tool``), telling the members every step through ``emit``."""
        active = ActiveCall(call_id or new_id(), transaction_id)
        started = time.monotonic()
        key = (transaction_id, active.call_id)
        self._reserved.discard(key)
        server, _, tool = name.partition(".")
        emit(
            EventType.TOOL_CALL,
            {"call_id": active.call_id, "tool": name, "server": server, "params": arguments, "caller": caller},
        )
        refusal = self._refusal(name, server, allowed_servers, permissions)
        if refusal is not None:
            return self._done(emit, ToolCallResult(active.call_id, name, ToolOutcome.ERROR, error=refusal), started)
        self.calls[key] = active
        try:
            result = await self._run(active, name, server, tool, arguments, emit)
        except anyio.get_cancelled_exc_class():
            self._done(emit, _cancelled(active, name, active.cancel_reason or "the run was cancelled"), started)
            raise
        finally:
            self.calls.pop(key, None)
            active.finished.set()
        return self._done(emit, result, started)

    def _refusal(
        self, name: str, server: str, allowed: Iterable[str], permissions: Permissions
    ) -> dict[str, Any] | None:
        if server not in allowed:
            return error_body(ToolErrorCode.TOOL_NOT_FOUND, f"no tool {name!r} available here")
        if self.find(name) is None:
            down = self._unavailable(server)
            if down is not None:
                return error_body(ToolErrorCode.SERVER_UNAVAILABLE, down)
            return error_body(
                ToolErrorCode.TOOL_NOT_FOUND, f"MCP server {server!r} has no tool {name.partition('.')[2]!r}"
            )
        if not permissions.may_use_tool(name):
            return error_body(ToolErrorCode.UNAUTHORIZED, f"you may not use {name!r}")
        return None

    async def _run(
        self, active: ActiveCall, name: str, server: str, tool: str, arguments: dict[str, Any], emit: Emit
    ) -> ToolCallResult:
        update = active.updates = Updates(active.call_id, emit)
        with active.scope:
            if self._needs_approval(server, tool):
                refused = await self._approve(active, server, update)
                if refused is not None:
                    return ToolCallResult(active.call_id, name, ToolOutcome.CANCELLED, error=refused)
            update.send(ToolStatus.RUNNING)
            async with anyio.create_task_group() as timers:
                update.timers = timers
                try:
                    return await self._call_bridge(active, name, server, tool, arguments, update)
                finally:
                    update.flush()
                    timers.cancel_scope.cancel()
        return _cancelled(active, name, active.cancel_reason or "cancelled")

    async def _call_bridge(
        self, active: ActiveCall, name: str, server: str, tool: str, arguments: dict[str, Any], update: Updates
    ) -> ToolCallResult:
        assert self.bridge is not None  # _refusal found the tool, so the bridge is attached
        try:
            outcome = await self.bridge.call_tool(
                server,
                tool,
                arguments,
                on_progress=update.progress,
                on_elicit=lambda request: self._elicit(active, server, request, update),
                on_task=update.task,
            )
        except ToolTimeoutError as exc:
            return _failed(active, name, ToolErrorCode.TIMEOUT, str(exc))
        except ToolUnavailableError as exc:
            code = ToolErrorCode.SERVER_UNAVAILABLE if self._unavailable(server) else ToolErrorCode.TOOL_NOT_FOUND
            return _failed(active, name, code, str(exc))
        except ToolError as exc:
            return _failed(active, name, ToolErrorCode.TOOL_FAILED, str(exc))
        except Exception as exc:  # whatever a server or the SDK does, the call ends and members are told
            logger.exception("tool call %s to %s failed unexpectedly", active.call_id, name)
            return _failed(active, name, ToolErrorCode.TOOL_FAILED, f"the call failed: {type(exc).__name__}: {exc}")
        limit, where = self.servers[server].max_result_bytes, ""
        if self.max_frame_bytes < limit:
            limit, where = self.max_frame_bytes, "server.max_frame_bytes"
        content, structured = cut_result(outcome.content, outcome.structured_content, limit, server, where)
        status = ToolOutcome.ERROR if outcome.is_error else ToolOutcome.OK
        error = None
        if outcome.is_error:  # (its text, repeated, is cut like a server's message: the whole is in ``content``)
            said = server_text(content_text(content), ERROR_TEXT_MOST) or "tool error"
            error = error_body(ToolErrorCode.TOOL_ERROR, said)
        return ToolCallResult(active.call_id, name, status, content, structured, error)

    def is_down(self, server: str, servers: Iterable[str]) -> bool:
        """Whether ``server``, one of ``servers``, is configured but cannot take calls right now."""
        return server in servers and server in self.servers and self._unavailable(server) is not None

    def _unavailable(self, server: str) -> str | None:
        """Why ``server`` cannot take calls right now, or ``None`` if it is connected."""
        if self.bridge is None:
            return "the MCP servers are still starting; try again in a moment"
        status = self.bridge.status().get(server)
        if status is None or status.state is ServerState.CONNECTED:
            return None
        reason = f": {status.error}" if status.error else ""
        return f"MCP server {server!r} is not connected ({status.state.value}{reason})"

    def _needs_approval(self, server: str, tool: str) -> bool:
        return tool_matches(server, tool, self.servers[server].require_approval)

    def _patience(self, server: str) -> float:
        return self.servers[server].approval_timeout_seconds

    async def _approve(self, active: ActiveCall, server: str, update: Updates) -> dict[str, Any] | None:
        """``None`` if a member approved; else the refusal (rejected, or no answer in time)."""
        active.ask("approval")
        update.send(ToolStatus.AWAITING_APPROVAL, message="waiting for a member to approve or reject this call")
        answer = await self._wait_answer(active, server)
        if answer is None:
            return error_body(ToolErrorCode.APPROVAL_TIMEOUT, "nobody approved the call in time")
        if answer.get("decision") != "approve":
            reason = answer.get("reason")
            return error_body(ToolErrorCode.REJECTED, f"rejected by {answer['by']}" + (f": {reason}" if reason else ""))
        return None

    async def _elicit(
        self, active: ActiveCall, server: str, request: ElicitationRequest, update: Updates
    ) -> ElicitationAnswer:
        from haip_runtime.bridge import ElicitationAnswer

        # "server" says who is asking: the text is the MCP server's, not the runtime's or an agent's.
        asked = {"message": server_text(request.message, ELICIT_TEXT_MOST), "schema": request.schema, "server": server}
        if fastjson.size(asked) > self.max_frame_bytes // 2:  # (a tester's find: it went out past the frame limit)
            logger.warning("MCP server %r asked for input in a request too large to send: declined", server)
            return ElicitationAnswer("decline")
        active.ask("input", request.schema if isinstance(request.schema, dict) else None)
        update.send(ToolStatus.INPUT_REQUIRED, request=asked)
        answer = await self._wait_answer(active, server)
        if answer is None:  # MCP's "cancel": dismissed without a choice (an agent author's find: a timeout
            # looked like a member's decline to the tool, and members saw the call run on without a word)
            update.send(ToolStatus.RUNNING, message=f"nobody answered within {self._patience(server):g} s")
            return ElicitationAnswer("cancel")
        if answer.get("decision") == "decline" or answer.get("input") is None:
            update.send(ToolStatus.RUNNING, message=f"declined by {answer['by']}")
            return ElicitationAnswer("decline")
        update.send(ToolStatus.RUNNING, message=f"answered by {answer['by']}")
        return ElicitationAnswer("accept", answer["input"])

    async def _wait_answer(self, active: ActiveCall, server: str) -> dict[str, Any] | None:
        with anyio.move_on_after(self._patience(server)):
            await active.answered.wait()
        active.waiting_for = None
        return active.answer

    def _done(self, emit: Emit, result: ToolCallResult, started: float) -> ToolCallResult:
        emit(EventType.TOOL_DONE, result.done_payload())
        if self.on_done is not None:
            self.on_done(result.tool.partition(".")[0], result.status, time.monotonic() - started)
        return result

    # --- members acting on a call --------------------------------------------------------------------

    def answer(self, call_id: str, transaction_id: str, user: str, answer: dict[str, Any], related_id: str) -> None:
        """A member's TOOL_UPDATE: a ``decision`` on an approval, or ``input`` / decline for an elicitation."""
        active = self._active(call_id, transaction_id, related_id)
        if active.waiting_for is None or active.answered.is_set():
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"call {call_id} is not waiting for an answer",
                related_id=related_id,
                detail={"where": "/payload/call_id"},
            )
        check_answer(active.waiting_for, active.schema, answer, related_id)
        active.answer = {**answer, "by": user}
        active.answered.set()

    def cancel(self, call_id: str, transaction_id: str, user: str, reason: str | None, related_id: str) -> None:
        active = self._active(call_id, transaction_id, related_id)
        active.cancel_reason = f"cancelled by {user}" + (f": {reason}" if reason else "")
        if active.updates is not None and not active.scope.cancel_called:
            active.updates.send(ToolStatus.CANCELLING, message=active.cancel_reason)
        active.scope.cancel()

    def has_calls(self, transaction_id: str) -> bool:
        """Whether any call is in flight in the transaction."""
        return any(active.transaction_id == transaction_id for active in self.calls.values())

    def cancel_transaction(self, transaction_id: str, reason: str) -> list[ActiveCall]:
        """Cancel every call in flight in a transaction (it is ending); returns them to wait on."""
        calls = [active for active in self.calls.values() if active.transaction_id == transaction_id]
        for active in calls:
            active.cancel_reason = reason
            active.scope.cancel()
        return calls

    def _active(self, call_id: str, transaction_id: str, related_id: str) -> ActiveCall:
        active = self.calls.get((transaction_id, call_id))
        if active is None:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"no call {call_id!r} in flight in this transaction",
                related_id=related_id,
                detail={"where": "/payload/call_id"},
            )
        return active


def check_answer(waiting_for: str, schema: dict[str, Any] | None, answer: dict[str, Any], related_id: str) -> None:
    """``INVALID_PAYLOAD`` for an answer the call waiting for ``waiting_for`` (``approval``, ``input``
    with ``schema``) cannot take; the call goes on waiting. Also run by a cluster node for a member
    answering a call of the node that runs the turns, which would only log the refusal."""
    if waiting_for == "approval" and answer.get("decision") not in ("approve", "reject"):
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "an approval needs decision 'approve' or 'reject'",
            related_id=related_id,
            detail={"where": "/payload/decision"},
        )
    if waiting_for == "input" and answer.get("input") is None and answer.get("decision") != "decline":
        raise ProtocolError(  # (a prober's find: an "approve" was taken, as a decline)
            ErrorCode.INVALID_PAYLOAD,
            "an input request needs 'input', or decision 'decline'",
            related_id=related_id,
            detail={"where": "/payload/input"},
        )
    if waiting_for == "input" and answer.get("input") is not None and schema is not None:
        _check_input(answer["input"], schema, related_id)  # a mistake is asked again, not sent on


def _check_input(given: Any, schema: dict[str, Any], related_id: str) -> None:
    """``INVALID_PAYLOAD`` (naming the field) for an answer to an input request that does not fit the
    schema the server asked with: the server would refuse it, and the whole call would fail with it.
    The request goes on waiting for a good answer.

    The schema is the MCP server's, so it is read with care: references are not followed (the default
    registry would fetch any URL a ``$ref`` names, from the event loop) and ``pattern`` is not run (a
    server's regular expression could take the loop for ever on a member's input); MCP's elicitation
    schemas are flat objects of plain fields, which need neither. A schema this cannot read lets the
    answer through: the server checks what it gets itself, as it did before."""
    try:
        error = next(iter(_input_checker()(schema, registry=_empty_registry()).iter_errors(given)), None)
    except Exception as unreadable:  # (UnknownType, TypeError, re.error, an unresolvable reference...)
        logger.info("an input request's schema could not be checked against (%r); the answer goes on", unreadable)
        return
    if error is not None:
        path = [str(part) for part in error.absolute_path]
        if error.validator == "required" and isinstance(error.instance, dict):  # the field missing, not its object
            # (an integrator's find: where named the object, where the guide says the field)
            missing = [name for name in error.validator_value if name not in error.instance]
            path += missing[:1]
        where = "/payload/input" + "".join(f"/{part}" for part in path)
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"the answer does not fit the input request at {where}: {error.message}; the request still waits",
            related_id=related_id,
            detail={"where": where},
        )


@functools.cache
def _input_checker() -> Any:
    """Draft 2020-12 without the keywords ``_check_input`` must not run (made once, on the first answer)."""
    from jsonschema import Draft202012Validator, validators

    def skipped(*_: Any) -> None:
        return None

    keywords = ("$ref", "$dynamicRef", "pattern", "patternProperties")
    return validators.extend(Draft202012Validator, dict.fromkeys(keywords, skipped))  # type: ignore[no-untyped-call]


def _empty_registry() -> Any:
    """An empty registry: a ``$ref`` to anything outside the schema is not fetched (it is not followed at all)."""
    from referencing import Registry

    return Registry()


def _failed(active: ActiveCall, name: str, code: ToolErrorCode, message: str) -> ToolCallResult:
    return ToolCallResult(active.call_id, name, ToolOutcome.ERROR, error=error_body(code, message))


def _cancelled(active: ActiveCall, name: str, reason: str) -> ToolCallResult:
    return ToolCallResult(
        active.call_id, name, ToolOutcome.CANCELLED, error=error_body(ToolErrorCode.CANCELLED, reason)
    )


def content_text(content: list[dict[str, Any]]) -> str:
    """The text content blocks of an MCP result, joined."""
    return "\n".join(str(block.get("text", "")) for block in content if block.get("type") == "text")


#: The most characters of an MCP server's input request's message sent to members.
ELICIT_TEXT_MOST = 4096
#: The most characters of a tool error's text repeated as its ``error.message`` (the whole is in its content,
#: cut to fit the frame: a reviewer's find, the repeat took a cut error past the frame limit again).
ERROR_TEXT_MOST = 512
