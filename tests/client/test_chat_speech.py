"""``/say FILE`` in the terminal chat (piped, as a script would run it) to an agent with offline speech:
the recording is heard as the user's words, the answer is printed and its speech saved as a WAV."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from haip_runtime.client.recording import join_wavs
from tests.support.serving import LiveServer, live_server, make_config
from tests.support.speech import espeak, wav_seconds, words


@pytest.fixture(scope="module")
def speech_server() -> Iterator[LiveServer]:
    config = {"speech": {"local": {"kind": "local"}}, "agents": {"echo": {"plugin": "echo", "speech": "local"}}}
    with live_server(make_config(config)) as live:
        yield live


def test_say_sends_a_recording_and_the_spoken_answer_is_saved(speech_server: LiveServer, tmp_path: Path) -> None:
    question = tmp_path / "question.wav"
    question.write_bytes(espeak("what is two plus three"))
    (tmp_path / "notes.txt").write_text("not audio")
    lines = f"/say {question}\n/say {tmp_path / 'missing.wav'}\n/say {tmp_path / 'notes.txt'}\n/quit\n"
    command = [sys.executable, "-m", "haip_runtime", "chat", speech_server.bare_url, "--agent", "echo"]
    command += ["--token", speech_server.token("ann")]
    env = {**os.environ, "PATH": str(tmp_path), "TMPDIR": str(tmp_path)}  # no audio player: saved, not played
    done = subprocess.run(command, input=lines, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "2 turns failed: REFUSED, REFUSED" in done.stderr  # the two refused lines
    heard = re.search(r"^ann › (.+)$", done.stdout, re.MULTILINE)
    assert heard is not None, done.stdout
    assert words(heard.group(1)) == ["what", "is", "two", "plus", "three"]
    assert f"echo › you said: {heard.group(1)}" in done.stdout
    saved = re.search(r"♪ echo spoke \(([0-9.]+) s\), saved to (\S+\.wav)", done.stdout)
    assert saved is not None, done.stdout
    path = Path(saved.group(2))
    assert path.parent.parent == tmp_path and 1.0 < wav_seconds(path.read_bytes()) < 6.0
    assert abs(wav_seconds(path.read_bytes()) - float(saved.group(1))) < 0.06
    assert "cannot read" in done.stdout and "missing.wav" in done.stdout
    assert "/say takes a recording" in done.stdout and "notes.txt" in done.stdout


def test_spoken_sentences_join_into_one_wav() -> None:
    one, two = espeak("one"), espeak("two")
    joined, seconds = join_wavs([one, two])
    assert joined is not None and abs(wav_seconds(joined) - wav_seconds(one) - wav_seconds(two)) < 0.001
    assert abs(seconds - wav_seconds(joined)) < 0.001
    assert join_wavs([one, b"not a wav"]) == (None, 0.0) and join_wavs([]) == (None, 0.0)


def test_say_to_an_agent_that_does_not_hear_says_so_and_a_script_ends(tmp_path: Path) -> None:
    """A tester's find: piped, it waited for an answer for ever (no agent hears audio without speech)."""
    question = tmp_path / "question.wav"
    question.write_bytes(espeak("hello"))
    with live_server(make_config({"agents": {"echo": {"plugin": "echo"}}})) as deaf:
        command = [sys.executable, "-m", "haip_runtime", "chat", deaf.bare_url, "--agent", "echo"]
        command += ["--token", deaf.token("ann")]
        done = subprocess.run(command, input=f"/say {question}\nhi\n", capture_output=True, text=True, timeout=60)
    assert "✗ no agent in this conversation hears audio" in done.stdout and "(echo)" in done.stdout
    assert "echo › you said: hi" in done.stdout  # the next line goes on
    assert done.returncode == 1 and "AUDIO_UNHEARD" in done.stderr


def test_an_answer_that_cannot_be_spoken_says_why_and_a_script_goes_on(tmp_path: Path) -> None:
    """A tester's find: with an espeak-ng voice that does not exist the piped chat waited for ever for the
    spoken answer, and said nothing; the server had sent INFO speech.failed."""
    question = tmp_path / "question.wav"
    question.write_bytes(espeak("hello there"))
    speech = {"local": {"kind": "local", "voice": "xx-nonexistent"}}
    agents = {"echo": {"plugin": "echo", "speech": "local", "reply_audio": True}}
    with live_server(make_config({"speech": speech, "agents": agents})) as live:
        command = [sys.executable, "-m", "haip_runtime", "chat", live.bare_url, "--agent", "echo"]
        command += ["--token", live.token("ann")]
        done = subprocess.run(command, input=f"/say {question}\nnext\n", capture_output=True, text=True, timeout=60)
    assert "✗ the answer could not be spoken: SPEECH_" in done.stdout, done.stdout
    assert "echo › you said: next" in done.stdout  # the next line goes on
    assert done.returncode == 1 and "SPEECH_" in done.stderr


def test_a_long_recording_goes_in_few_chunks_within_the_servers_frames(tmp_path: Path) -> None:
    """A tester's find: a minute of CD audio went in 220 chunks of 48 KB, back to back, and the session's
    message rate (100 a second) dropped some: the agent heard half a sentence, or nothing."""
    import anyio

    from haip_runtime.client.recording import send_recording

    class Client:
        max_frame_bytes = 1024 * 1024
        sent: list[dict[str, object]] = []

        async def send(self, type: str, payload: dict[str, object], **_: object) -> str:
            self.sent.append(payload)
            return "id"

    recording, client = tmp_path / "minute.wav", Client()
    recording.write_bytes(b"RIFF" + bytes(10_800_000))
    anyio.run(send_recording, client, "tx", str(recording))  # type: ignore[arg-type]
    sizes = [len(str(payload["data"])) for payload in client.sent]
    assert len(sizes) == 21 and max(sizes) + 4096 < Client.max_frame_bytes
    assert [payload["seq_in_message"] for payload in client.sent] == list(range(21))
    assert client.sent[-1]["final"] is True


def test_a_recording_over_the_servers_limit_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    """A tester's find: the chat sent a 25 MB WAV; the server dropped it past 16 MiB, then heard its tail."""
    import anyio

    from haip_runtime.client.recording import send_recording
    from haip_runtime.exceptions import ClientError

    class Client:
        max_frame_bytes = 65536
        sent: list[object] = []

        async def send(self, type: str, payload: dict[str, object], **_: object) -> str:
            self.sent.append(payload)
            return "id"

    recording, client = tmp_path / "long.wav", Client()
    recording.write_bytes(b"RIFF" + bytes(16 * 65536))
    refused = r"long.wav is 1,048,580 bytes; the server takes a recording of at most 1,048,576"
    with pytest.raises(ClientError, match=refused):
        anyio.run(send_recording, client, "tx", str(recording))  # type: ignore[arg-type]
    assert client.sent == []
