"""The tracing facade: free when off (nothing of OpenTelemetry imported), spans when on, ids in log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from haip_runtime.config.models import ObservabilityConfig
from haip_runtime.exceptions import ConfigError
from haip_runtime.observability import tracing
from haip_runtime.observability.logs import configure_logging

ON = ObservabilityConfig(tracing="otlp", log_format="json", log_level="debug")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_off_the_hooks_do_nothing_and_cost_one_check() -> None:
    tracing.shutdown()
    assert not tracing.enabled()
    assert tracing.agent_span("echo", "tx", "run") is tracing.agent_span("other", "tx2", "run2")  # one shared no-op
    assert tracing.tool_span("demo.add", "c1") is tracing.agent_span("echo", "tx", "run")
    assert tracing.chat_span("openai", "gpt") is None
    assert tracing.current_ids() is None


def test_a_runtime_with_tracing_off_imports_nothing_of_opentelemetry_beyond_what_mcp_does() -> None:
    script = """
import sys, anyio
from pathlib import Path
from haip_runtime.config import validate_config
from haip_runtime.server.app import Runtime
from haip_runtime.testing.harness import AgentHarness
from haip_runtime.agents.echo import EchoAgent

async def main():
    async with Runtime(validate_config({"agents": {"echo": {"plugin": "echo"}}}, base_dir=Path("."))):
        async with AgentHarness(EchoAgent) as harness:
            await harness.send("hi")
anyio.run(main)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk") or m.startswith("opentelemetry.exporter")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_spans_nest_and_log_lines_carry_their_ids(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.configure(ON, exporter=exporter)
    configure_logging(ON)
    try:
        with tracing.agent_span("echo", "tx-1", "run-1"):
            logging.getLogger("haip_runtime.test").info("inside the run")
            ids = tracing.current_ids()
            with tracing.tool_span("demo.add", "call-1"):
                chat = tracing.chat_span("openai", "gpt-test")
                assert chat is not None
                chat.usage(3, 4)
                chat.end()
    finally:
        tracing.shutdown()
    assert ids is not None
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["message"], line["trace_id"], line["span_id"]) == ("inside the run", *ids)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    agent, tool, chat_span = spans["invoke_agent echo"], spans["execute_tool demo.add"], spans["chat gpt-test"]
    assert tool.parent is not None and agent.context is not None and tool.context is not None
    assert tool.parent.span_id == agent.context.span_id
    assert chat_span.parent is not None and chat_span.parent.span_id == tool.context.span_id
    assert (chat_span.attributes or {})["gen_ai.conversation.id"] == "tx-1"  # from the run around it
    assert (tool.attributes or {})["gen_ai.conversation.id"] == "tx-1"


def test_sampling_ratio_zero_records_nothing_unless_the_client_sampled_it() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.configure(ObservabilityConfig(tracing="otlp", sampling_ratio=0.0), exporter=exporter)
    try:
        with tracing.agent_span("echo", "tx", "r1"):
            pass
        with tracing.agent_span("echo", "tx", "r2", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"):
            pass
    finally:
        tracing.shutdown()
    assert [(span.attributes or {})["haip.run_id"] for span in exporter.get_finished_spans()] == ["r2"]


def test_tracing_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)
    with pytest.raises(ConfigError, match=r"haip-runtime\[otel\]"):
        tracing.configure(ObservabilityConfig(tracing="otlp"))
    assert not tracing.enabled()


@pytest.mark.anyio
async def test_a_failed_tool_calls_span_says_it_failed_and_why() -> None:
    """A tester's find: ``execute_tool`` spans of calls that failed (TOOL_ERROR, TOOL_FAILED) had no status."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from haip_runtime import Agent, NoOptions, Turn
    from haip_runtime.testing import AgentHarness, FakeToolError

    class Caller(Agent[NoOptions]):
        async def on_message(self, turn: Turn) -> None:
            await turn.call_tool("t.works")
            await turn.call_tool("t.breaks")

    def breaks(arguments: dict[str, object]) -> str:
        raise FakeToolError("it broke")

    exporter = InMemorySpanExporter()
    tracing.configure(ON, exporter=exporter)
    try:
        async with AgentHarness(Caller, tools={"t.works": lambda arguments: "fine", "t.breaks": breaks}) as agent:
            turn = await agent.send("go")
    finally:
        tracing.shutdown()
    assert [done["status"] for done in turn.tool_results] == ["OK", "ERROR"]
    spans = {span.name: span for span in exporter.get_finished_spans()}
    works, breaks_span = spans["execute_tool t.works"], spans["execute_tool t.breaks"]
    assert works.status.status_code is StatusCode.UNSET and "error.type" not in (works.attributes or {})
    assert breaks_span.status.status_code is StatusCode.ERROR
    assert breaks_span.status.description == "TOOL_ERROR: it broke"
    assert (breaks_span.attributes or {})["error.type"] == "TOOL_ERROR"
