"""Sessions' replay windows: any node resumes a session, with every missed envelope once, in order."""

from __future__ import annotations

import anyio
import pytest

from haip_runtime.cluster import Mirrored, ReplayOutcome, ReplayRead, Taken, WindowUpdate
from haip_runtime.cluster.replay import MAX_IDS
from haip_runtime.cluster.replies import stream_rows, text
from tests.cluster.conftest import BusFactory
from tests.support.redis import running_redis

pytestmark = pytest.mark.anyio


async def test_another_node_reads_every_envelope_after_a_seq(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        epoch = await a.replay.start("S")
        for seq in range(1, 8):
            assert await a.replay.append("S", epoch, seq, f'{{"seq":{seq}}}')
        assert await b.replay.epoch("S") == epoch
        read = await b.replay.read_after("S", epoch, 4)
        assert read == ReplayRead(ReplayOutcome.OK, [(5, b'{"seq":5}'), (6, b'{"seq":6}'), (7, b'{"seq":7}')], 7)
        assert await b.replay.read_after("S", epoch, 7) == ReplayRead(ReplayOutcome.OK, [], 7)
        assert (await b.replay.read_after("S", epoch, 9)).outcome is ReplayOutcome.AHEAD
        with pytest.raises(ValueError, match="seq 7 is not after"):
            await a.replay.append("S", epoch, 7, "again")


async def test_a_long_miss_is_read_in_pages(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, replay_max_events=2000) as a:
        epoch = await a.replay.start("S")
        for seq in range(1, 1201):
            await a.replay.append("S", epoch, seq, b"e%d" % seq)
        read = await a.replay.read_after("S", epoch, 100)
        assert read.outcome is ReplayOutcome.OK and [seq for seq, _ in read.envelopes] == list(range(101, 1201))


async def test_the_window_is_trimmed_by_length(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, replay_max_events=5) as a:
        epoch = await a.replay.start("S")
        for seq in range(1, 9):
            await a.replay.append("S", epoch, seq, b"e%d" % seq)
        assert await a.redis.xlen(a.keys.replay("S")) == 5
        assert (await a.replay.read_after("S", epoch, 2)).outcome is ReplayOutcome.TOO_OLD
        read = await a.replay.read_after("S", epoch, 3)
        assert read.outcome is ReplayOutcome.OK and [seq for seq, _ in read.envelopes] == [4, 5, 6, 7, 8]


async def test_the_window_is_trimmed_by_age(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, replay_max_age_seconds=60) as a:
        epoch = await a.replay.start("S")
        seconds, _ = await a.redis.time()
        old = (int(seconds) - 120) * 1000  # envelopes kept two minutes ago, as their stream ids say
        for seq in (1, 2):
            await a.redis.xadd(a.keys.replay("S"), {"s": seq, "d": b"old"}, id=f"{old}-{seq}")
        await a.redis.hset(a.keys.replay_meta("S"), "last", 2)
        await a.replay.append("S", epoch, 3, b"new")
        assert await a.redis.xlen(a.keys.replay("S")) == 1
        assert (await a.replay.read_after("S", epoch, 1)).outcome is ReplayOutcome.TOO_OLD
        assert (await a.replay.read_after("S", epoch, 2)).envelopes == [(3, b"new")]
        assert 0 < await a.redis.pttl(a.keys.replay("S")) <= 60_000


async def test_a_new_epoch_tells_the_resuming_node_the_history_is_gone(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        old = await a.replay.start("S")
        await a.replay.append("S", old, 1, b"one")
        new = await b.replay.start("S")
        assert new != old
        assert await b.replay.read_after("S", old, 0) == ReplayRead(ReplayOutcome.RESTARTED, last=0)
        assert not await a.replay.append("S", old, 2, b"two")  # the old epoch's writer learns it too
        assert await b.replay.read_after("S", new, 0) == ReplayRead(ReplayOutcome.OK, [], 0)


async def test_a_window_redis_lost_is_never_taken_for_an_empty_one(bus_at: BusFactory) -> None:
    with running_redis() as server:
        async with bus_at(server.url) as a:
            epoch = await a.replay.start("S")
            await a.replay.append("S", epoch, 1, b"one")
            await anyio.to_thread.run_sync(server.restart)  # no persistence
            assert await a.replay.read_after("S", epoch, 1) == ReplayRead(ReplayOutcome.UNKNOWN)
            assert not await a.replay.append("S", epoch, 2, b"two")


async def test_a_closed_session_window_is_deleted(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a:
        epoch = await a.replay.start("S")
        await a.replay.append("S", epoch, 1, b"one")
        await a.replay.delete("S")
        assert await a.replay.epoch("S") is None
        assert await a.redis.exists(a.keys.replay("S"), a.keys.replay_meta("S")) == 0


async def test_inbound_dedup_is_shared_by_the_nodes(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, dedup_seconds=30) as a, bus_at(redis_url) as b:
        assert not await a.dedup.seen("S", "m1")
        assert await b.dedup.seen("S", "m1")
        assert await a.dedup.seen("S", "m1")
        assert not await b.dedup.seen("S", "m2") and not await b.dedup.seen("R", "m1")
        assert 0 < await a.redis.pttl(a.keys.inbound("S", "m1")) <= 30_000


async def test_mirrored_windows_carry_state_and_ids_and_are_taken_over_whole(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        first = WindowUpdate("S", "e1", [(1, b"one"), (2, b"two")], {"user": "ann", "in": "3"}, ["i1", "i2"], True)
        other = WindowUpdate("T", "e2", [(1, b"x")], {"user": "bob"}, [], True)
        assert await a.replay.mirror([first, other]) == [Mirrored.KEPT, Mirrored.KEPT]
        again = WindowUpdate("S", "e1", [(2, b"two"), (3, b"three")], {"tx": '{"T1": 4}'}, ["i3"])
        assert await a.replay.mirror([again]) == [Mirrored.KEPT]  # seq 2 again is skipped, not kept twice
        assert await b.replay.holder("S") == ("node-a", "ann")
        assert await b.replay.claim("S", "bob") is None  # another user's: nothing said, nothing moved
        assert await b.replay.claim("nobody", "ann") is None
        claimed = await b.replay.claim("S", "ann")
        assert claimed is not None and claimed.epoch == "e1" and claimed.ids == ["i1", "i2", "i3"]
        assert (
            claimed.fields["in"] == "3" and claimed.fields["tx"] == '{"T1": 4}' and claimed.fields["node"] == "node-b"
        )
        read = await b.replay.read_after("S", "e1", 0)
        assert read.envelopes == [(1, b"one"), (2, b"two"), (3, b"three")]
        # The old node's next flush is refused: two nodes never both keep the session.
        assert await a.replay.mirror([WindowUpdate("S", "e1", [(4, b"late")])]) == [Mirrored.TAKEN]
        assert await b.replay.mirror([WindowUpdate("S", "e1", [(4, b"four")])]) == [Mirrored.KEPT]
        assert await b.replay.mirror([WindowUpdate("S", "stale", [(5, b"five")])]) == [Mirrored.LOST]
        assert (await b.replay.read_after("S", "e1", 3)).envelopes == [(4, b"four")]
        await b.replay.delete("S")
        assert await a.replay.holder("S") is None


async def test_a_flush_with_more_ids_than_are_kept_keeps_the_newest_in_order(
    redis_url: str, bus_at: BusFactory
) -> None:
    """Ids piled up while Redis was away go in one run (pushed in chunks): the newest ``MAX_IDS`` stay."""
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        ids = [f"id{n}" for n in range(2 * MAX_IDS + 500)]
        assert await a.replay.mirror([WindowUpdate("S", "e1", [(1, b"one")], {"user": "ann"}, ids, True)]) == [
            Mirrored.KEPT
        ]
        claimed = await b.replay.claim("S", "ann")
        assert claimed is not None and claimed.ids == ids[-MAX_IDS:]
        assert (await b.replay.read_after("S", "e1", 0)).envelopes == [(1, b"one")]


async def test_nodes_agree_on_one_epoch_until_redis_loses_it(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        epoch = await a.nodes.epoch()
        assert await b.nodes.epoch() == epoch
        await a.redis.delete(a.keys.epoch())  # as a restart without persistence does
        renewed = await b.nodes.epoch()
        assert renewed != epoch and await a.nodes.epoch() == renewed


async def test_a_notice_reaches_the_node_it_is_told_to_and_no_other(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        heard: list[bytes] = []
        arrived = anyio.Event()

        def note(message: bytes) -> None:
            heard.append(message)
            arrived.set()

        a.feed.on_notice = note
        b.feed.on_notice = note
        assert await b.tell("node-a", b"release S")
        with anyio.fail_after(5):
            await arrived.wait()
        assert not await b.tell("node-gone", b"release S")  # nobody listens: the sender knows at once
    assert heard == [b"release S"]


async def test_a_take_over_claims_and_reads_the_window_of_a_node_gone(redis_url: str, bus_at: BusFactory) -> None:
    """A dead node's session: claimed and read at once, with the state and ids beside it."""
    async with bus_at(redis_url, node_id="node-b", replay_max_events=2000) as b:
        frames = [(seq, b"e%d" % seq) for seq in range(1, 1201)]  # more than a page (500)
        update = WindowUpdate("S", "e1", frames, {"user": "ann", "in": "n:4"}, ["i1", "i2"], True)
        assert await b.replay.mirror([update]) == [Mirrored.KEPT]
        await b.redis.hset(b.keys.replay_meta("S"), "node", "node-gone")  # as a node that died left it
        assert await b.replay.take_over("S", "bob", 0) is Taken.OTHER_USER
        assert await b.replay.take_over("nobody", "ann", 0) is Taken.UNKNOWN
        assert await b.redis.hget(b.keys.replay_meta("S"), "node") == b"node-gone"  # neither moved it
        taken = await b.replay.take_over("S", "ann", 150)
        assert not isinstance(taken, Taken)
        claimed, read = taken
        assert claimed.holder == "node-gone" and claimed.fields["node"] == "node-b" and claimed.ids == ["i1", "i2"]
        assert claimed.fields["in"] == "n:4" and claimed.epoch == "e1"
        assert read.outcome is ReplayOutcome.OK and read.last == 1200
        assert read.envelopes == frames[150:]  # every one after seq 150, once, in order
        again = await b.replay.take_over("S", "ann", 1200)  # nothing missed
        assert not isinstance(again, Taken) and again[1] == ReplayRead(ReplayOutcome.OK, [], 1200)
        ahead = await b.replay.take_over("S", "ann", 1201)
        assert not isinstance(ahead, Taken) and ahead[1] == ReplayRead(ReplayOutcome.AHEAD, last=1200)


async def test_a_take_over_asks_a_listening_holder_first_and_moves_nothing(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        heard: list[bytes] = []
        arrived = anyio.Event()

        def note(message: bytes) -> None:
            heard.append(message)
            arrived.set()

        a.feed.on_notice = note
        update = WindowUpdate("S", "e1", [(1, b"one"), (2, b"two")], {"user": "ann"}, [], True)
        assert await a.replay.mirror([update]) == [Mirrored.KEPT]
        assert await b.replay.take_over("S", "ann", 0) is Taken.ASKED
        with anyio.fail_after(5):
            await arrived.wait()
        assert heard == [b"release S node-b 0"]  # (the seq the resume is after: the holder checks it)
        assert await a.replay.mirror([WindowUpdate("S", "e1", [(3, b"three")])]) == [Mirrored.KEPT]  # still a's
        taken = await b.replay.take_over("S", "ann", 1, force=True)  # once a let it go (or had the time to)
        assert not isinstance(taken, Taken) and taken[0].holder == "node-a"
        assert taken[1] == ReplayRead(ReplayOutcome.OK, [(2, b"two"), (3, b"three")], 3)
        assert await a.replay.mirror([WindowUpdate("S", "e1", [(4, b"late")])]) == [Mirrored.TAKEN]
        mine = await b.replay.take_over("S", "ann", 3)  # the holder is this node: nobody to ask
        assert not isinstance(mine, Taken) and mine[0].holder == "node-b"


async def test_a_take_over_says_too_old_when_the_window_lost_what_the_client_missed(
    redis_url: str, bus_at: BusFactory
) -> None:
    async with bus_at(redis_url, node_id="node-b", replay_max_events=5) as b:
        frames = [(seq, b"e%d" % seq) for seq in range(1, 9)]
        assert await b.replay.mirror([WindowUpdate("S", "e1", frames, {"user": "ann"}, [], True)]) == [Mirrored.KEPT]
        taken = await b.replay.take_over("S", "ann", 2)
        assert not isinstance(taken, Taken) and taken[1] == ReplayRead(ReplayOutcome.TOO_OLD, last=8)
        taken = await b.replay.take_over("S", "ann", 3)
        assert not isinstance(taken, Taken) and [seq for seq, _ in taken[1].envelopes] == [4, 5, 6, 7, 8]
        await b.redis.delete(b.keys.replay("S"))  # the stream expired while its hash lived on
        taken = await b.replay.take_over("S", "ann", 3)
        assert not isinstance(taken, Taken) and taken[1].outcome is ReplayOutcome.TOO_OLD


async def test_a_window_made_anew_while_it_was_read_is_not_taken_for_the_claimed_one(
    redis_url: str, bus_at: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch is read again behind the envelopes: a window replaced between the claim and the read
    (its envelopes another epoch's) says so instead of handing those envelopes over. (Only the node
    holding a session may make its window anew: node-a, which held it before the claim, is refused.)"""
    async with bus_at(redis_url, node_id="node-a") as a, bus_at(redis_url, node_id="node-b") as b:
        old = WindowUpdate("S", "e1", [(1, b"one"), (2, b"two")], {"user": "ann"}, [], True)
        assert await a.replay.mirror([old]) == [Mirrored.KEPT]
        claim = b.replay._take

        async def claim_then_replaced(session: str, user: str, force: bool, after: int = 0) -> object:
            claimed = await claim(session, user, force, after)
            new = WindowUpdate("S", "e2", [(1, b"uno"), (2, b"dos")], {"user": "ann"}, [], True)
            assert await a.replay.mirror([new]) == [Mirrored.TAKEN]
            assert await b.replay.mirror([new]) == [Mirrored.KEPT]
            return claimed

        monkeypatch.setattr(b.replay, "_take", claim_then_replaced)
        taken = await b.replay.take_over("S", "ann", 0, force=True)
        assert not isinstance(taken, Taken) and taken[1] == ReplayRead(ReplayOutcome.RESTARTED, last=2)

        async def claim_then_deleted(session: str, user: str, force: bool, after: int = 0) -> object:
            claimed = await claim(session, user, force, after)
            await a.replay.delete("S")
            return claimed

        monkeypatch.setattr(b.replay, "_take", claim_then_deleted)
        taken = await b.replay.take_over("S", "ann", 0, force=True)
        assert not isinstance(taken, Taken) and taken[1] == ReplayRead(ReplayOutcome.UNKNOWN, last=2)


async def test_a_mirrored_window_is_bounded_in_bytes_and_a_resume_past_it_is_too_old(
    redis_url: str, bus_at: BusFactory
) -> None:
    """A prober's find: a window kept ``replay_max_events`` envelopes whatever their size (1,000 frames of
    1 MiB a session), so one user's large frames could fill Redis for every node."""
    cap = 64 * 1024
    async with bus_at(redis_url, node_id="node-a", replay_max_bytes=cap) as a:
        big = b"x" * 10_000
        for seq in range(1, 31):
            fields = {"user": "ann"} if seq == 1 else {}
            assert await a.replay.mirror([WindowUpdate("S", "e1", [(seq, big)], fields, [], seq == 1)]) == [
                Mirrored.KEPT
            ]
        kept = stream_rows(await a.redis.xrange(a.keys.replay("S")))
        held = sum(len(value) for _, fields in kept for value in fields.values())
        counted = int(text(await a.redis.hget(a.keys.replay_meta("S"), "bytes")) or 0)
        assert held <= cap and len(kept) >= 5 and counted >= held
        newest = await a.replay.read_after("S", "e1", 29)
        assert newest.outcome is ReplayOutcome.OK and newest.envelopes == [(30, big)]
        assert (await a.replay.read_after("S", "e1", 1)).outcome is ReplayOutcome.TOO_OLD
