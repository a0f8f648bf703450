"""``serve --workers N``: N worker processes on one port, each a full node of the cluster, and their supervisor.

The supervisor (the ``serve`` process) reserves the port with a socket bound with ``SO_REUSEPORT`` that
never listens, and starts each worker (``python -m haip_runtime.server.node``, its ``WorkerSpec`` on
stdin). Each worker listens on a socket of its own on that port. Why not one listening socket shared by
every worker: each new connection wakes them all and the first awake accepts every connection waiting
(asyncio accepts up to its backlog per wake-up), so a burst of connections piles onto one worker while
the other idles; with ``SO_REUSEPORT`` the kernel spreads connections over the workers' sockets by a
hash of their addresses, evenly. The price: connections still queued at a worker that dies are reset.

The supervisor forwards SIGINT and SIGTERM to the workers as SIGTERM (a graceful stop, bounded by
``STOP_TIMEOUT_SECONDS``; a second signal kills them), starts a worker that dies unexpectedly again
after a backoff, and gives up, stopping the others, when one fails to start ``START_ATTEMPTS`` times in a
row while none serves. Workers run in a session of their own (Ctrl-C reaches the supervisor only) and stop when their
stdin closes: the supervisor is gone, even if it was killed with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from haip_runtime.config import HaipConfig
from haip_runtime.server.node import MARK, WorkerSpec

logger = logging.getLogger(__name__)

#: Starts in a row that end before the worker serves, after which the supervisor gives up: at start-up
#: (a bad config, a port taken, something only one process can hold: it would never serve), or later
#: when no other worker serves. Once every worker has served and another still does, it keeps trying,
#: every ``MAX_BACKOFF_SECONDS`` at most: a worker that died during a Redis outage cannot start until
#: Redis is back, and giving up stopped the workers that served on, degraded (found by a tester).
START_ATTEMPTS = 3
#: The wait before a dead worker is started again, doubled for each death in a row...
FIRST_BACKOFF_SECONDS = 0.5
#: ...up to this.
MAX_BACKOFF_SECONDS = 10.0
#: A worker that served this long before it died is started again after the first backoff.
STABLE_SECONDS = 30.0
#: How long the workers have to stop gracefully (uvicorn closes connections within 5 s, then the
#: runtime writes what it holds) before the supervisor kills them.
STOP_TIMEOUT_SECONDS = 20.0
#: The longest line a worker may write to its stdout (its stdout is passed through, tagged).
MAX_LINE_BYTES = 1 << 20
#: Node names are at most this long (``cluster.node_id``).
MAX_NODE_ID = 64


@dataclass(frozen=True)
class Ready:
    """A worker that serves, as it reported itself."""

    index: int
    pid: int
    node: str | None
    agents: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """How one worker process ended."""

    pid: int
    returncode: int
    served_seconds: float | None  # None: it never served
    error: str | None = None

    def describe(self) -> str:
        if self.returncode < 0:
            return f"was killed by {signal.Signals(-self.returncode).name}"
        return f"exited with code {self.returncode}"


def node_id(base: str, index: int, generation: int) -> str:
    """Worker ``index``'s node name: ``base-w1``, then ``base-w1.2`` for its second process, and so on.
    A process that replaces a dead one is a new node: it holds none of its predecessor's state."""
    suffix = f"-w{index}" + (f".{generation}" if generation > 1 else "")
    return base[: MAX_NODE_ID - len(suffix)] + suffix


def send(process: Process, signum: signal.Signals) -> None:
    """``signum`` to ``process``, unless it has just ended (it is still listed until it is reaped)."""
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def backoff(deaths_in_a_row: int) -> float:
    return float(min(FIRST_BACKOFF_SECONDS * 2 ** max(deaths_in_a_row - 1, 0), MAX_BACKOFF_SECONDS))


class Supervisor:
    """Keeps ``count`` workers serving ``config`` on a reserved port until a signal stops them."""

    def __init__(self, config: HaipConfig, count: int, base_node_id: str, on_ready: Callable[[list[Ready]], None]):
        self.config = config
        self.count = count
        self.base_node_id = base_node_id
        self.on_ready = on_ready
        #: The workers' processes now running, by index.
        self.live: dict[int, Process] = {}
        #: The workers that serve now, by index.
        self.ready: dict[int, Ready] = {}
        #: Why the supervisor gave up (its exit is then non-zero).
        self.failure: str | None = None
        #: Whether some worker had to be killed to stop.
        self.forced = False
        self.stopping = anyio.Event()
        self._announced = False
        self._tg: TaskGroup | None = None

    async def run(self, port: int) -> None:
        """Until every worker has stopped: after SIGINT or SIGTERM, or when the supervisor gives up."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._on_signals, signals)
                async with anyio.create_task_group() as keepers:
                    for index in range(1, self.count + 1):
                        keepers.start_soon(self._keep, index, port)
                tg.cancel_scope.cancel()  # every worker is gone: the signal watch and the stop's timer end

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if not self.stopping.is_set():
                logger.info("%s: stopping the workers", signal.Signals(signum).name)
                self._begin_stop()
            else:
                logger.warning("%s again: killing the workers", signal.Signals(signum).name)
                self._kill_all()

    def _begin_stop(self) -> None:
        if not self.stopping.is_set() and self._tg is not None:
            self.stopping.set()
            self._tg.start_soon(self._stop)

    async def _stop(self) -> None:
        """SIGTERM to every worker; those still running after ``STOP_TIMEOUT_SECONDS`` are killed."""
        for process in list(self.live.values()):
            send(process, signal.SIGTERM)
        await anyio.sleep(STOP_TIMEOUT_SECONDS)  # cancelled as soon as the last worker has stopped
        logger.error("workers still running %.0f s after SIGTERM: killing them", STOP_TIMEOUT_SECONDS)
        self._kill_all()

    def _kill_all(self) -> None:
        for process in list(self.live.values()):
            self.forced = True
            send(process, signal.SIGKILL)

    async def _keep(self, index: int, port: int) -> None:
        """Worker ``index``, started again each time it dies, until the supervisor stops."""
        deaths = failed_starts = generation = 0
        while not self.stopping.is_set():
            generation += 1
            outcome = await self._run_worker(index, generation, port)
            if self.stopping.is_set():
                return
            failed_starts = failed_starts + 1 if outcome.served_seconds is None else 0
            deaths = 0 if (outcome.served_seconds or 0) >= STABLE_SECONDS else deaths + 1
            what = f"worker {index} (pid {outcome.pid}) {outcome.describe()}"
            if failed_starts >= START_ATTEMPTS and not (self._announced and self.ready):  # (else others serve on)
                reason = outcome.error or f"it {outcome.describe()}; its log lines above say why"
                self.failure = f"worker {index} failed to start {START_ATTEMPTS} times in a row: {reason}"
                logger.error("%s: stopping the other workers", self.failure)
                self._begin_stop()
                return
            delay = backoff(deaths)
            before = " before it served" if outcome.served_seconds is None else ""
            logger.warning("%s%s; starting it again in %.1f s", what, before, delay)
            with anyio.move_on_after(delay):
                await self.stopping.wait()

    async def _run_worker(self, index: int, generation: int, port: int) -> Outcome:
        """One process of worker ``index``, from its start to its end."""
        spec = WorkerSpec(self._config_for(index, generation, port), index, self.base_node_id)
        process = await anyio.open_process(
            [sys.executable, "-m", "haip_runtime.server.node"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the supervisor's: each worker's log lines say which worker wrote them
            start_new_session=True,
        )
        self.live[index] = process
        served_at: float | None = None
        error: str | None = None
        try:
            if self.stopping.is_set():
                send(process, signal.SIGTERM)
            assert process.stdin is not None and process.stdout is not None
            try:
                await process.stdin.send(spec.sent())  # stdin then stays open: the worker watches it
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # it died at once: its exit code says how
            async for kind, fields in self._messages(index, process.stdout):
                if kind == "ready":
                    served_at = time.monotonic()
                    self._served(Ready(index, int(fields["pid"]), fields.get("node"), list(fields.get("agents", []))))
                elif kind == "failed":
                    error = str(fields.get("error"))
            returncode = await process.wait()
        finally:
            self.live.pop(index, None)
            self.ready.pop(index, None)
            with anyio.CancelScope(shield=True):
                if process.returncode is None:  # the supervisor itself is failing: leave no orphan
                    process.kill()
                    await process.wait()
                await process.aclose()
        served = time.monotonic() - served_at if served_at is not None else None
        return Outcome(process.pid, returncode, served, error)

    def _config_for(self, index: int, generation: int, port: int) -> HaipConfig:
        """The config worker ``index`` runs: the reserved port, and a node name of its own."""
        config = self.config
        update: dict[str, Any] = {"server": config.server.model_copy(update={"port": port, "workers": 1})}
        if config.cluster is not None:
            name = node_id(self.base_node_id, index, generation)
            update["cluster"] = config.cluster.model_copy(update={"node_id": name})
        return config.model_copy(update=update)

    def _served(self, ready: Ready) -> None:
        self.ready[ready.index] = ready
        logger.info("worker %d serving: pid %d, node %s", ready.index, ready.pid, ready.node)
        if not self._announced and len(self.ready) == self.count:
            self._announced = True
            self.on_ready(sorted(self.ready.values(), key=lambda r: r.index))

    async def _messages(self, index: int, stdout: ByteReceiveStream) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The worker's messages to the supervisor, until its stdout closes; its other lines are
        printed, tagged with the worker."""
        buffered = BufferedByteReceiveStream(stdout)
        while True:
            try:
                line = (await buffered.receive_until(b"\n", MAX_LINE_BYTES)).decode(errors="replace")
            except anyio.DelimiterNotFound:
                line = (await buffered.receive(MAX_LINE_BYTES)).decode(errors="replace")
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return
            if line.startswith(MARK):
                kind, _, body = line.removeprefix(MARK).partition(" ")
                yield kind, json.loads(body or "{}")
            else:
                print(f"[w{index}] {line}", flush=True)
