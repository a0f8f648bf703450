"""Speech providers: the only code in haip-runtime that turns audio into text and text into audio.

``SpeechProvider`` (``provider.py``) is the seam: ``transcribe(audio, mime)`` and
``synthesize(text)``. Kinds: ``local`` (``local.py``: whisper tiny.en run by faster-whisper, and
Debian's espeak-ng; offline) and ``openai`` (``openai.py``: the OpenAI-compatible audio API).
``sentences.py`` cuts streamed text into sentences to speak. ``create_speech_providers`` builds
one provider per ``[speech.<id>]``; nothing loads or connects until its first use.
"""

from __future__ import annotations

from collections.abc import Mapping

from haip_runtime.config.providers import OpenAiSpeechConfig, SpeechConfig
from haip_runtime.speech.provider import Speech, SpeechProvider

__all__ = ["Speech", "SpeechProvider", "create_speech_provider", "create_speech_providers"]


def create_speech_provider(id: str, config: SpeechConfig) -> SpeechProvider:
    """The provider for ``[speech.<id>]``."""
    if isinstance(config, OpenAiSpeechConfig):
        from haip_runtime.speech.openai import OpenAiSpeech

        return OpenAiSpeech(id, config)
    from haip_runtime.speech.local import LocalSpeech

    return LocalSpeech(id, config)


def create_speech_providers(configs: Mapping[str, SpeechConfig]) -> dict[str, SpeechProvider]:
    return {id: create_speech_provider(id, config) for id, config in configs.items()}
