"""Speech in the terminal chat: ``/say FILE`` sends a recording; spoken answers are saved, and played
when a player is installed.

A recording goes out as ``AUDIO_CHUNK``s of one ``message_id`` (48 KiB each, base64, the last
``final: true``): an agent with ``speech`` hears it as your message. The agent's spoken answer
arrives as ``AUDIO_CHUNK``s on ``AUDIO_OUT`` (one WAV per sentence); once its final chunk is in,
the sentences are joined into one WAV file in a temporary folder, and played with the first of
``aplay``, ``paplay``, ``afplay`` found (in the background; nothing waits for it).
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any

import anyio

from haip_runtime.client.haip_client import HaipClient, Received
from haip_runtime.exceptions import ClientError
from haip_runtime.protocol.codec import AUDIO_MESSAGE_FRAMES
from haip_runtime.protocol.envelope import new_id

#: The most audio one AUDIO_CHUNK carries: a minute of CD audio (10 MB) is then 20 envelopes, not 220
#: that a session's message rate (100 a second) would cut short; less when the server's frames are
#: smaller (base64 takes 4/3 of it, and the envelope some more).
CHUNK_BYTES = 512 * 1024
#: Types by file extension; the server's speech engine reads the container itself.
MIME = {
    ".wav": "audio/wav",
    ".webm": "audio/webm",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
}
PLAYERS = ("aplay", "paplay", "afplay")


async def send_recording(
    client: HaipClient, transaction: str, name: str, message_id: str | None = None, sent: set[str] | None = None
) -> str:
    """Send the file ``name`` (``~`` expanded) as one audio message (``message_id``, else a new one);
    returns its ``message_id``. ``sent``: where the chunks' envelope ids go (an ERROR names one)."""
    path = await anyio.Path(name).expanduser()
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise ClientError(f"/say takes a recording ({', '.join(sorted(MIME))}), not {path.name}")
    try:
        data = await path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ClientError(f"{path} is empty")
    if len(data) > (most := AUDIO_MESSAGE_FRAMES * client.max_frame_bytes):
        raise ClientError(f"{path.name} is {len(data):,} bytes; the server takes a recording of at most {most:,}")
    message_id = message_id or new_id()
    size = min(CHUNK_BYTES, (client.max_frame_bytes - 4096) * 3 // 4)
    pieces = range(0, len(data), size)
    for seq, offset in enumerate(pieces):
        payload: dict[str, Any] = {
            "message_id": message_id,
            "mime": mime,
            "seq_in_message": seq,
            "data": base64.b64encode(data[offset : offset + size]).decode("ascii"),
        }
        if seq == len(pieces) - 1:
            payload["final"] = True
        envelope = await client.send("AUDIO_CHUNK", payload, transaction=transaction, channel="AUDIO_IN")
        if sent is not None:
            sent.add(envelope)
    return message_id


class SpokenAnswers:
    """Collects agents' spoken answers; ``see`` returns a line to show when one is complete."""

    def __init__(self, folder: Path | None = None, player: str | None = None) -> None:
        self._folder = folder
        self.player = player if player is not None else next((p for p in PLAYERS if shutil.which(p)), "")
        self._parts: dict[str, list[bytes]] = {}
        self.saved: dict[str, Path] = {}
        """Answers saved, by message id."""

    def see(self, event: Received) -> str | None:
        if event.type not in ("AUDIO_CHUNK", "AUDIO") or event.raw.get("channel") != "AUDIO_OUT":
            return None
        message_id = str(event.get("message_id") or new_id())
        try:
            data = base64.b64decode(str(event.get("data") or ""), validate=True)
        except (binascii.Error, ValueError):
            return f"✗ spoken answer {message_id}: its audio is not base64"
        parts = self._parts.setdefault(message_id, [])
        if data:
            parts.append(data)
        if not event.get("final"):
            return None
        del self._parts[message_id]
        return self._save(message_id, str(event.get("author") or "agent"), parts)

    def _save(self, message_id: str, author: str, parts: list[bytes]) -> str:
        joined, seconds = join_wavs(parts)
        if joined is None:
            return f"✗ {author}'s spoken answer is not WAV audio; not saved"
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="haip-chat-speech-"))
        path = self._folder / f"{author}-{message_id[:8]}.wav"
        path.write_bytes(joined)
        self.saved[message_id] = path
        if self.player:
            subprocess.Popen(  # played in the background: the chat does not wait for the speakers
                [self.player, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            return f"♪ {author} spoke ({seconds:.1f} s), playing with {self.player}: {path}"
        return f"♪ {author} spoke ({seconds:.1f} s), saved to {path}"


def join_wavs(parts: list[bytes]) -> tuple[bytes | None, float]:
    """WAV files of one format as one WAV, and its length; ``None`` if any part is not WAV (or they differ)."""
    frames: list[bytes] = []
    params: tuple[int, int, int] | None = None
    for part in parts:
        try:
            with wave.open(io.BytesIO(part), "rb") as wav:
                these = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate())
                frames.append(wav.readframes(wav.getnframes()))
        except (wave.Error, EOFError):
            return None, 0.0
        if params is not None and these != params:
            return None, 0.0
        params = these
    if params is None:
        return None, 0.0
    channels, width, rate = params
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(b"".join(frames))
    total = sum(len(f) for f in frames) / (channels * width * rate)
    return out.getvalue(), total
