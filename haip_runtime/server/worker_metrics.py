"""``/metrics`` under ``serve --workers N``: every worker's numbers, whichever worker answers.

The workers share one port, so each scrape reaches one of them, by chance: each answered with its own
numbers alone, and Prometheus saw one process's counters, then another's, as one series going up and
down (an operator's find). Now each worker writes its metrics, as Prometheus text, to Redis every
``SHARE_SECONDS`` (a hash for the workers of one ``serve``, a field each, expiring when none writes);
``/metrics`` answers with its own, as they are now, and the others' as last written, every sample
labelled ``worker="w<N>"``. A worker started again after dying writes under the same label: its
counters start again from 0, which Prometheus takes as a reset (as for any restart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import anyio

from haip_runtime.exceptions import ClusterError

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

#: How often a worker writes its metrics for the others to answer with.
SHARE_SECONDS = 5.0
#: How long the others' metrics may take to read before a scrape answers with this worker's alone.
READ_TIMEOUT = 1.0


class WorkerMetrics:
    """This worker's metrics shared with the other workers of its ``serve``, and theirs read back."""

    def __init__(self, redis: Redis, key: str, worker: str, render: Callable[[], bytes]) -> None:
        self._redis = redis
        self._key = key
        self.worker = worker
        self._render = render

    async def run(self) -> None:
        """Write this worker's metrics every ``SHARE_SECONDS`` until cancelled (Redis away: next time)."""
        while True:
            try:
                await self._share()
            except (ClusterError, OSError, ConnectionError, TimeoutError) as error:
                logger.debug("cluster: sharing this worker's metrics failed: %s", error)
            except Exception:  # (redis-py's own errors among others): it goes on
                logger.exception("cluster: sharing this worker's metrics failed")
            await anyio.sleep(SHARE_SECONDS)

    async def _share(self) -> None:
        text = self._render()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key, self.worker, text)
            pipe.pexpire(self._key, int(SHARE_SECONDS * 3 * 1000))
            await pipe.execute()

    async def render(self) -> bytes:
        """This worker's metrics now and the others' as last written, each sample labelled by its worker;
        this worker's alone (labelled too) if Redis does not answer in time."""
        texts: dict[str, str] = {}
        with anyio.move_on_after(READ_TIMEOUT):
            try:
                shared = await self._redis.hgetall(self._key)
                texts = {_text(worker): _text(text) for worker, text in shared.items()}
            except Exception as error:  # (the scrape still answers, with what this worker has)
                logger.debug("cluster: reading the workers' metrics failed: %s", error)
        texts[self.worker] = self._render().decode()
        return merged(texts)


def merged(texts: Mapping[str, str]) -> bytes:
    """Prometheus text of several workers' metrics (``worker`` -> its text) as one, each sample labelled
    ``worker``; a family's samples together under one HELP and TYPE, as the format requires."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            into.samples += [sample._replace(labels={**sample.labels, "worker": worker}) for sample in family.samples]

    class Merged:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
