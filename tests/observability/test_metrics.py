"""GET /metrics and /health over a real server: counters that move with a conversation, a tool call
(the demo MCP server as a real subprocess) and resumes; health degraded while a server is down."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from haip_runtime.client import HaipClient
from haip_runtime.exceptions import LlmError
from haip_runtime.llm.metered import metered
from haip_runtime.llm.scripted import ScriptedLLM
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS, LlmErrorCode
from tests.support.raw import raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
EVERYTHING: dict[str, Any] = {"accept_events": sorted(TRANSACTION_ERA_EVENTS)}


def config(**servers: dict[str, Any]) -> dict[str, Any]:
    return {
        "agents": {"operator": {"plugin": "operator", "mcp_servers": list(servers)}, "echo": {"plugin": "echo"}},
        "mcp": {"servers": servers},
    }


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(make_config(config(demo=DEMO))) as live:
        yield live


def value(text: str, sample: str, **labels: str) -> float:
    """The value of ``sample`` with ``labels`` in a scrape; 0 if it is not there (yet)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


async def get(live: LiveServer, path: str) -> httpx2.Response:
    async with httpx2.AsyncClient() as http:
        return await http.get(f"{live.http_url}{path}")


async def scrape(live: LiveServer) -> str:
    response = await get(live, "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_counters_move_with_a_conversation_and_a_tool_call(server: LiveServer) -> None:
    before = await scrape(server)
    async with HaipClient(server.ws_url, token=server.token(), timeout=20) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "hello")
        await client.wait_for("RUN_FINISHED")
        tools = await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.add" in {t["name"] for t in e.get("tools")})
        body = {"call_id": "metered", "tool": "demo.add", "params": {"a": 1, "b": 2}}
        await client.send("TOOL_CALL", body, transaction=tools)
        await client.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "metered")
        during = await scrape(server)
    after = await scrape(server)

    def moved(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert moved("haip_messages_received_total", type="MESSAGE") == 1
    assert moved("haip_messages_received_total", type="TRANSACTION_START") == 2
    assert moved("haip_messages_sent_total", type="RUN_FINISHED") == 1
    assert moved("haip_messages_sent_total", type="TOOL_DONE") == 1
    assert moved("haip_runs_finished_total", agent="echo", status="OK") == 1
    assert moved("haip_tool_calls_total", server="demo", status="OK") == 1
    assert moved("haip_tool_call_seconds_count", server="demo") == 1
    assert moved("haip_tool_call_seconds_sum", server="demo") > 0
    assert moved("haip_connections_accepted_total") == 1
    assert value(during, "haip_connections") == value(before, "haip_connections") + 1
    assert value(during, "haip_transactions") >= 2
    assert value(after, "haip_mcp_server_up", server="demo", state="connected") == 1
    assert value(after, "haip_mcp_server_tools", server="demo") > 0
    assert value(after, "haip_event_loop_tasks") > 0
    assert value(after, "process_open_fds") > 0
    assert value(after, "python_gc_collections_total", generation="0") > 0


async def test_resumes_are_counted_by_outcome_and_reason(server: LiveServer) -> None:
    token = server.token("zoe")
    before = await scrape(server)
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await first.hai(token, **EVERYTHING)
        await first.receive_type("INFO")
    for last_rx_seq in ("0", "999"):  # one that resumes, one ahead of what the session sent
        async with raw_peer(server.ws_url) as again:
            await again.receive()
            await again.hai(token, session=hai["session"], last_rx_seq=last_rx_seq, **EVERYTHING)
            while (await again.receive())["payload"].get("event") != "session.ready":
                pass
    after = await scrape(server)
    resumed = value(after, "haip_resumes_total", outcome="resumed") - value(
        before, "haip_resumes_total", outcome="resumed"
    )
    ahead = value(after, "haip_resumes_total", outcome="failed", reason="ahead")
    assert resumed == 1 and ahead - value(before, "haip_resumes_total", outcome="failed", reason="ahead") == 1


async def test_types_a_client_makes_up_count_as_other_and_add_no_series(server: LiveServer) -> None:
    """A hostile probe's find: each made-up ``type`` (sent even before authenticating) became a series of
    its own for good: 300 connections took /metrics from 244 lines to 544."""
    before = await scrape(server)
    for n in range(5):
        async with raw_peer(server.ws_url) as peer:
            await peer.receive()
            await peer.send(f"MADE_UP_{n}", {})
            await peer.closed()
    after = await scrape(server)
    assert "MADE_UP" not in after
    assert (
        value(after, "haip_messages_received_total", type="other")
        - value(before, "haip_messages_received_total", type="other")
        == 5
    )


async def test_the_outbound_backlog_is_a_gauge_of_frames_not_yet_written(server: LiveServer) -> None:
    text = await scrape(server)
    assert "# TYPE haip_outbound_backlog gauge" in text and value(text, "haip_outbound_backlog") >= 0


async def test_health_is_ok_once_every_server_is_connected(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token(), timeout=20) as client:
        await client.start_transaction("operator")
        await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.add" in {t["name"] for t in e.get("tools")})
    health = (await get(server, "/health")).json()
    assert health["status"] == "ok" and "degraded" not in health
    assert health["mcp"]["demo"]["state"] == "connected"


async def test_health_is_degraded_while_a_configured_server_is_down_and_says_why() -> None:
    ghost = {"transport": "stdio", "command": "/nonexistent/mcp-server"}
    with live_server(make_config(config(demo=DEMO, ghost=ghost))) as live:
        async with HaipClient(live.ws_url, token=live.token(), timeout=20) as client:
            await client.start_transaction("operator")
            await client.wait_for(lambda e: e.type == "TOOL_LIST" and "demo.add" in {t["name"] for t in e.get("tools")})
        response = await get(live, "/health")
        metrics = await scrape(live)
    health = response.json()
    assert response.status_code == 200 and health["status"] == "degraded"
    assert list(health["degraded"]) == ["ghost"] and health["mcp"]["ghost"]["state"] != "connected"
    assert health["degraded"]["ghost"].startswith(health["mcp"]["ghost"]["state"])
    assert value(metrics, "haip_mcp_server_up", server="demo", state="connected") == 1
    assert value(metrics, "haip_mcp_server_up", server="ghost", state=health["mcp"]["ghost"]["state"]) == 0


async def test_metrics_can_be_turned_off() -> None:
    with live_server(make_config({"observability": {"metrics": False}})) as live:
        response = await get(live, "/metrics")
        health = await get(live, "/health")
    assert response.status_code == 404 and health.json()["status"] == "ok"


async def test_each_runtime_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.run_finished("echo", "OK")
    assert b'haip_runs_finished_total{agent="echo",status="OK"} 1.0' in first.render()
    assert b"haip_runs_finished_total{" not in second.render()


def test_a_server_connecting_again_after_it_was_lost_counts_a_reconnect() -> None:
    metrics = Metrics()
    for state in ("connecting", "connected", "connected", "failed", "connecting", "connected"):
        metrics.server_state("demo", state)
    assert b'haip_mcp_server_reconnects_total{server="demo"} 1.0' in metrics.render()


async def test_llm_tokens_requests_and_errors_are_counted_per_provider() -> None:
    metrics = Metrics()
    llm = metered("local", ScriptedLLM(["three words here", LlmError(LlmErrorCode.LLM_BAD_REQUEST, "no")]), metrics)
    reply = await llm.complete([])
    with pytest.raises(LlmError):
        await llm.complete([])
    text = metrics.render().decode()
    assert reply.text == "three words here"
    assert value(text, "haip_llm_tokens_total", provider="local", direction="output") == 3
    assert value(text, "haip_llm_request_seconds_count", provider="local") == 1
    assert value(text, "haip_llm_errors_total", provider="local") == 1


async def test_refused_tokens_are_counted_by_why(server: LiveServer) -> None:
    """An operator's wish: nothing on /metrics said that tokens were being refused (a key rotated, a
    clock off, an attack), only the log."""
    before = await scrape(server)
    for token in ("not-a-jwt", server.token("eve", ttl_seconds=-600)):
        async with raw_peer(server.ws_url) as peer:
            await peer.receive()
            await peer.hai(token)
            refused = await peer.receive_type("ERROR")
            assert refused["payload"]["code"] == "AUTHENTICATION_FAILED"
    async with httpx2.AsyncClient() as http:
        assert (await http.get(f"{server.http_url}/haip/transactions")).status_code == 401
    after = await scrape(server)

    def moved(reason: str) -> float:
        return value(after, "haip_auth_failures_total", reason=reason) - value(
            before, "haip_auth_failures_total", reason=reason
        )

    assert (moved("invalid"), moved("expired"), moved("no_credentials")) == (1, 1, 1)
    assert "not-a-jwt" not in after
