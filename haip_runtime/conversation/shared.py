"""What a transaction needs of its log when a cluster shares it: ``Shared`` (``relay.SharedLog`` is one).

Kept apart from ``relay.py`` so that the transaction knows only this narrow view and the relay
alone knows the transaction (imports go one way)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
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
