"""Agent plugins used by the tests (loaded as ``tests.support.agents:Name`` like any plugin)."""

from __future__ import annotations

import threading

import anyio
from pydantic import BaseModel

from haip_runtime import Agent, NoOptions, Turn


class FailingAgent(Agent[NoOptions]):
    description = "Raises on every message."

    async def on_message(self, turn: Turn) -> None:
        if turn.text == "fine":
            await turn.say("all good")
            return
        async with turn.stream() as out:
            await out.write("about to fail")
            raise ValueError("the plugin broke")


class WaitingAgent(Agent[NoOptions]):
    """Streams one part, then waits until the run is cancelled."""

    async def on_message(self, turn: Turn) -> None:
        async with turn.stream() as out:
            await out.write("thinking")
            await anyio.sleep_forever()


class GreeterAgent(Agent[NoOptions]):
    async def on_start(self, turn: Turn) -> None:
        await turn.say(f"hello {self.context.started_by}, params={sorted(self.context.params)}")

    async def on_message(self, turn: Turn) -> None:
        history = " | ".join(f"{entry.role}:{entry.text}" for entry in turn.history)
        await turn.say(history)


class Order(BaseModel):
    text: str
    quantity: int


class OrderAgent(Agent[NoOptions]):
    input_schema = Order

    async def on_message(self, turn: Turn) -> None:
        await turn.say(f"ordered {turn.payload.get('quantity', 1)} x {turn.text}")


#: Set by ``FloodAgent`` when it has written its last part (test servers run in the test's process).
FLOODED = threading.Event()


class FloodAgent(Agent[NoOptions]):
    """Streams ``count=N size=S``: N parts as fast as it can, part i being i padded to S characters."""

    async def on_message(self, turn: Turn) -> None:
        asked = dict(word.split("=", 1) for word in turn.text.split())
        count, size = int(asked["count"]), int(asked["size"])
        async with turn.stream() as out:
            for index in range(count):
                await out.write(str(index).rjust(size, "."))
        FLOODED.set()


class ParagraphsAgent(Agent[NoOptions]):
    """Streams an answer of several lines and a paragraph break, split mid-line as models split it."""

    PARTS = ("Roses are", " red,\nviolets", " are blue.\n", "\nA new", " paragraph\nends here.")

    async def on_message(self, turn: Turn) -> None:
        async with turn.stream() as out:
            for part in self.PARTS:
                await out.write(part)


class BeepAgent(Agent[NoOptions]):
    """Answers every message with a short beep: a WAV clip sent as agent audio."""

    async def on_message(self, turn: Turn) -> None:
        import io
        import math
        import struct
        import wave

        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as clip:
            clip.setnchannels(1)
            clip.setsampwidth(2)
            clip.setframerate(8000)
            samples = (int(8000 * math.sin(2 * math.pi * 440 * n / 8000)) for n in range(2000))
            clip.writeframes(b"".join(struct.pack("<h", sample) for sample in samples))
        await turn.send_audio(buffer.getvalue(), "audio/wav", duration_ms=250)
