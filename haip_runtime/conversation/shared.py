"""What a transaction needs of its log when a cluster shares it: ``Shared`` (``relay.SharedLog`` is one),
and the form of an event in the log on the bus (``entry``, ``entry_event``).

Kept apart from ``relay.py`` so that the transaction knows only this narrow view and the relay
alone knows the transaction (imports go one way)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Event


class Shared(Protocol):
    """A transaction's log on the cluster's bus, seen from one node."""

    #: Whether this node runs the transaction's turns.
    owner: bool
    #: Runs the log shows started and not ended, by run id.
    open_runs: dict[str, str]
    #: Messages from members elsewhere no run has answered yet, by message id.
    unanswered: OrderedDict[str, tuple[dict[str, Any], dict[str, Any]]]
    #: Users the log shows joined on other nodes.
    users_elsewhere: set[str]
    #: Calls the log shows waiting for a member's answer.
    waiting_calls: set[str]

    def send(self, event: Event, turn: dict[str, Any] | None = None, then: Callable[[], None] | None = None) -> None:
        """Queue ``event`` for the log; ``turn``: the owner answers it; ``then``: once delivered here."""

    def control(self, kind: str, **fields: Any) -> None:
        """Ask the owner to do something (a log entry no member sees)."""

    def stop(self) -> None:
        """The transaction left this node: send what is queued, then stop following the log."""


def entry(event: Event, node: str, turn: dict[str, Any] | None = None) -> bytes:
    """``event`` as an entry of the log on the bus: its envelope fields and payload (encoded once, as
    every member gets it), the node that published it and, for a message another node answers,
    who sent it (``turn``)."""
    head: dict[str, Any] = {"n": node, "id": event.id, "type": event.type, "channel": event.channel, "ts": event.ts}
    if event.run_id is not None:
        head["run_id"] = event.run_id
    if event.exclude:
        head["exclude"] = sorted(event.exclude)
    if turn is not None:
        head["turn"] = turn
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
