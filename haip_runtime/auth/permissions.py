"""What a user may do: roles from a JWT claim, mapped through ``[roles.*]`` to agent, tool and event globs.

With no ``[roles]`` table every user may start every agent and use every tool (a single-team
deployment), but joins only their own transactions. Otherwise a user gets the union of their
roles' grants (``may_join_others`` lets them join anyone's); a role that is not configured grants nothing.
``check_event`` is the one check of which event types a user may send.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from haip_runtime.config.models import AuthConfig, RoleConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ErrorCode, EventType

#: Session mechanics every authenticated client may send, whatever its roles.
ALWAYS_ALLOWED = frozenset(
    {
        EventType.HAI,
        EventType.PING,
        EventType.PONG,
        EventType.FLOW_UPDATE,
        EventType.REPLAY_REQUEST,
        EventType.PAUSE_CHANNEL,
        EventType.RESUME_CHANNEL,
    }
)


@dataclass(frozen=True)
class Permissions:
    """Globs a user's roles grant; ``None`` means unrestricted."""

    agents: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None
    join_others: bool = False
    events: tuple[str, ...] | None = None

    def may_start(self, agent: str) -> bool:
        return _matches(agent, self.agents)

    def may_use_tool(self, tool: str) -> bool:
        return _matches(tool, self.tools)

    def may_send(self, event_type: str) -> bool:
        return event_type in ALWAYS_ALLOWED or _matches(event_type, self.events)


UNRESTRICTED = Permissions()


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def roles_of(claims: Mapping[str, Any], auth: AuthConfig) -> tuple[str, ...]:
    value = claims.get(auth.roles_claim)
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return tuple(auth.default_roles)


def permissions_for(roles: Iterable[str], table: Mapping[str, RoleConfig]) -> Permissions:
    if not table:
        return UNRESTRICTED
    granted = [table[role] for role in roles if role in table]
    return Permissions(
        agents=tuple(pattern for role in granted for pattern in role.agents),
        tools=tuple(pattern for role in granted for pattern in role.tools),
        join_others=any(role.may_join_others for role in granted),
        events=tuple(pattern for role in granted for pattern in role.events),
    )


def check_event(permissions: Permissions, envelope: Envelope) -> None:
    """Refuse an envelope whose type the sender's roles do not allow (``ERROR UNAUTHORIZED``)."""
    if not permissions.may_send(envelope.type):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"you may not send {envelope.type}", related_id=envelope.id)
