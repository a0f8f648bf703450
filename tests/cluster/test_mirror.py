"""The window mirror (``server/mirror.py``) on a real redis-server: when a session's window is in Redis, and
inbound ids waiting for the session's next frame (one script run for an echo's message and its answer)."""

from __future__ import annotations

import json

import anyio
import pytest

from haip_runtime.auth.tokens import Principal
from haip_runtime.cluster import Mirrored, ReplayOutcome, WindowUpdate
from haip_runtime.config.models import SessionConfig
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol.envelope import Event
from haip_runtime.protocol.events import ALL_EVENTS, TRANSACTION_ERA_EVENTS, Channel, EventType
from haip_runtime.server import mirror as mirror_module
from haip_runtime.server.mirror import WindowMirror
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from tests.cluster.conftest import BusFactory, until

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


async def test_inbound_ids_go_with_the_next_frame_or_alone_after_their_linger(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url) as bus:
        mirror = WindowMirror(bus, on_taken=lambda session: None)
        session = Session(Principal("u"), frozenset(ALL_EVENTS), SessionConfig())
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


async def test_a_session_handed_over_keeps_its_transactions_in_its_window_though_let_go_here(
    redis_url: str, bus_at: BusFactory
) -> None:
    """Letting a session go takes it out of this node's transactions before its last frames are flushed:
    the window must still name them, or the node taking it over rejoins none (found by a tester: a client
    resumed through a round-robin balancer stopped getting its conversation)."""
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        mirror = WindowMirror(a, lambda taken: None)
        held = session("H")
        mirror.track(held)
        held.transactions.add("T")
        event = Event(EventType.MESSAGE, "hello", channel=Channel.USER)
        event.stamp("T", 7, None)
        held.deliver(event)
        await mirror.flush()
        answer = Event(EventType.MESSAGE, "the answer", channel=Channel.AGENT)
        answer.stamp("T", 9, None)
        held.deliver(answer)  # recorded, not flushed yet: the release comes now

        mirror.hand_over(held)
        held.transactions.discard("T")  # what letting it go does (``Hub._let_go``)
        await mirror.flush()

        claimed = await b.replay.claim("H", "ann")
        assert claimed is not None
        assert json.loads(claimed.fields["tx"]) == {"T": 9}


async def test_a_question_asked_in_words_goes_with_the_window_and_closes_there_when_answered(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A client without TOOL_* events is asked approvals in words; its next MESSAGE answers, on whichever
    node it resumes (found by a tester: after a move the answer went to the agent as a message)."""
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        mirror = WindowMirror(a, lambda taken: None)
        legacy = Session(Principal("ann"), negotiate(sorted(TRANSACTION_ERA_EVENTS)), SessionConfig(), id="L")
        mirror.track(legacy)
        for type, payload in (("TOOL_CALL", {"tool": "demo.wipe"}), ("TOOL_UPDATE", {"status": "AWAITING_APPROVAL"})):
            event = Event(type, {"call_id": "c1", **payload}, channel=Channel.AGENT)
            event.stamp("T", 3, None)
            legacy.deliver(event)
        await mirror.flush()
        kept = await b.redis.hget(b.keys.replay_meta("L"), "q")  # what the node taking it over reads
        assert isinstance(kept, bytes)
        moved = Session(Principal("ann"), negotiate(sorted(TRANSACTION_ERA_EVENTS)), SessionConfig(), id="L")
        moved.questions.restore(kept.decode())
        question = moved.questions.first("T")
        assert question is not None and (question.call_id, question.kind) == ("c1", "approval")

        done = Event(EventType.TOOL_DONE, {"call_id": "c1", "status": "OK"}, channel=Channel.AGENT)
        done.stamp("T", 4, None)
        said = Event(EventType.MESSAGE, "demo.wipe returned: done", channel=Channel.AGENT)
        said.stamp("T", 5, None)
        legacy.deliver(done)  # (a client without TOOL_* gets no frame of it; the next frame writes the window)
        legacy.deliver(said)
        await mirror.flush()  # answered: nothing is open any more
        assert await a.redis.hget(a.keys.replay_meta("L"), "q") == b""


async def test_a_node_cut_off_while_its_client_resumed_elsewhere_does_not_take_the_session_back(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_WAITING`` frames waiting for a Redis that does not answer, a node makes its window anew
    once Redis is back; if the client resumed on another node meanwhile, that node keeps the session
    (found by a reviewer: the fresh window took it back, and the live session was let go)."""
    monkeypatch.setattr(mirror_module, "MAX_WAITING", 8)
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        let_go_at_a: list[str] = []
        let_go_at_b: list[str] = []
        old = WindowMirror(a, lambda taken: let_go_at_a.append(taken.id))
        mine = session("S")
        mine.send("INFO", {"event": "one"})
        old.track(mine)
        await old.flush()
        mirror = a.replay.mirror

        async def cut_off(updates: list[WindowUpdate]) -> list[Mirrored]:
            raise ClusterError("redis did not answer")

        monkeypatch.setattr(a.replay, "mirror", cut_off)
        for count in range(10):  # more than MAX_WAITING: the window is to be made anew
            mine.send("INFO", {"event": f"while cut off {count}"})
            with pytest.raises(ClusterError):
                await old.flush()
        claimed = await b.replay.claim("S", "ann")  # the client resumes on node-b
        assert claimed is not None
        new = WindowMirror(b, lambda taken: let_go_at_b.append(taken.id))
        moved = session("S")
        moved.carry_on([], int(claimed.fields["last"]), (None, 0), claimed.ids)
        new.track(moved, epoch=claimed.epoch, state=claimed.fields)

        monkeypatch.setattr(a.replay, "mirror", mirror)  # node-a reaches Redis again
        await old.flush()
        assert let_go_at_a == ["S"]
        holder = await b.replay.holder("S")
        assert holder is not None and holder[0] == "node-b"
        moved.send("INFO", {"event": "node-b's first"})
        await new.flush()
        assert let_go_at_b == []
        read = await b.replay.read_after("S", claimed.epoch, 1)
        assert read.outcome is ReplayOutcome.OK and [seq for seq, _ in read.envelopes] == [2]
