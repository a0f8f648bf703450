"""An LLM provider whose requests are counted in the runtime's metrics (tokens, duration, errors) and,
with tracing on, each traced as a ``chat {model}`` span."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from haip_runtime.llm.provider import Delta, Provider
from haip_runtime.observability import tracing
from haip_runtime.observability.metrics import Metrics


def metered(name: str, provider: Provider, metrics: Metrics) -> Provider:
    """``provider``, its ``stream`` timed and its token usage counted under ``name``."""
    original = provider.stream
    vendor = type(provider).__name__.removesuffix("Provider").lower()  # openai, anthropic, local...
    metrics.llm_watched(name)

    async def stream(*args: Any, **kwargs: Any) -> AsyncGenerator[Delta, None]:
        started = time.monotonic()
        span = tracing.chat_span(vendor, provider.model)  # None unless tracing is on
        try:
            async with aclosing(original(*args, **kwargs)) as deltas:
                async for delta in deltas:
                    if delta.usage is not None:
                        metrics.llm_usage(name, delta.usage.input_tokens, delta.usage.output_tokens)
                        if span is not None:
                            span.usage(delta.usage.input_tokens, delta.usage.output_tokens)
                    yield delta
        except BaseException as error:
            if span is not None:
                span.end(None if isinstance(error, GeneratorExit) else error)  # closed early: not a failure
            if isinstance(error, Exception):
                metrics.llm_error(name)
            raise
        if span is not None:
            span.end()
        metrics.llm_request(name, time.monotonic() - started)

    provider.stream = stream  # type: ignore[method-assign]
    return provider
