"""A bench-only agent plugin: streams as many tokens as it is asked for, at once or at a given rate.

The user's message says what to stream, as ``key=value`` words: ``count`` tokens (default 100),
``rate`` tokens per second (0, the default: all at once), ``stamp=1`` to make each token the wall-clock
time it was written (``"<time.time()> "``, so a client measures delivery lag even when parts are merged),
``number=1`` to put each stamped token's index before it (``"<index>:<time.time()> "``, so a client checks
it got every token once and in order), ``size`` characters per unstamped token (default 4).
"""

from __future__ import annotations

import time

import anyio

from haip_runtime import Agent, NoOptions, Turn


class Streamer(Agent[NoOptions]):
    name = "stream"
    description = "Streams N tokens at once or at a rate (bench only)."

    async def on_message(self, turn: Turn) -> None:
        asked = dict(word.split("=", 1) for word in turn.text.split() if "=" in word)
        count, rate = int(asked.get("count", 100)), float(asked.get("rate", 0))
        stamp, token = asked.get("stamp") == "1", "t" * (int(asked.get("size", 4)) - 1) + " "
        numbered = asked.get("number") == "1"
        start = time.monotonic()
        async with turn.stream() as out:
            for index in range(count):
                if rate:
                    await anyio.sleep(max(0.0, start + index / rate - time.monotonic()))
                if numbered:
                    await out.write(f"{index}:{time.time():.6f} ")
                else:
                    await out.write(f"{time.time():.6f} " if stamp else token)
