"""The runtime's gauges for ``GET /metrics``: connections, sessions, transactions, runs, backlog, MCP servers.

Read at scrape time from the registries that own each number, so nothing keeps them up to date on
the hot path. The counters and histograms are ``observability.metrics.Metrics``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.observability.metrics import Metrics, counter, event_loop_tasks, gauge
from haip_runtime.protocol.events import ServerState
from haip_runtime.session.registry import SessionRegistry

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class RuntimeGauges:
    """Gauges read from the runtime's parts at scrape time (in the event loop's thread, by the /metrics route)."""

    def __init__(
        self,
        metrics: Metrics,
        sessions: SessionRegistry,
        transactions: TransactionRegistry,
        server_health: Callable[[], dict[str, tuple[str, int, str | None]]],
    ) -> None:
        self.metrics = metrics
        self.sessions = sessions
        self.transactions = transactions
        self.server_health = server_health
        #: More gauges and counters read at scrape time (the store's).
        self.extra: Callable[[], Iterable[Metric]] = tuple

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        registry = self.sessions
        sessions = list(registry.sessions.values())
        live = [t for t in self.transactions.live.values() if not t.ended]
        metrics = self.metrics
        yield counter("haip_messages_received", "Envelopes received from clients, by type.", metrics.received_counts)
        yield counter("haip_messages_sent", "Envelopes sent to clients (one per member), by type.", metrics.sent_counts)
        yield counter(
            "haip_auth_failures",
            "Tokens refused (HAIP handshakes, HTTP doors), by why: no_credentials, expired, not_yet_valid,"
            " wrong_audience_or_issuer, missing_claim, no_subject, keys_unavailable (the JWKS could not be"
            " fetched), invalid.",
            metrics.auth_refusals,
            label="reason",
        )
        yield gauge("haip_connections", "Client connections open now.", registry.active_connections)
        accepted = CounterMetricFamily("haip_connections_accepted", "Client connections that started a handshake.")
        accepted.add_metric([], registry.total_connections)
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
        yield gauge("haip_event_loop_tasks", "Tasks in the runtime's event loop.", event_loop_tasks())
        servers = GaugeMetricFamily(
            "haip_mcp_server_up", "1 if the MCP server is connected, by state.", labels=["server", "state"]
        )
        tools = GaugeMetricFamily("haip_mcp_server_tools", "Tools an MCP server offers.", labels=["server"])
        for name, (state, count, _error) in self.server_health().items():
            servers.add_metric([name, state], 1.0 if state == ServerState.CONNECTED else 0.0)
            tools.add_metric([name], count)
        yield servers
        yield tools
        yield from self.extra()
