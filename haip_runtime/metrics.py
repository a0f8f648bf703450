"""Operator metrics: one Prometheus registry per runtime, served as text at ``GET /metrics``.

Counters and histograms move through one-line hooks where events already pass (the connection's
dispatch, a session's delivery, the tool proxy, a run's end, a resume, an LLM request). Gauges
(connections, sessions, transactions, runs, queue depth, MCP servers, event-loop tasks) are read
from the runtime when scraped, so nothing keeps them up to date on the hot path. Each ``Metrics``
has its own ``CollectorRegistry``: several runtimes in one process (tests) stay independent.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from haip_runtime.app import Runtime
    from haip_runtime.llm.provider import Delta, Provider

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Tool calls take from a millisecond (an in-process server) to minutes (a person approving).
TOOL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The runtime's counters and histograms, and the hooks that move them (each O(1))."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        #: Envelopes in and out by type: plain counts (one dict increment per envelope, no lock), exported
        #: as counters when scraped.
        self.received_counts: dict[str, int] = defaultdict(int)
        self.sent_counts: dict[str, int] = defaultdict(int)
        self._runs = Counter(
            "haip_runs_finished", "Agent runs ended, by agent and status.", ["agent", "status"], registry=registry
        )
        self._tools = Counter(
            "haip_tool_calls", "Tool calls ended, by MCP server and status.", ["server", "status"], registry=registry
        )
        self._tool_seconds = Histogram(
            "haip_tool_call_seconds",
            "Tool call duration from TOOL_CALL to TOOL_DONE, by MCP server.",
            ["server"],
            buckets=TOOL_BUCKETS,
            registry=registry,
        )
        self._restarts = Counter(
            "haip_mcp_server_reconnects",
            "Times an MCP server connected again after it was lost.",
            ["server"],
            registry=registry,
        )
        self._resumes = Counter(
            "haip_resumes",
            "Session resumes, by outcome (resumed, failed) and reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self._llm_tokens = Counter(
            "haip_llm_tokens",
            "LLM tokens reported by providers, by provider and direction.",
            ["provider", "direction"],
            registry=registry,
        )
        self._llm_seconds = Histogram(
            "haip_llm_request_seconds", "LLM request duration to the last streamed delta, by provider.", ["provider"],
            buckets=LLM_BUCKETS, registry=registry,
        )  # fmt: skip
        self._llm_errors = Counter(
            "haip_llm_errors", "LLM requests that failed, by provider.", ["provider"], registry=registry
        )
        self._ever_connected: set[str] = set()
        self._connected: set[str] = set()

    # --- hooks ------------------------------------------------------------------------------------

    def received(self, type: str) -> None:
        self.received_counts[type] += 1

    def sent(self, type: str) -> None:
        self.sent_counts[type] += 1

    def run_finished(self, agent: str, status: str) -> None:
        self._runs.labels(agent, status).inc()

    def tool_call(self, server: str, status: str, seconds: float) -> None:
        self._tools.labels(server, status).inc()
        self._tool_seconds.labels(server).observe(seconds)

    def resumed(self) -> None:
        self._resumes.labels("resumed", "").inc()

    def resume_failed(self, reason: str) -> None:
        self._resumes.labels("failed", reason).inc()

    def server_state(self, server: str, state: str) -> None:
        """An MCP server's new state: connecting again after having been connected counts a reconnect."""
        if state == "connected":
            if server in self._ever_connected and server not in self._connected:
                self._restarts.labels(server).inc()
            self._ever_connected.add(server)
            self._connected.add(server)
        else:
            self._connected.discard(server)

    def llm(self, name: str, provider: Provider) -> Provider:
        """``provider``, its ``stream`` timed and its token usage counted under ``name``."""
        original = provider.stream
        tokens, seconds, errors = self._llm_tokens, self._llm_seconds.labels(name), self._llm_errors.labels(name)

        async def stream(*args: Any, **kwargs: Any) -> AsyncGenerator[Delta, None]:
            started = time.monotonic()
            try:
                async with aclosing(original(*args, **kwargs)) as deltas:
                    async for delta in deltas:
                        if delta.usage is not None:
                            tokens.labels(name, "input").inc(delta.usage.input_tokens)
                            tokens.labels(name, "output").inc(delta.usage.output_tokens)
                        yield delta
            except Exception:
                errors.inc()
                raise
            seconds.observe(time.monotonic() - started)

        provider.stream = stream  # type: ignore[method-assign]
        return provider

    # --- scraping ---------------------------------------------------------------------------------

    def watch(self, runtime: Runtime) -> None:
        """Read ``runtime``'s gauges on each scrape, and this process's CPU, memory, descriptors and GC."""
        self.registry.register(RuntimeCollector(runtime))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # collections per generation: the collector is a cost here

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Gauges read from the runtime at scrape time (in the event loop's thread, by the /metrics route)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        hub = self.runtime.hub
        sessions = list(hub.sessions.sessions.values())
        live = [t for t in hub.transactions.live.values() if not t.ended]
        metrics = self.runtime.metrics
        yield counter("haip_messages_received", "Envelopes received from clients, by type.", metrics.received_counts)
        yield counter("haip_messages_sent", "Envelopes sent to clients (one per member), by type.", metrics.sent_counts)
        yield gauge("haip_connections", "Client connections open now.", hub.active_connections)
        accepted = CounterMetricFamily("haip_connections_accepted", "Client connections that started a handshake.")
        accepted.add_metric([], hub.total_connections)
        yield accepted
        yield gauge("haip_sessions", "Sessions in memory (connected or resumable).", len(sessions))
        yield gauge(
            "haip_sessions_detached",
            "Sessions waiting for their client to resume.",
            sum(s.outbox is None for s in sessions),
        )
        yield gauge("haip_transactions", "Transactions live in memory (not ended).", len(live))
        yield gauge("haip_runs_active", "Agent runs in progress.", sum(len(t.runs) for t in live))
        backlog = sum(s.outbox.backlog for s in sessions if s.outbox is not None)
        yield gauge("haip_outbound_backlog", "Frames queued for clients, summed over connections.", backlog)
        yield gauge("haip_event_loop_tasks", "Tasks in the runtime's event loop.", _tasks())
        servers = GaugeMetricFamily(
            "haip_mcp_server_up", "1 if the MCP server is connected, by state.", labels=["server", "state"]
        )
        tools = GaugeMetricFamily("haip_mcp_server_tools", "Tools an MCP server offers.", labels=["server"])
        for name, (state, count, _error) in self.runtime.server_health().items():
            servers.add_metric([name, state], 1.0 if state == "connected" else 0.0)
            tools.add_metric([name], count)
        yield servers
        yield tools


def counter(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["type"])
    for type, count in list(counts.items()):
        family.add_metric([type], count)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the event loop (a test calling render directly)
        return 0
