"""The window mirror against a real Redis: inbound ids wait for the session's next frame (one script run
for an echo's message and its answer), and reach Redis alone once their linger is over."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.cluster import Bus
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.server.mirror import WindowMirror
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from tests.cluster.conftest import until

pytestmark = pytest.mark.anyio


async def test_inbound_ids_go_with_the_next_frame_or_alone_after_their_linger(redis_url: str, prefix: str) -> None:
    config = ClusterConfig(redis_url=redis_url, key_prefix=prefix, heartbeat_seconds=0.1, node_ttl_seconds=1)
    async with Bus(config) as bus:
        mirror = WindowMirror(bus, on_taken=lambda session: None)
        session = Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig())
        ids_key = bus.keys.replay_ids(session.id)

        async def kept_ids() -> list[bytes]:
            kept = await bus.redis.lrange(ids_key, 0, -1)  # newest first
            return [bytes(item) for item in reversed(kept) if isinstance(item, bytes)]

        mirror.track(session)
        await mirror.flush(lingering=False)  # the new window
        assert mirror.flushes == 1

        mirror.took(session, "message-1")
        await mirror.flush(lingering=False)
        assert mirror.flushes == 1 and await kept_ids() == []  # the id waits for a frame
        session.send("MESSAGE", {"text": "the answer"})
        await mirror.flush(lingering=False)
        assert mirror.flushes == 2 and mirror.frames == 1  # one script run: the frame and the id
        assert await kept_ids() == [b"message-1"]

        mirror.took(session, "message-2")
        await mirror.flush()  # a session handed over or closing: everything, lingering ids too
        assert mirror.flushes == 3 and await kept_ids() == [b"message-1", b"message-2"]

        async with anyio.create_task_group() as tg:
            tg.start_soon(mirror.run)
            mirror.took(session, "message-3")  # nothing follows: it goes alone once its linger is over

            async def third_kept() -> bool:
                return b"message-3" in await kept_ids()

            await until(third_kept)
            tg.cancel_scope.cancel()
        assert mirror.flushes == 4
