"""LLM providers: the only code in haip-runtime that speaks to LLM vendors.

``Provider`` (``provider.py``) is the seam agents see as ``turn.llm``. Kinds: ``openai``
(``openai.py``, any OpenAI-compatible server), ``anthropic`` (``anthropic.py``) and ``local``
(``local.py``, an embedded model, the offline default). ``ScriptedLLM`` (``scripted.py``) plays
back answers written in a test. ``create_providers`` builds one provider per ``[llm.<id>]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from haip_runtime.config.providers import AnthropicLlmConfig, LlmConfig, OpenAiLlmConfig
from haip_runtime.llm.provider import Delta, Provider, Reply, ToolCall, ToolSpec, Usage
from haip_runtime.llm.scripted import ScriptedLLM

__all__ = [
    "Delta",
    "Provider",
    "Reply",
    "ScriptedLLM",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "create_provider",
    "create_providers",
]


def create_provider(id: str, config: LlmConfig) -> Provider:
    """The provider for ``[llm.<id>]`` (nothing connects or loads until its first request)."""
    if isinstance(config, OpenAiLlmConfig):
        from haip_runtime.llm.openai import OpenAiProvider

        return OpenAiProvider(id, config)
    if isinstance(config, AnthropicLlmConfig):
        from haip_runtime.llm.anthropic import AnthropicProvider

        return AnthropicProvider(id, config)
    from haip_runtime.llm.local import LocalProvider

    return LocalProvider(id, config)


def create_providers(configs: Mapping[str, LlmConfig]) -> dict[str, Provider]:
    return {id: create_provider(id, config) for id, config in configs.items()}
