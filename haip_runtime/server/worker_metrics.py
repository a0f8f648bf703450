"""``/metrics`` under ``serve --workers N``: every worker's numbers, whichever worker answers.

The workers share one port, so each scrape reaches one of them, by chance: each answered with its own
numbers alone, and Prometheus saw one process's counters, then another's, as one series going up and
down (an operator's find). Now each worker writes its metrics, as Prometheus text, to Redis every
``SHARE_SECONDS`` (a hash for the workers of one ``serve``, a field each, stamped with when it was
written); ``/metrics`` answers with its own, as they are now, and the others' as last written, every
sample labelled ``worker="w<N>"``. A field not written for ``STALE_SECONDS`` is a worker gone (a serve
started again with fewer, one that died and waits to be started again): left out, and deleted. A
worker that stops deletes its own. A worker started again after dying writes under the same label:
its counters start again from 0, which Prometheus takes as a reset (as for any restart).
"""

from __future__ import annotations

import contextlib
import logging
import time
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
#: A worker's metrics not written for this long are a worker gone: not answered with.
STALE_SECONDS = SHARE_SECONDS * 3
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
        try:
            while True:
                try:
                    await self._share()
                except (ClusterError, OSError, ConnectionError, TimeoutError) as error:
                    logger.debug("cluster: sharing this worker's metrics failed: %s", error)
                except Exception:  # (redis-py's own errors among others): it goes on
                    logger.exception("cluster: sharing this worker's metrics failed")
                await anyio.sleep(SHARE_SECONDS)
        finally:  # stopping: its metrics go with it (the others' scrapes do not answer with them)
            with anyio.move_on_after(READ_TIMEOUT, shield=True), contextlib.suppress(Exception):
                await self._redis.hdel(self._key, self.worker)

    async def _share(self) -> None:
        stamped = f"{time.time():.3f}\n{self._render().decode()}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key, self.worker, stamped)
            pipe.pexpire(self._key, int(STALE_SECONDS * 1000))
            await pipe.execute()

    async def render(self) -> bytes:
        """This worker's metrics now and the others' as last written, each sample labelled by its worker;
        this worker's alone (labelled too) if Redis does not answer in time."""
        texts: dict[str, str] = {}
        gone: list[str] = []
        with anyio.move_on_after(READ_TIMEOUT):
            try:
                for worker, stamped in (await self._redis.hgetall(self._key)).items():
                    written, _, text = _text(stamped).partition("\n")
                    if time.time() - _seconds(written) < STALE_SECONDS:
                        texts[_text(worker)] = text
                    else:
                        gone.append(_text(worker))
                if gone:
                    await self._redis.hdel(self._key, *gone)
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


def _seconds(written: str) -> float:
    """When a worker's metrics were written (0: unreadable, so stale)."""
    try:
        return float(written)
    except ValueError:
        return 0.0
