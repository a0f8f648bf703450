"""Operator metrics: counted per runtime, served as Prometheus text at ``GET /metrics``.

Counters and histograms move through one-line hooks where events already pass (the connection's
dispatch, a session's delivery, the tool proxy, a run's end, a resume, an LLM request). Gauges
(connections, sessions, transactions, runs, queue depth, MCP servers, event-loop tasks) are read
from the runtime when scraped, so nothing keeps them up to date on the hot path. Counts are plain
numbers (every hook runs in the event loop's thread); ``prometheus_client`` is imported and each
``Metrics``' own ``CollectorRegistry`` built on the first scrape, which keeps it out of start-up.
Several runtimes in one process (tests) stay independent.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from haip_runtime.protocol.events import ALL_EVENTS, ServerState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


#: The envelope types counted under their own name (``Metrics.received``).
_KNOWN_TYPES = frozenset(ALL_EVENTS)


class Collector(Protocol):
    """A source of metric families read at scrape time (``prometheus_client``'s collector protocol)."""

    def collect(self) -> Iterable[Metric]: ...


#: Tool calls take from a millisecond (an in-process server) to minutes (a person approving).
TOOL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class LabelledCounter:
    """A counter per combination of label values, exported as a Prometheus counter family."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        if labels not in self.values:
            self.touch(*labels)
        self.values[labels] += amount

    def touch(self, *labels: str) -> None:
        """Export these labels from now on, at 0 until counted."""
        if labels not in self.values:
            self.values[labels], self._created[labels] = 0.0, time.time()

    def family(self) -> CounterMetricFamily:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, count in list(self.values.items()):
            family.add_metric(labels, count, created=self._created[labels])
        return family


class LabelledHistogram:
    """Observations per combination of label values in fixed buckets, exported as a histogram family."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.buckets = tuple(float(bound) for bound in buckets)
        self.values: dict[tuple[str, ...], Observations] = {}

    def observe(self, *labels: str, value: float) -> None:
        if labels not in self.values:
            self.touch(*labels)
        observations = self.values[labels]
        observations.counts[bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is >= value
        observations.sum += value

    def touch(self, *labels: str) -> None:
        """Export these labels from now on, empty until observed."""
        if labels not in self.values:
            self.values[labels] = Observations(len(self.buckets) + 1)

    def family(self) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [floatToGoString(bound) for bound in (*self.buckets, float("inf"))]  # type: ignore[no-untyped-call]
        for labels, observations in list(self.values.items()):
            cumulative = itertools.accumulate(observations.counts)
            family.add_metric(
                list(labels), [(b, float(n)) for b, n in zip(bounds, cumulative, strict=True)], observations.sum
            )
            named = dict(zip(self.labels, labels, strict=True))
            family.add_sample(f"{self.name}_created", named, observations.created)
        return family


class Observations:
    """One histogram series: the count in each bucket (not cumulative; the last is +Inf), their sum."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.created = time.time()


class Metrics:
    """The runtime's counters and histograms, and the hooks that move them (each O(1))."""

    def __init__(self) -> None:
        #: Envelopes in and out by type: plain counts (one dict increment per envelope), exported
        #: as counters when scraped.
        self.received_counts: dict[str, int] = defaultdict(int)
        self.sent_counts: dict[str, int] = defaultdict(int)
        #: Tokens refused, by why: the authenticator's own counts (``Runtime`` hands them over).
        self.auth_refusals: dict[str, int] = {}
        self._runs = LabelledCounter(
            "haip_runs_finished", "Agent runs ended, by agent and status.", ["agent", "status"]
        )
        self._tools = LabelledCounter(
            "haip_tool_calls", "Tool calls ended, by MCP server and status.", ["server", "status"]
        )
        self._tool_seconds = LabelledHistogram(
            "haip_tool_call_seconds",
            "Tool call duration from TOOL_CALL to TOOL_DONE, by MCP server.",
            ["server"],
            TOOL_BUCKETS,
        )
        self._restarts = LabelledCounter(
            "haip_mcp_server_reconnects", "Times an MCP server connected again after it was lost.", ["server"]
        )
        self._resumes = LabelledCounter(
            "haip_resumes", "Session resumes, by outcome (resumed, failed) and reason.", ["outcome", "reason"]
        )
        self._llm_tokens = LabelledCounter(
            "haip_llm_tokens", "LLM tokens reported by providers, by provider and direction.", ["provider", "direction"]
        )
        self._llm_seconds = LabelledHistogram(
            "haip_llm_request_seconds",
            "LLM request duration to the last streamed delta, by provider.",
            ["provider"],
            LLM_BUCKETS,
        )
        self._llm_errors = LabelledCounter("haip_llm_errors", "LLM requests that failed, by provider.", ["provider"])
        self._tasks = LabelledCounter(
            "haip_mcp_tasks", "Tool calls run as MCP tasks, ended, by MCP server and the task's final status.",
            ["server", "status"],
        )  # fmt: skip
        self._served_tasks = LabelledCounter(
            "haip_mcp_served_tasks", "Agent runs called as MCP tasks at /mcp, ended, by agent and final status.",
            ["agent", "status"],
        )  # fmt: skip
        self._own = (
            self._runs, self._tools, self._tool_seconds, self._restarts, self._resumes,
            self._llm_tokens, self._llm_seconds, self._llm_errors, self._tasks, self._served_tasks,
        )  # fmt: skip
        self._gauges: Collector | None = None
        self._registry: CollectorRegistry | None = None
        self._ever_connected: set[str] = set()
        self._connected: set[str] = set()

    # --- hooks ------------------------------------------------------------------------------------

    def received(self, type: str) -> None:
        # A client names the type: one it made up counts as "other", so /metrics cannot be grown at will.
        self.received_counts[type if type in _KNOWN_TYPES else "other"] += 1

    def sent(self, type: str) -> None:
        self.sent_counts[type] += 1

    def run_finished(self, agent: str, status: str) -> None:
        self._runs.inc(agent, status)

    def tool_call(self, server: str, status: str, seconds: float) -> None:
        self._tools.inc(server, status)
        self._tool_seconds.observe(server, value=seconds)

    def task_ended(self, server: str, status: str) -> None:
        self._tasks.inc(server, status)

    def served_task_ended(self, agent: str, status: str) -> None:
        """An agent run called as an MCP task (the `[mcp_server]` door) ended."""
        self._served_tasks.inc(agent, status)

    def resumed(self) -> None:
        self._resumes.inc("resumed", "")

    def resume_failed(self, reason: str) -> None:
        self._resumes.inc("failed", reason)

    def server_state(self, server: str, state: str) -> None:
        """An MCP server's new state: connecting again after having been connected counts a reconnect."""
        if state == ServerState.CONNECTED:
            if server in self._ever_connected and server not in self._connected:
                self._restarts.inc(server)
            self._ever_connected.add(server)
            self._connected.add(server)
        else:
            self._connected.discard(server)

    def llm_watched(self, provider: str) -> None:
        """Export ``provider``'s LLM series from now on, at 0 until it is used."""
        self._llm_seconds.touch(provider)
        self._llm_errors.touch(provider)

    def llm_usage(self, provider: str, input_tokens: int, output_tokens: int) -> None:
        self._llm_tokens.inc(provider, "input", amount=input_tokens)
        self._llm_tokens.inc(provider, "output", amount=output_tokens)

    def llm_request(self, provider: str, seconds: float) -> None:
        self._llm_seconds.observe(provider, value=seconds)

    def llm_error(self, provider: str) -> None:
        self._llm_errors.inc(provider)

    # --- scraping ---------------------------------------------------------------------------------

    def watch(self, gauges: Collector) -> None:
        """Read ``gauges`` (the runtime's) on each scrape, and this process's CPU, memory, descriptors and GC."""
        self._gauges = gauges

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self._registry or self._register())

    def collect(self) -> Iterable[Metric]:
        """This runtime's counters and histograms as metric families (the registry calls this)."""
        for own in self._own:
            yield own.family()

    def _register(self) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.process_collector import ProcessCollector

        self._registry = registry = CollectorRegistry()
        registry.register(self)
        if self._gauges is not None:
            registry.register(self._gauges)
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)  # collections per generation: the collector is a cost here
        return registry


def counter(name: str, documentation: str, counts: dict[str, int], label: str = "type") -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=[label])
    for type, count in list(counts.items()):
        family.add_metric([type], count)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, value=value)


def event_loop_tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the event loop (a test calling render directly)
        return 0
