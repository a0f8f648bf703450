"""Speech through the runtime, against the same engines called directly (bench/SPEECH-RESULTS.md).

    .venv/bin/python bench/speech.py [--rounds N]

Engines: each of four sentences spoken by espeak-ng is transcribed by whisper tiny.en
(faster-whisper, int8, the `local` provider) and synthesized again; the real-time factor is
processing time over audio length (below 1: faster than real time).

Through the runtime: a WebSocket client (a real uvicorn on 127.0.0.1) sends the recording of
"what is two plus three" as three AUDIO_CHUNKs to the `echo` agent with `speech = "local"`, and
times, from sending the final chunk (the end of speech), the arrival of its transcript (the spoken
MESSAGE) and of the answer's first AUDIO_CHUNK. The baseline, interleaved round by round on the
same machine: the same recording transcribed, then the same answer's first sentence synthesized,
by the provider called directly in-process. Only 127.0.0.1 is contacted; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haip_runtime.config.providers import LocalSpeechConfig  # noqa: E402
from haip_runtime.protocol.events import ALL_EVENTS  # noqa: E402
from haip_runtime.speech.local import LocalSpeech  # noqa: E402
from tests.support.raw import raw_peer  # noqa: E402
from tests.support.serving import live_server, make_config  # noqa: E402
from tests.support.speech import espeak, wav_seconds  # noqa: E402

SENTENCES = (
    "what is two plus three",
    "please book a table for four people tonight",
    "the weather in paris is sunny and warm",
    "turn off the lights in the kitchen",
)
QUESTION = SENTENCES[0]


async def engines(provider: LocalSpeech, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for text in SENTENCES:
        clip = espeak(text)
        seconds = wav_seconds(clip)
        heard, hear_times, speak_times, spoken_seconds = "", [], [], 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            heard = await provider.transcribe(clip, "audio/wav")
            hear_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            speech = await provider.synthesize(text)
            speak_times.append(time.perf_counter() - start)
            spoken_seconds = speech.duration_ms / 1000
        rows.append(
            {
                "text": text,
                "heard": heard,
                "seconds": seconds,
                "stt_rtf": statistics.median(hear_times) / seconds,
                "stt_s": statistics.median(hear_times),
                "tts_rtf": statistics.median(speak_times) / spoken_seconds,
            }
        )
    return rows


async def through_runtime(url: str, token: str, clip: bytes, n: int) -> tuple[float, float, str]:
    async with raw_peer(url) as peer:
        await peer.receive()
        await peer.hai(token, accept_events=sorted(ALL_EVENTS))
        await peer.receive_type("INFO")
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = str((await peer.receive_type("TRANSACTION_START"))["transaction"])
        third = -(-len(clip) // 3)
        for seq in range(3):
            payload: dict[str, Any] = {"message_id": f"q{n}", "mime": "audio/wav", "seq_in_message": seq}
            payload["data"] = base64.b64encode(clip[seq * third : (seq + 1) * third]).decode()
            if seq == 2:
                payload["final"] = True
                end = time.perf_counter()
            await peer.send("AUDIO_CHUNK", payload, transaction=tx)
        transcript_at = first_audio_at = 0.0
        answer = ""
        with anyio.fail_after(60):
            while not first_audio_at:
                frame = await peer.ws.recv()
                if isinstance(frame, bytes):
                    continue
                envelope = json.loads(frame)
                payload = envelope["payload"] if isinstance(envelope["payload"], dict) else {}
                if envelope["type"] == "MESSAGE" and payload.get("spoken"):
                    transcript_at = time.perf_counter()
                elif envelope["type"] == "AUDIO_CHUNK" and envelope["channel"] == "AUDIO_OUT":
                    first_audio_at = time.perf_counter()
                    answer = str(payload["text"])
    return transcript_at - end, first_audio_at - end, answer


async def directly(provider: LocalSpeech, clip: bytes, answer: str) -> tuple[float, float]:
    start = time.perf_counter()
    await provider.transcribe(clip, "audio/wav")
    heard = time.perf_counter()
    await provider.synthesize(answer)
    return heard - start, time.perf_counter() - start


async def run(rounds: int) -> str:
    provider = LocalSpeech("bench", LocalSpeechConfig(kind="local"))
    start = time.perf_counter()
    await provider.load()
    load_s = time.perf_counter() - start
    engine_rows = await engines(provider, rounds)
    clip = espeak(QUESTION)
    config = make_config(
        {"speech": {"local": {"kind": "local"}}, "agents": {"echo": {"plugin": "echo", "speech": "local"}}}
    )
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    with live_server(config) as live:
        token = live.token("bench")
        _, _, answer = await through_runtime(live.ws_url, token, clip, 0)  # warm-up: the server's model loads
        await directly(provider, clip, answer)
        for n in range(1, rounds + 1):
            transcript_s, audio_s, _ = await through_runtime(live.ws_url, token, clip, n)
            ours.append((transcript_s, audio_s))
            base.append(await directly(provider, clip, answer))
    return report(rounds, load_s, engine_rows, ours, base, answer, wav_seconds(clip))


def report(
    rounds: int,
    load_s: float,
    engine_rows: list[dict[str, Any]],
    ours: list[tuple[float, float]],
    base: list[tuple[float, float]],
    answer: str,
    question_s: float,
) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    ours_t, ours_a = med([o[0] for o in ours]), med([o[1] for o in ours])
    base_t, base_a = med([b[0] for b in base]), med([b[1] for b in base])
    ratio_t = med([o[0] / b[0] for o, b in zip(ours, base, strict=True)])
    ratio_a = med([o[1] / b[1] for o, b in zip(ours, base, strict=True)])
    lines = [
        "# Speech benchmark",
        "",
        f"Written by `bench/speech.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores (shared with other work). "
        f'Engines of `[speech.*] kind = "local"`: whisper tiny.en (faster-whisper, int8, CPU) and espeak-ng; '
        f"median of {rounds} rounds. The model loaded in {load_s:.2f} s.",
        "",
        "## Through the runtime",
        "",
        f'The {question_s:.2f} s recording of "{QUESTION}" (espeak-ng) in three AUDIO_CHUNKs to `echo` with '
        f'`speech = "local"`; the answer\'s first sentence spoken: "{answer}". Times from sending the final chunk.',
        "",
        "| measure | through the runtime | the engines called directly | ratio |",
        "|---|---|---|---|",
        f"| end of speech → transcript | {ours_t * 1000:.0f} ms | {base_t * 1000:.0f} ms (transcribe) "
        f"| {ratio_t:.2f}x |",
        f"| end of speech → first audio chunk | {ours_a * 1000:.0f} ms | {base_a * 1000:.0f} ms "
        f"(transcribe, then synthesize the first sentence) | {ratio_a:.2f}x |",
        "",
        "## Each engine on this CPU",
        "",
        "Real-time factor: processing time over audio length (0.2 = five times faster than real time).",
        "",
        "| sentence (espeak-ng) | length | whisper tiny.en heard | transcription | STT RTF | espeak-ng TTS RTF |",
        "|---|---|---|---|---|---|",
        *[
            f'| {r["text"]} | {r["seconds"]:.2f} s | "{r["heard"]}" | {r["stt_s"] * 1000:.0f} ms | '
            f"{r['stt_rtf']:.2f} | {r['tts_rtf']:.3f} |"
            for r in engine_rows
        ],
        "",
        "Through the runtime the transcript also travels: the chunks joined, the transcription in a worker",
        "thread, the MESSAGE published to the transaction and sent; the audio: the echo agent's turn, its",
        "text cut into sentences, espeak-ng as a subprocess, the WAV base64 in an AUDIO_CHUNK. The 2 cores are",
        "shared with other engineers' work, so absolute times move between runs; the ratio is per round.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = anyio.run(run, args.rounds)
    (ROOT / "bench" / "SPEECH-RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
