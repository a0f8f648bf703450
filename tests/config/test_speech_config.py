"""``[speech.<id>]`` and ``agents.<name>.speech``: what a config may say, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from haip_runtime.config import load_config
from haip_runtime.config.providers import LocalSpeechConfig, OpenAiSpeechConfig
from haip_runtime.exceptions import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "haip.toml"
    path.write_text(text)
    return path


def test_both_kinds_load_with_their_defaults(tmp_path: Path) -> None:
    text = (
        "[speech.here]\nkind = 'local'\n[speech.there]\nkind = 'openai'\napi_key = '${KEY}'\n"
        "[agents.a]\nplugin = 'echo'\nspeech = 'here'\nreply_audio = true\n"
    )
    config = load_config(write(tmp_path, text), env={"KEY": "sk-1"})
    here, there = config.speech["here"], config.speech["there"]
    assert isinstance(here, LocalSpeechConfig) and (here.language, here.voice, here.beam_size) == ("en", "en-us", 1)
    assert isinstance(there, OpenAiSpeechConfig) and there.api_key is not None
    assert there.api_key.get_secret_value() == "sk-1" and there.base_url == "https://api.openai.com/v1"
    assert config.agents["a"].speech == "here" and config.agents["a"].reply_audio


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[agents.a]\nplugin = 'echo'\nspeech = 'nope'\n", "agents.a.speech names unknown provider 'nope'"),
        ("[agents.a]\nplugin = 'echo'\nreply_audio = true\n", "agents.a.reply_audio needs agents.a.speech"),
        ("[speech.s]\nkind = 'cloud'\n", "speech.s"),
    ],
    ids=["unknown-provider", "reply-without-speech", "unknown-kind"],
)
def test_bad_speech_config_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
