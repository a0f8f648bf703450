"""``serve --workers``' shared metrics (``server/worker_metrics.py``) against a real redis-server: what a
scrape answers with, and what it leaves out."""

from __future__ import annotations

import time

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from haip_runtime.server.worker_metrics import STALE_SECONDS, WorkerMetrics

pytestmark = pytest.mark.anyio


def counter(value: float) -> bytes:
    return f"# HELP x_total x\n# TYPE x_total counter\nx_total {value}\n".encode()


async def test_a_scrape_answers_for_every_live_worker_and_not_for_one_gone(redis_url: str, prefix: str) -> None:
    """A reviewer's find: the hash's expiry, renewed by every live worker's write, kept a field nobody wrote
    any more (a serve started again with fewer workers): its frozen counters were answered with for ever."""
    redis = Redis.from_url(redis_url)
    key = f"{prefix}:metrics:node-a"
    try:
        await redis.hset(key, "w1", f"{time.time():.3f}\n{counter(1.0).decode()}")
        await redis.hset(key, "w2", f"{time.time() - STALE_SECONDS - 1:.3f}\n{counter(7.0).decode()}")
        answer = await WorkerMetrics(redis, key, "w3", lambda: counter(3.0)).render()
        left = await redis.hkeys(key)
    finally:
        await redis.delete(key)
        await redis.aclose()
    [family] = text_string_to_metric_families(answer.decode())
    assert {sample.labels["worker"]: sample.value for sample in family.samples} == {"w1": 1.0, "w3": 3.0}
    assert left == [b"w1"]  # the one gone was deleted too


async def test_a_worker_that_stops_takes_its_metrics_with_it(redis_url: str, prefix: str) -> None:
    redis = Redis.from_url(redis_url)
    key = f"{prefix}:metrics:node-b"
    shared = WorkerMetrics(redis, key, "w1", lambda: counter(1.0))
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(shared.run)
            with anyio.fail_after(10):
                while not await redis.hexists(key, "w1"):  # (its first write is at once)
                    await anyio.lowlevel.checkpoint()
            group.cancel_scope.cancel()
        assert not await redis.hexists(key, "w1")
    finally:
        await redis.delete(key)
        await redis.aclose()
