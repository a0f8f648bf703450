"""What a transaction needs of a member: ``Member``, which a session here is, and ``RemoteMember``, one
on another node of a cluster (what the node running the turns knows of it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from haip_runtime.auth.permissions import Permissions
from haip_runtime.auth.tokens import Principal

if TYPE_CHECKING:
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


@dataclass
class RemoteMember:
    """A member whose session is on another node: what the owner's turns need of them (never delivered
    to here: its own node's feed delivers to it)."""

    id: str
    user: str
    principal: Principal
    accepted: frozenset[str] = frozenset()
    transactions: set[str] = field(default_factory=set)

    def deliver(self, event: Event) -> None:
        return None


def describe(member: Member) -> dict[str, Any]:
    """What the owner needs to run a turn for ``member``: its id, user, roles and what they permit."""
    principal = member.principal
    rights = principal.permissions
    return {
        "id": member.id,
        "user": member.user,
        "roles": list(principal.roles),
        "agents": None if rights.agents is None else list(rights.agents),
        "tools": None if rights.tools is None else list(rights.tools),
        "join_others": rights.join_others,
        "events": None if rights.events is None else list(rights.events),
    }


def remote_member(about: dict[str, Any]) -> RemoteMember:
    def globs(key: str) -> tuple[str, ...] | None:
        value = about.get(key)
        return None if value is None else tuple(str(item) for item in value)

    rights = Permissions(globs("agents"), globs("tools"), bool(about.get("join_others")), globs("events"))
    principal = Principal(str(about["user"]), roles=tuple(about.get("roles") or ()), permissions=rights)
    return RemoteMember(str(about["id"]), principal.user, principal)
