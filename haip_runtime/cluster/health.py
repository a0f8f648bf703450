"""The bus's health: whether Redis answers now, the last failure, and how often it came back.

Like the store's ``StorageHealth``: ``/health`` and ``/metrics`` read it. Every part of the bus reports
through ``translating``, which also turns redis-py's exceptions into ``ClusterError`` where they enter.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
from redis.exceptions import RedisError

from haip_runtime.exceptions import ClusterError

logger = logging.getLogger("haip_runtime.cluster")


class BusState(enum.StrEnum):
    OK = "ok"
    #: Redis does not answer (down, restarting, unreachable); the bus keeps trying by itself.
    UNAVAILABLE = "unavailable"


@dataclass
class BusHealth:
    """What the bus knows of Redis; the counters only ever grow."""

    state: BusState = BusState.OK
    #: The last failure, one line (``None`` while ``ok``).
    error: str | None = None
    #: Commands and checks that failed.
    failures: int = 0
    #: Times Redis answered again after being unavailable.
    recoveries: int = 0
    _changed: anyio.Event | None = field(default=None, repr=False)
    #: Redis answers, but refuses the appends (out of memory, read-only, an ACL): unavailable until one
    #: succeeds, whatever else it answers meanwhile (its heartbeats and reads kept saying "ok" while every
    #: conversation stood still: found by a tester with maxmemory and noeviction).
    _refusing: bool = field(default=False, repr=False)
    #: When Redis stopped answering (``time.monotonic``), and the failures counted until then.
    _down: tuple[float, int] | None = field(default=None, repr=False)

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        # While Redis refuses the appends, that is what the bus is unavailable for, whatever else fails
        # meanwhile (a heartbeat refused too, out of memory: the suite, under load, saw it said so).
        label = "redis refuses appends" if self._refusing else type(exc).__name__
        self.error = f"{label}: {exc}".splitlines()[0]
        if self.state is BusState.OK:
            self._down = (time.monotonic(), self.failures - 1)
        self._set(BusState.UNAVAILABLE)

    def refused(self, exc: BaseException) -> None:
        """Redis refused appends (``ResponseError``): unavailable until ``appended``."""
        self.failed(exc)
        self.error = f"redis refuses appends: {exc}".splitlines()[0]
        self._refusing = True

    def appended(self) -> None:
        """An append went through: whatever refused the earlier ones is over."""
        self._refusing = False
        self.succeeded()

    def succeeded(self) -> None:
        if self._refusing:
            return
        if self.state is not BusState.OK:
            self.recoveries += 1
            self.error = None
            self._set(BusState.OK)
            if self._down is not None:  # (the failures were each said once a streak: this says it is over)
                since, before = self._down
                logger.info(
                    "cluster: redis answers again after %.1f s (%d failed command(s) meanwhile)",
                    time.monotonic() - since,
                    self.failures - before,
                )
                self._down = None

    async def wait_for(self, state: BusState) -> None:
        """Return once the bus is in ``state`` (bound it with ``anyio.fail_after``)."""
        while self.state is not state:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "error": self.error,
            "failures": self.failures,
            "recoveries": self.recoveries,
        }

    def _set(self, state: BusState) -> None:
        self.state = state
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class translating:  # (lower case: used like the function it was, ``with translating(health, "what"):``)
    """Run Redis commands: a failure marks the bus unavailable and is raised as ``ClusterError``.

    A class, not a ``@contextmanager`` generator: every append and mirror run enters one, and a
    generator-based manager costs about three times as much (0.8 µs)."""

    __slots__ = ("_doing", "_health")

    def __init__(self, health: BusHealth, doing: str) -> None:
        self._health = health
        self._doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self._health.succeeded()
        elif isinstance(exc, (RedisError, OSError)):
            self._health.failed(exc)
            raise ClusterError(f"redis: {self._doing} failed: {exc or type(exc).__name__}") from exc
