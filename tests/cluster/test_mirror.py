"""The window mirror (``server/mirror.py``) on a real redis-server: when a session's window is in Redis."""

from __future__ import annotations

import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.cluster import ReplayOutcome
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.server.mirror import WindowMirror
from haip_runtime.session.session import Session
from tests.cluster.conftest import BusFactory

pytestmark = pytest.mark.anyio


def session(session_id: str) -> Session:
    return Session(Principal("ann"), frozenset(ALL_EVENTS), SessionConfig(), id=session_id)


async def test_a_new_window_is_made_at_the_first_flush_and_a_window_taken_over_is_there_already(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        old = WindowMirror(a, lambda taken: None)
        mine = session("S")
        mine.send("INFO", {"event": "one"})
        old.track(mine)
        assert not old.made("S")  # a handshake waits for its session's first flush (``published``)
        await old.flush()
        assert old.made("S") and old.flushes == 1

        new = WindowMirror(b, lambda taken: None)
        claimed = await b.replay.claim("S", "ann")
        assert claimed is not None
        moved = session("S")
        moved.carry_on([], 1, (None, 0), claimed.ids)
        new.track(moved, epoch=claimed.epoch, state=claimed.fields)
        assert new.made("S")  # nothing to wait for: the claim left the window there, held by node-b
        await new.flush()
        assert new.flushes == 0  # and nothing was written for it
        moved.send("INFO", {"event": "two"})  # its next frame goes to that window
        await new.flush()
        read = await b.replay.read_after("S", claimed.epoch, 1)
        assert read.outcome is ReplayOutcome.OK and [seq for seq, _ in read.envelopes] == [2]
        assert not new.made("T")
