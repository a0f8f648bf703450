"""What a transaction needs of a member: ``Member``, which a session here (or, later, on another node) is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from haip_runtime.auth.tokens import Principal
    from haip_runtime.protocol.envelope import Event


class Member(Protocol):
    """What a transaction needs of a member: a session, here or (later) on another node."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def accepted(self) -> frozenset[str]:
        """The event types the member's client takes (its HAI ``accept_events``)."""
        ...

    transactions: set[str]

    def deliver(self, event: Event) -> None: ...
