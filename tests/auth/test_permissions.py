"""Role grants: agents, tools and event types, as the union of a user's roles."""

from __future__ import annotations

import pytest

from haip_runtime.auth.permissions import UNRESTRICTED, check_event, permissions_for
from haip_runtime.config.models import RoleConfig
from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol.envelope import Envelope


def envelope(type: str) -> Envelope:
    return Envelope.model_validate(
        {"id": "e1", "session": "", "seq": "1", "ts": "1", "channel": "USER", "type": type, "payload": {}}
    )


def test_event_globs_are_the_union_of_roles_and_session_mechanics_always_pass() -> None:
    table = {"viewer": RoleConfig(events=["TOOL_LIST", "TRANSACTION_JOIN"]), "chat": RoleConfig(events=["MESSAGE*"])}
    viewer = permissions_for(["viewer"], table)
    both = permissions_for(["viewer", "chat", "unconfigured"], table)
    assert viewer.may_send("TOOL_LIST") and viewer.may_send("PING") and viewer.may_send("FLOW_UPDATE")
    assert not viewer.may_send("MESSAGE") and both.may_send("MESSAGE_UPDATE")
    assert not permissions_for(["unconfigured"], table).may_send("MESSAGE")
    assert UNRESTRICTED.may_send("ANYTHING")


def test_check_event_refuses_with_unauthorized_naming_the_envelope() -> None:
    viewer = permissions_for(["viewer"], {"viewer": RoleConfig(events=["TOOL_LIST"])})
    check_event(viewer, envelope("TOOL_LIST"))
    with pytest.raises(ProtocolError) as caught:
        check_event(viewer, envelope("TRANSACTION_START"))
    assert caught.value.code == "UNAUTHORIZED" and caught.value.related_id == "e1"
