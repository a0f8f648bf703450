"""Long agent runs offered as MCP tasks (the 2025-11-25 "tasks" utility), the HAIP side.

A task is the same run a plain `tools/call` makes (`McpDoor.run`, handed in as `run`: the same transaction, members,
approvals and cancellation), started in the door's own task group so that it outlives the request
that created it. The MCP client then follows it with `tasks/get` and takes its answer with
`tasks/result`, which waits for the end and meanwhile carries the run's questions to the client
(`input_required`). The SDK side (`bridge.facade`) turns these values into MCP messages.

Tasks are bounded: each lives at most `[mcp_server] task_ttl_seconds` from its creation (a running
one is then cancelled) and is forgotten then; a user holds at most `max_tasks_per_user` (the oldest
finished one makes room, else the new one is refused).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.abc

from haip_runtime.auth.tokens import Principal
from haip_runtime.exceptions import ProtocolError, TaskRefusedError
from haip_runtime.protocol.envelope import new_id

logger = logging.getLogger(__name__)

POLL_MS = 500
"""The `pollInterval` suggested to clients."""

TERMINAL = frozenset({"completed", "failed", "cancelled"})

Report = Callable[[str], Awaitable[None]]
Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class _Run(Protocol):
    """What a run saw so far (`mcp_door`'s run): enough to answer for a task cancelled mid-run."""

    def text(self) -> str: ...

    def structured(self, *, cancelled: bool = False) -> dict[str, Any]: ...


class RunAgent(Protocol):
    """`McpDoor.run`: one turn of an agent, to its answer (a `facade.AgentAnswer`)."""

    async def __call__(
        self,
        caller: Any,
        agent: str,
        message: str,
        conversation_id: str | None,
        report: Report,
        ask: Ask | None = None,
        *,
        on_run: Callable[[Any], None] | None = None,
        slot: Any = None,
    ) -> Any: ...


class Reserve(Protocol):
    """`McpDoor.reserve`: admit a run now (a `ProtocolError` if not); the slot it returns is given back
    (`give_back()`, once) when the run ends."""

    def __call__(self, caller: Any, agent: str) -> Any: ...


OnStatus = Callable[[Any], Coroutine[Any, Any, None]]
"""Told each new state of the task (a `facade.TaskView`), to notify the client."""
OnEnd = Callable[[str, str], None]
"""Told (agent, final status) when a task ends: `completed`, `failed` or `cancelled`."""


@dataclass(eq=False)
class _Question:
    message: str
    schema: dict[str, Any]
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer: dict[str, Any] | None = None
    asking: anyio.CancelScope | None = None
    """The `tasks/result` asking the client now. Cancelled when a human answered first (the run
    withdraws it), or when a newer `tasks/result` takes the question over: a client may drop a
    `tasks/result` stream and ask again, and the question must not stay with the dropped one."""


@dataclass(eq=False)
class _Task:
    id: str
    user: str
    agent: str
    ttl_ms: int
    on_status: OnStatus
    status: str = "working"
    message: str | None = "the agent is running"
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    answer: Any = None
    """The `facade.AgentAnswer`, once the task has ended."""
    run: _Run | None = None
    """The run, as it goes (`McpDoor.run` hands it over)."""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """The run's: cancelling it cancels the run."""
    kept: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """The whole task's, run and keeping: cancelling it forgets the task."""
    questions: list[_Question] = field(default_factory=list)
    news: list[Any] = field(default_factory=list)
    """States not yet told to the client, in order."""
    telling: bool = False
    changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def view(self) -> Any:
        from haip_runtime.bridge.facade import TaskView

        return TaskView(self.id, self.status, self.message, self.created, self.updated, self.ttl_ms, POLL_MS)

    def move(self, status: str, message: str | None) -> None:
        """A new state (never out of a terminal one), told to whoever waits and to the client."""
        if self.terminal or (status, message) == (self.status, self.message):
            return
        self.status, self.message, self.updated = status, message, datetime.now(UTC)
        self.changed.set()
        self.changed = anyio.Event()


class AgentTasks:
    """The tasks of the MCP door (the `TaskHost` of `bridge.facade`)."""

    def __init__(
        self,
        run: RunAgent,
        reserve: Reserve,
        *,
        ttl_seconds: float,
        per_user: int,
        on_end: OnEnd | None = None,
    ) -> None:
        self._run = run
        self._reserve = reserve
        self._ttl_ms = int(ttl_seconds * 1000)
        self._per_user = per_user
        self._on_end = on_end
        self._tasks: dict[str, _Task] = {}
        self._group: anyio.abc.TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Tasks run while this is entered; leaving cancels those still running."""
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = None
                group.cancel_scope.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

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
    ) -> Any:
        assert isinstance(caller, Principal), "the door authenticates every request"
        if self._group is None:
            raise TaskRefusedError("the server is shutting down")
        self._make_room(caller.user)
        try:  # refused now, not as a task that fails at once: no such agent, not allowed, too many runs
            slot = self._reserve(caller, agent)
        except ProtocolError as refusal:
            raise TaskRefusedError(f"{refusal.code}: {refusal.message}") from refusal
        ttl = self._ttl_ms if ttl_ms is None else max(1, min(ttl_ms, self._ttl_ms))
        task = _Task(f"task-{new_id()}", caller.user, agent, ttl, on_status)
        self._tasks[task.id] = task
        ask = self._asker(task) if can_ask else None
        self._group.start_soon(self._live, task, caller, message, conversation_id, report, ask, slot)
        return task.view()

    def task(self, caller: Any, task_id: str) -> Any:
        return self._find(caller, task_id).view()

    def tasks(self, caller: Any) -> list[Any]:
        user = caller.user if isinstance(caller, Principal) else None
        return [task.view() for task in self._tasks.values() if task.user == user]

    async def task_result(self, caller: Any, task_id: str, ask: Ask | None) -> Any:
        """The task's answer once it has ended; meanwhile its questions go to the client through `ask`.

        The newest `tasks/result` asks: one that finds a question another is asking takes it over (the
        other's client may be gone, and nothing tells the server so). A question this call's client
        could not answer, or that a newer call took, is left to the others and the humans."""
        task = self._find(caller, task_id)
        left: set[int] = set()  # questions this call leaves alone
        while not task.terminal:
            question = next((each for each in task.questions if id(each) not in left), None)
            if question is None or ask is None:
                await task.changed.wait()
                continue
            if question.asking is not None:
                question.asking.cancel()  # taken over
            with anyio.CancelScope() as scope:
                question.asking = scope
                try:
                    answer = await ask(question.message, question.schema)
                except Exception as exc:  # the client could not answer: the humans still may
                    logger.info("the MCP client could not answer task %s's question: %s", task.id, exc)
                    left.add(id(question))
                    continue
                finally:
                    if question.asking is scope:
                        question.asking = None
                question.answer = answer
                question.answered.set()
            if scope.cancelled_caught:  # withdrawn (a human answered) or taken over by a newer call
                left.add(id(question))
        return task.answer

    def cancel_task(self, caller: Any, task_id: str) -> Any:
        task = self._find(caller, task_id)
        if task.terminal:
            raise TaskRefusedError(f"task {task_id} has already ended ({task.status})")
        self._end(task, "cancelled", "cancelled by the client", self._cancelled_answer(task))
        task.scope.cancel()
        return task.view()

    # --- one task's life ---------------------------------------------------------------------------

    async def _live(
        self,
        task: _Task,
        caller: Principal,
        message: str,
        conversation_id: str | None,
        report: Report,
        ask: Ask | None,
        slot: Any,
    ) -> None:
        def seen(run: Any) -> None:
            task.run = run

        task.kept.deadline = anyio.current_time() + task.ttl_ms / 1000
        try:
            with task.kept:
                with task.scope:
                    try:
                        answer = await self._run(
                            caller, task.agent, message, conversation_id, report, ask, on_run=seen, slot=slot
                        )
                    except Exception:  # a bug in the run must not take the other tasks down with it
                        logger.exception("MCP task %s failed", task.id)
                        answer = self._failed_answer(task)
                    status = answer.structured.get("status")
                    if status == "CANCELLED":  # a member cancelled the run
                        self._end(task, "cancelled", "the run was cancelled", answer)
                    elif answer.is_error:
                        self._end(task, "failed", answer.text.partition("\n")[0], answer)
                    else:
                        self._end(task, "completed", "the agent has answered", answer)
                await anyio.sleep_forever()  # the answer is kept until the ttl ends
            self._end(task, "cancelled", "the task's ttl ran out", self._cancelled_answer(task))
        finally:
            slot.give_back()  # the run gave it back, unless it never started (cancelled at once)
            self._tasks.pop(task.id, None)
            if not task.terminal:  # the server stops
                self._end(task, "cancelled", "the server stopped", self._cancelled_answer(task))

    def _asker(self, task: _Task) -> Ask:
        """The run's `ask`: the question waits, `input_required`, for a `tasks/result` to take it to the
        client (or for a human to answer it first, when the run withdraws it)."""

        async def ask(message: str, schema: dict[str, Any]) -> dict[str, Any] | None:
            question = _Question(message, schema)
            task.questions.append(question)
            task.move("input_required", message)
            self._tell(task)
            try:
                await question.answered.wait()
                return question.answer
            finally:
                task.questions.remove(question)
                if question.asking is not None:
                    question.asking.cancel()  # answered by a human, or the run ended: the client's question goes
                if not task.questions:
                    task.move("working", "the agent is running")
                    self._tell(task)

        return ask

    def _end(self, task: _Task, status: str, message: str | None, answer: Any) -> None:
        if task.terminal:
            return
        task.answer = answer
        task.move(status, message)
        self._tell(task)
        if self._on_end is not None:
            self._on_end(task.agent, status)

    def _tell(self, task: _Task) -> None:
        """Tell the client the task's new state: one teller per task, so states arrive in order."""
        task.news.append(task.view())
        if self._group is not None and not task.telling:
            task.telling = True
            self._group.start_soon(self._teller, task)

    async def _teller(self, task: _Task) -> None:
        try:
            while task.news:
                await task.on_status(task.news.pop(0))
        finally:
            task.telling = False

    def _failed_answer(self, task: _Task) -> Any:
        from haip_runtime.bridge.facade import AgentAnswer

        said = task.run.structured() if task.run is not None else {"conversation_id": "", "tool_calls": []}
        error = {"code": "INTERNAL_ERROR", "message": "the run failed"}
        structured = {**said, "agent": task.agent, "status": "INTERNAL_ERROR", "error": error}
        return AgentAnswer("INTERNAL_ERROR: the run failed", structured, is_error=True)

    def _cancelled_answer(self, task: _Task) -> Any:
        from haip_runtime.bridge.facade import AgentAnswer

        run = task.run
        if run is None:
            structured = {"conversation_id": "", "agent": task.agent, "status": "CANCELLED", "tool_calls": []}
            return AgentAnswer("", structured)
        return AgentAnswer(run.text(), run.structured(cancelled=True))

    # --- bookkeeping -------------------------------------------------------------------------------

    def _find(self, caller: Any, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None or not isinstance(caller, Principal) or task.user != caller.user:
            raise TaskRefusedError(f"no task {task_id!r}")  # another user's task is not theirs to know of
        return task

    def _make_room(self, user: str) -> None:
        held = sorted((task for task in self._tasks.values() if task.user == user), key=lambda task: task.created)
        if len(held) < self._per_user:
            return
        ended = next((task for task in held if task.terminal), None)
        if ended is None:
            raise TaskRefusedError(f"RUN_LIMIT_EXCEEDED: you already have {self._per_user} MCP tasks running")
        self._tasks.pop(ended.id, None)
        ended.kept.cancel()  # the answer is dropped
