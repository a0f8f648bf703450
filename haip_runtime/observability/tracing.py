"""Traces: OpenTelemetry spans after the GenAI semantic conventions, when ``[observability] tracing = "otlp"``.

One ``invoke_agent {agent}`` span per run; under it a ``chat {model}`` span per LLM request and an
``execute_tool {tool}`` span per tool call, with the MCP SDK's own client span under that (it uses
the global tracer provider, which ``configure`` points at ours, and it carries ``traceparent`` in
``_meta`` to the server). A ``traceparent`` a client sends continues its trace.

Lower layers (llm/, agents/, conversation/) call the hooks here and nothing else. With tracing off
(the default) nothing here imports OpenTelemetry: every hook is a check of one global and hands
back a shared do-nothing context manager. The ``otel`` extra installs the SDK and the exporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from haip_runtime.exceptions import ConfigError

if TYPE_CHECKING:
    from haip_runtime.config.models import ObservabilityConfig

#: The SDK's tracer provider while tracing is on; ``None`` when it is off.
_provider: Any = None
_tracer: Any = None
_global_set = False
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()
#: The transaction of the run being traced (``gen_ai.conversation.id`` of its chat spans).
_conversation: ContextVar[str | None] = ContextVar("haip_conversation", default=None)


def enabled() -> bool:
    return _tracer is not None


def configure(config: ObservabilityConfig, exporter: Any = None) -> None:
    """Start tracing as ``config`` says (stop it if it says off). ``exporter`` replaces the OTLP/HTTP
    one (tests pass an in-memory exporter); spans are exported in batches off the event loop."""
    global _provider, _tracer
    shutdown()
    if config.tracing == "off" and exporter is None:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as missing:
        raise ConfigError(
            "observability.tracing = 'otlp' needs OpenTelemetry: pip install 'haip-runtime[otel]'"
        ) from missing
    sampler = ParentBased(TraceIdRatioBased(config.sampling_ratio))
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}), sampler=sampler)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider, _tracer = provider, provider.get_tracer("haip_runtime")
    _install_global()


def shutdown() -> None:
    """Export what is pending and stop tracing."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def _install_global() -> None:
    """Point OpenTelemetry's global tracer provider (the MCP SDK's spans) at whichever provider is
    ours at the time: set once per process, it follows every later ``configure``. A library's client
    span outside any span of ours is dropped (``_background``)."""
    global _global_set
    if _global_set:
        return
    from opentelemetry import trace

    class Follow(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return Following(args, kwargs)

    class Following(trace.Tracer):
        def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._args, self._kwargs = args, kwargs

        def _target(self) -> trace.Tracer:
            if _provider is None:
                return trace.NoOpTracer()
            tracer: trace.Tracer = _provider.get_tracer(*self._args, **self._kwargs)
            return tracer

        def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
            if _background(args, kwargs):
                return trace.INVALID_SPAN
            return self._target().start_span(*args, **kwargs)

        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
            if _background(args, kwargs):
                return contextlib.nullcontext(trace.INVALID_SPAN)
            return self._target().start_as_current_span(*args, **kwargs)

    def _background(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A library's span with no span around it, outside any run: a client's (the MCP SDK's pings,
        ``tools/list`` and ``subscriptions/listen`` to each server), a trace of its own every few seconds
        that no operator asked for; or the ``/mcp`` door's server span of a request that runs nothing
        (``initialize``, ``tools/list``, ``tasks/get``...: an integrator's find, a root trace each). Not
        recorded; inside a run they are, and so is the door's ``tools/call``, whose run nests under it."""
        kind = kwargs.get("kind", args[2] if len(args) > 2 else None)
        if kind is trace.SpanKind.SERVER:
            name = str(kwargs.get("name", args[0] if args else ""))
            if name == "tools/call" or name.startswith("tools/call "):
                return False
        elif kind is not trace.SpanKind.CLIENT:
            return False
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        return not trace.get_current_span(context).get_span_context().is_valid

    trace.set_tracer_provider(Follow())
    _global_set = True


def _parent(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


# --- the hooks ----------------------------------------------------------------------------------------


def agent_span(
    agent: str, conversation_id: str, run_id: str, traceparent: str | None = None
) -> AbstractContextManager[None]:
    """``invoke_agent {agent}`` around one run; continues ``traceparent``'s trace if given."""
    if _tracer is None:
        return _NOTHING
    attributes = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": agent,
        "gen_ai.agent.id": agent,
        "gen_ai.conversation.id": conversation_id,
        "haip.run_id": run_id,
    }
    return _current(f"invoke_agent {agent}", attributes, _parent(traceparent), conversation_id)


def tool_span(tool: str, call_id: str) -> AbstractContextManager[None]:
    """``execute_tool {tool}`` around one tool call; the MCP client span nests under it."""
    if _tracer is None:
        return _NOTHING
    attributes = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool,
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "extension",
    }
    conversation = _conversation.get()
    if conversation is not None:
        attributes["gen_ai.conversation.id"] = conversation
    return _current(f"execute_tool {tool}", attributes, None, None)


def tool_failed(code: str, message: str) -> None:
    """The tool call of the current ``execute_tool`` span failed (``TOOL_DONE`` ``ERROR``): its span says
    so, ``error.type`` the tool error code, as the GenAI conventions ask of an operation that failed."""
    if _tracer is None:
        return
    from opentelemetry.trace import StatusCode, get_current_span

    span = get_current_span()
    span.set_attribute("error.type", code)
    span.set_status(StatusCode.ERROR, message)


@contextmanager
def _current(name: str, attributes: dict[str, Any], parent: Any, conversation: str | None) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    token = _conversation.set(conversation) if conversation is not None else None
    try:
        with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.INTERNAL, attributes=attributes):
            yield
    finally:
        if token is not None:
            _conversation.reset(token)


class ChatSpan:
    """``chat {model}`` over one LLM request: started now, ended with the request (a stream is not
    entered as the current span, as it is read across many awaits)."""

    def __init__(self, provider: str, model: str) -> None:
        from opentelemetry.trace import SpanKind

        attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model}
        conversation = _conversation.get()
        if conversation is not None:
            attributes["gen_ai.conversation.id"] = conversation
        self.span = _tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes)

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            from opentelemetry.trace import StatusCode

            self.span.set_attribute("error.type", getattr(error, "code", None) or type(error).__name__)
            self.span.set_status(StatusCode.ERROR, str(error))
        self.span.end()


def chat_span(provider: str, model: str) -> ChatSpan | None:
    return None if _tracer is None else ChatSpan(provider, model)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, as hex, for log lines; ``None`` if none."""
    if _tracer is None:
        return None
    from opentelemetry.trace import get_current_span

    context = get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
