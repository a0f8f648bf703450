"""What a transaction needs of its log when a cluster shares it: ``Shared`` (``relay.SharedLog`` is one),
and the form of an event in the log on the bus (``entry``, ``entry_event``).

Kept apart from ``relay.py`` so that the transaction knows only this narrow view and the relay
alone knows the transaction (imports go one way)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import Channel, ErrorCode, EventType, ToolErrorCode, ToolOutcome, ToolStatus

if TYPE_CHECKING:
    from haip_runtime.conversation.members import Member

_ENDS = (EventType.RUN_FINISHED, EventType.RUN_ERROR)
_WAITING = (ToolStatus.AWAITING_APPROVAL, ToolStatus.INPUT_REQUIRED)
#: The types ``follow`` looks at (most of a log is not: messages and their parts go by at once).
_FOLLOWED = frozenset(
    {
        EventType.RUN_STARTED,
        *_ENDS,
        EventType.INFO,
        EventType.TOOL_CALL,
        EventType.TOOL_UPDATE,
        EventType.TOOL_DONE,
        EventType.TRANSACTION_JOIN,
        EventType.MESSAGE_START,
        EventType.MESSAGE_END,
    }
)


class OpenRuns(Protocol):
    """The runs a log shows open, with their streamed messages and tool calls (what ``end_lost`` ends)."""

    #: Runs the log shows started and not ended, by run id.
    open_runs: dict[str, str]
    #: Calls the log shows made and not done, with the run each belongs to (a lost run's end them).
    open_calls: dict[str, str | None]
    #: Streamed messages the log shows started and not ended, with the run each belongs to.
    open_messages: dict[str, str]


class LogState(OpenRuns, Protocol):
    """What ``follow`` keeps of a transaction's log: what it shows open."""

    #: The message each open run answers, by run id (a ``RUN_CANCEL`` may name a run by its message).
    answering: dict[str, str]
    #: Messages from members elsewhere no run has answered yet, by message id.
    unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]]
    #: Users the log shows joined on other nodes.
    users_elsewhere: set[str]
    #: Calls the log shows waiting for a member's answer, with the run each belongs to.
    waiting_calls: dict[str, str | None]
    #: What each of those waits for: ``approval``, or ``input`` with the request's schema (an answer
    #: from here is checked before it goes to the node running the turns).
    asked: dict[str, tuple[str, dict[str, Any] | None]]


@dataclass
class Followed:
    """A ``LogState`` of its own: what a stored log shows open (a transaction brought back after its
    server stopped without ending its runs: ``end_lost``)."""

    open_runs: dict[str, str] = field(default_factory=dict)
    answering: dict[str, str] = field(default_factory=dict)
    unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=OrderedDict)
    users_elsewhere: set[str] = field(default_factory=set)
    waiting_calls: dict[str, str | None] = field(default_factory=dict)
    asked: dict[str, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)
    open_calls: dict[str, str | None] = field(default_factory=dict)
    open_messages: dict[str, str] = field(default_factory=dict)


def end_lost(publish: Callable[[Event], object], state: OpenRuns, run_id: str, message: str, call_message: str) -> None:
    """End ``run_id``, which the log shows open though nothing runs it any more (its node was lost, or
    the server stopped without ending it): its streamed messages cut short (``MESSAGE_END``, as a run
    cancelled ends them: clients that show a message at its end showed nothing), its tool calls not
    done (``TOOL_DONE`` ``TOOL_FAILED``: the one that made them stopped them, or died), then ``RUN_ERROR
    NODE_LOST`` with ``message``."""
    for message_id in [message for message, run in state.open_messages.items() if run == run_id]:
        publish(Event(EventType.MESSAGE_END, {"message_id": message_id}, channel=Channel.AGENT, run_id=run_id))
    for call_id in [call for call, run in state.open_calls.items() if run == run_id]:
        failed = {
            "call_id": call_id,
            "status": ToolOutcome.ERROR,
            "error": error_body(ToolErrorCode.TOOL_FAILED, call_message),
        }
        publish(Event(EventType.TOOL_DONE, failed, channel=Channel.AGENT, run_id=run_id))
    lost = {"run_id": run_id, **error_body(ErrorCode.NODE_LOST, message)}
    publish(Event(EventType.RUN_ERROR, lost, channel=Channel.AGENT, run_id=run_id))
    state.open_runs.pop(run_id, None)


class Shared(LogState, Protocol):
    """A transaction's log on the cluster's bus, seen from one node."""

    #: Whether this node runs the transaction's turns.
    owner: bool
    #: How long the turns may take to move to another node.
    handover: float

    def send(self, event: Event, turn: dict[str, Any] | None = None, then: Callable[[], None] | None = None) -> None:
        """Queue ``event`` for the log; ``turn``: the owner answers it; ``then``: once delivered here."""

    def pace(self) -> Awaitable[None] | None:
        """Back-pressure for a streaming agent: what to wait for while this node's own streamed parts are
        far behind on their way through the bus, else ``None``."""

    def control(self, kind: str, **fields: Any) -> None:
        """Ask the owner to do something (a log entry no member sees)."""

    def unavailable(self) -> str | None:
        """Why the bus cannot take what is published now (Redis does not answer: it waits, in order), else ``None``."""

    def turn(self, member: Member, traceparent: str | None, *, answered: bool) -> dict[str, Any]:
        """What a message carries for the node running the turns."""

    async def following(self) -> None:
        """Until the feed follows the log (a transaction just brought back: what Redis held is delivered)."""

    async def filled(self, last: int) -> None:
        """Once the feed follows the log: deliver from the store what it holds up to ``last`` that the
        bus did not bring (Redis lost or trimmed it), so the transaction here is at ``last``."""

    def authored(self, user: str, message_id: str) -> bool:
        """Whether the recent log holds ``user``'s message ``message_id`` (for an edit, where no history is kept)."""

    def stop(self) -> None:
        """The transaction left this node: send what is queued, then stop following the log."""


def entry(event: Event, node: str, turn: dict[str, Any] | None = None, seed: dict[str, Any] | None = None) -> bytes:
    """``event`` as an entry of the log on the bus: its envelope fields and payload (encoded once, as
    every member gets it), the node that published it and, for a message another node answers,
    who sent it (``turn``); for the TRANSACTION_START, what its record begins with (``seed``)."""
    head: dict[str, Any] = {"n": node, "id": event.id, "type": event.type, "channel": event.channel, "ts": event.ts}
    if event.run_id is not None:
        head["run_id"] = event.run_id
    if event.exclude:
        head["exclude"] = sorted(event.exclude)
    if turn is not None:
        head["turn"] = turn
    if seed is not None:
        head["seed"] = seed
    return (fastjson.dumps(head)[:-1] + ',"payload":' + event.payload_json + "}").encode()


def entry_event(data: dict[str, Any], transaction: str, tseq: int, thread_id: str | None) -> Event:
    """The event an entry of ``transaction``'s log (decoded) carries, at ``tseq``."""
    event = Event(
        type=data["type"],
        payload=data["payload"],
        channel=data["channel"],
        run_id=data.get("run_id"),
        id=data["id"],
        ts=data["ts"],
        exclude=frozenset(data.get("exclude") or ()),
    )
    event.stamp(transaction, tseq, thread_id)
    return event


def follow(shared: LogState, event: Event, users: dict[str, None]) -> None:
    """Keep what a takeover and the members of this node need to know of the log: the runs open, the
    messages unanswered, the calls waiting for an answer, the users joined elsewhere (``users``:
    the transaction's readers, who join it)."""
    if event.type not in _FOLLOWED:
        return
    payload = event.payload if isinstance(event.payload, dict) else {}
    if event.type == EventType.MESSAGE_START and event.run_id and payload.get("message_id"):
        shared.open_messages[str(payload["message_id"])] = event.run_id
    elif event.type == EventType.MESSAGE_END:
        shared.open_messages.pop(str(payload.get("message_id", "")), None)
    elif event.type == EventType.RUN_STARTED and event.run_id:
        shared.open_runs[event.run_id] = str(payload.get("agent", ""))
        shared.answering[event.run_id] = str(payload.get("message_id", ""))
        shared.unanswered.pop(str(payload.get("message_id", "")), None)
    elif event.type in _ENDS and event.run_id:
        shared.open_runs.pop(event.run_id, None)
        shared.answering.pop(event.run_id, None)
        for open_ in (shared.waiting_calls, shared.open_calls, shared.open_messages):
            for key in [key for key, run in open_.items() if run == event.run_id]:
                del open_[key]  # its run ended (NODE_LOST among others): nobody waits
        for key in [key for key in shared.asked if key not in shared.waiting_calls]:
            del shared.asked[key]
    elif event.type == EventType.INFO and payload.get("event") == "run.unqueued":
        shared.unanswered.pop(str(payload.get("message_id", "")), None)
    elif event.type == EventType.TOOL_UPDATE and payload.get("status") in _WAITING:
        call_id = str(payload.get("call_id", ""))
        shared.waiting_calls[call_id] = event.run_id
        if payload["status"] == ToolStatus.AWAITING_APPROVAL:
            shared.asked[call_id] = ("approval", None)
        else:
            request = payload.get("request")
            schema = request.get("schema") if isinstance(request, dict) else None
            shared.asked[call_id] = ("input", schema if isinstance(schema, dict) else None)
    elif event.type == EventType.TOOL_CALL and payload.get("call_id") and event.run_id:  # (a run's: NODE_LOST ends it)
        shared.open_calls[str(payload["call_id"])] = event.run_id
    elif event.type in (EventType.TOOL_DONE, EventType.TOOL_UPDATE) and payload.get("call_id"):
        shared.waiting_calls.pop(str(payload["call_id"]), None)
        shared.asked.pop(str(payload["call_id"]), None)
        if event.type == EventType.TOOL_DONE:
            shared.open_calls.pop(str(payload["call_id"]), None)
    elif event.type == EventType.TRANSACTION_JOIN and payload.get("joined"):
        shared.users_elsewhere.add(str(payload["joined"]))
        users.setdefault(str(payload["joined"]), None)
    elif event.type == EventType.INFO and payload.get("event") == "member.left":
        shared.users_elsewhere.discard(str(payload.get("user", "")))


def wrote(user: str, message_id: str, events: list[Event]) -> bool:
    """Whether ``events`` hold ``user``'s message ``message_id``."""
    return any(
        event.type == EventType.MESSAGE
        and isinstance(event.payload, dict)
        and (event.payload.get("message_id"), event.payload.get("author")) == (message_id, user)
        for event in events
    )
