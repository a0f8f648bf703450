"""The bus: reaching Redis, its health through a Redis outage, and which nodes are alive."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from haip_runtime.cluster import Bus, BusState
from haip_runtime.cluster.dialing import COMMAND_SOCKET_TIMEOUT
from haip_runtime.exceptions import ClusterError
from haip_runtime.protocol.events import ErrorCode
from tests.cluster.conftest import BusFactory, Collector, make_config, until
from tests.support.netcut import netcut
from tests.support.ports import free_port
from tests.support.redis import RedisServer

pytestmark = pytest.mark.anyio


async def test_a_redis_that_never_answers_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(f"redis://127.0.0.1:{free_port()}/0", "t", connect_timeout_seconds=0.3)
    with pytest.raises(ClusterError) as caught:
        async with Bus(config):
            pass  # pragma: no cover
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE
    assert "did not answer within 0.3 s" in str(caught.value)
    waiting = [r.getMessage() for r in caplog.records if "does not answer yet" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].endswith("; trying for 0.3 s")  # said once, as it began to wait


async def test_health_goes_unavailable_when_redis_stops_and_ok_by_itself_when_it_is_back(
    own_redis: RedisServer, bus_at: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="haip_runtime.cluster")
    async with bus_at(own_redis.url) as a, bus_at(own_redis.url) as b:
        seen = Collector()
        await b.feed.host("T", seen)
        assert a.health.public() == {"state": "ok", "error": None, "failures": 0, "recoveries": 0}
        await anyio.to_thread.run_sync(own_redis.stop)
        with anyio.fail_after(5):
            await a.health.wait_for(BusState.UNAVAILABLE)
        assert a.health.error is not None and "onnect" in a.health.error
        with pytest.raises(ClusterError):
            await a.log.append("T", b"nowhere")
        await anyio.to_thread.run_sync(own_redis.start)
        with anyio.fail_after(10):
            await a.health.wait_for(BusState.OK)
            await b.health.wait_for(BusState.OK)
        assert a.health.recoveries >= 1 and a.health.error is None
        await a.log.append("T", b"back", floor=0)
        await seen.wait(1)
        assert seen.payloads == [b"back"]
    # Once each, per node: the loss (each reconnect said it again: a tester counted a dozen lines for a
    # 2.5 s restart), and the return (nothing said it was over).
    lost = [r for r in caplog.records if "cluster feed lost redis" in r.getMessage() and r.levelno == logging.WARNING]
    back = [r for r in caplog.records if "redis answers again after" in r.getMessage()]
    assert len(lost) == 2 and len(back) >= 2, caplog.text


async def test_live_nodes_are_listed_and_a_leaving_node_drops_out(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, node_id="one") as a:
        async with bus_at(redis_url, node_id="two") as b:
            assert await a.nodes.live() == ["one", "two"] and b.node_id == "two"
        assert await a.nodes.live() == ["one"]


async def test_a_node_tells_its_agents_and_others_ask_whether_a_live_node_runs_them_all(
    redis_url: str, prefix: str
) -> None:
    """A node lacking one of a conversation's agents defers its turns to a node running them all, if a
    live one does; an agent retired everywhere is not waited for (a reviewer: every conversation that
    had it waited a lease's time for its first turn)."""
    async with Bus(make_config(redis_url, prefix, node_id="full"), agents=["echo", "patient"]) as full:
        async with Bus(make_config(redis_url, prefix, node_id="lacking"), agents=["echo"]) as lacking:
            assert await lacking.nodes.able(["patient"]) and await lacking.nodes.able(["echo", "patient"])
            assert not await lacking.nodes.able(["patient", "retired"])
        assert await full.nodes.able(["echo"])
    async with Bus(make_config(redis_url, prefix, node_id="alone"), agents=["echo"]) as alone:
        assert not await alone.nodes.able(["patient"])  # "full" left: nobody runs it now
        assert await alone.redis.hkeys(alone.keys.node_agents()) == [b"alone"]


async def test_a_node_that_stops_beating_drops_out(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url, node_id="one") as a:
        await a.redis.zadd(a.keys.nodes(), {"ghost": 0})  # a node whose last beat ran out long ago
        await a.redis.hset(a.keys.node_agents(), "ghost", "echo")
        assert await a.nodes.live() == ["one"]
        assert await a.redis.hkeys(a.keys.node_agents()) == [b"one"]  # (its agents go with it)
        # A node whose beat lapses: a lifetime shorter than its beat, which a config cannot say (model_copy).
        lapsing = make_config(redis_url, a.config.key_prefix, node_id="short").model_copy(
            update={"node_ttl_seconds": 0.2, "heartbeat_seconds": 60}
        )
        async with Bus(lapsing):

            async def gone() -> bool:
                return await a.nodes.live() == ["one"]

            await until(gone)


async def test_a_node_id_is_made_when_none_is_configured(redis_url: str, bus_at: BusFactory) -> None:
    async with bus_at(redis_url) as a, bus_at(redis_url) as b:
        assert a.node_id != b.node_id and sorted(await a.nodes.live()) == sorted([a.node_id, b.node_id])


async def test_more_commands_at_once_than_connections_wait_for_one_rather_than_fail(
    redis_url: str, bus_at: BusFactory
) -> None:
    tseqs: list[int] = []

    async def append(n: int) -> None:
        tseqs.append(await bus.log.append(f"busy-{n}", b"x"))

    async with bus_at(redis_url) as bus:
        async with anyio.create_task_group() as tg:
            for n in range(300):  # past redis-py's default pool (100: "Too many connections") and ours (32)
                tg.start_soon(append, n)
        state = bus.health.state
    assert tseqs == [1] * 300 and state is BusState.OK


async def test_deployments_on_two_databases_of_one_redis_do_not_hear_each_other(
    redis_url: str, bus_at: BusFactory
) -> None:
    """Keys live in a database, channels do not: a node on db 5 named like one on db 0 (a staging
    deployment beside production, same default prefix) was subscribed to its channels and got its
    forwarded POSTs (a tester's finding). Channels now name the database when it is not 0."""
    other_db = redis_url.rsplit("/", 1)[0] + "/5"
    async with bus_at(redis_url, node_id="same") as production, bus_at(other_db, node_id="same") as staging:
        got, seen_elsewhere = Collector(), Collector()
        await production.feed.host("T", got)
        await staging.feed.host("T", seen_elsewhere)
        listeners = await production.redis.pubsub_numsub(
            production.keys.node_channel("same"), production.keys.channel("T")
        )
        await production.log.append("T", b"for production only", floor=0)
        await got.wait(1)
        told = await staging.tell("same", b"hello")  # reaches staging's own node, not production's
    assert production.keys.node_channel("same") != staging.keys.node_channel("same")
    assert [count for _, count in listeners] == [1, 1]
    assert got.payloads == [b"for production only"] and seen_elsewhere.payloads == [] and told


async def test_a_redis_that_hangs_makes_even_an_idle_node_unavailable_within_a_commands_timeout(
    own_redis: RedisServer, bus_at: BusFactory
) -> None:
    """A node with nothing to say notices through its heartbeat; redis-py tried each timed-out command
    twice more (6 s where the guide's failure table says 2 s: a tester), and a retried write may run twice."""
    with netcut(own_redis.port) as cut:
        async with bus_at(f"redis://127.0.0.1:{cut.port}/0", heartbeat_seconds=0.2) as bus:
            await bus.nodes.beat()
            cut.cut("hang")
            with anyio.fail_after(COMMAND_SOCKET_TIMEOUT + 1.5):  # one timeout and a heartbeat, not three
                await bus.health.wait_for(BusState.UNAVAILABLE)
            said = bus.health.error
            cut.heal()
    assert said is not None and "Timeout" in said


@pytest.mark.parametrize(
    ("query", "said"),
    [
        (
            "ssl_ca_certs=/ca.pem",
            "the URL's option 'ssl_ca_certs' is not one redis-py takes here (TLS options need rediss://)",
        ),
        ("foo=bar", "the URL's option 'foo' is not one redis-py takes here"),
        ("socket_timeout=soon", "the URL's options: Invalid value for 'socket_timeout' in connection URL."),
        ("protocol=7", "the URL's options: protocol must be either 2 or 3"),  # (a reviewer's find: a traceback)
        (
            "decode_responses=true",
            "the URL's option 'decode_responses' cannot be used: the cluster reads Redis's bytes",
        ),
    ],
)
async def test_a_url_option_redis_cannot_take_is_one_line_at_once(query: str, said: str) -> None:
    """An operator's find: ``redis://...?ssl_ca_certs=`` (TLS options on a plain URL) or a typo crashed
    ``serve`` and ``check --connect`` with a traceback (no Redis is reached: it is said before)."""
    from haip_runtime.cluster.dialing import preflight
    from haip_runtime.exceptions import ConfigError

    with anyio.fail_after(5), pytest.raises(ConfigError) as caught:
        await preflight(f"redis://127.0.0.1:9/0?{query}", "redis://127.0.0.1:9/0", 30)
    assert str(caught.value) == f"cluster.redis_url: {said}"


async def test_a_tls_file_the_url_names_that_is_not_there_is_said_at_once(tmp_path: Path) -> None:
    """An operator's find: it was retried for connect_timeout_seconds, then said as 'Error 2 connecting'."""
    from haip_runtime.cluster.dialing import preflight
    from haip_runtime.exceptions import ConfigError

    missing = tmp_path / "ca.pem"
    with anyio.fail_after(5), pytest.raises(ConfigError) as caught:
        await preflight(f"rediss://127.0.0.1:9/0?ssl_ca_certs={missing}", "rediss://127.0.0.1:9/0", 30)
    assert str(caught.value) == f"cluster.redis_url: the URL's ssl_ca_certs names no file: '{missing}'"
