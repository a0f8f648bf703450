"""Agent plugins used by the tests (loaded as ``tests.support.agents:Name`` like any plugin)."""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import anyio.lowlevel
from pydantic import BaseModel

from haip_runtime import Agent, AgentContext, NoOptions, Turn


class FailingAgent(Agent[NoOptions]):
    description = "Raises on every message."

    async def on_message(self, turn: Turn) -> None:
        if turn.text == "fine":
            await turn.say("all good")
            return
        async with turn.stream() as out:
            await out.write("about to fail")
            raise ValueError("the plugin broke")


class BrokenAgent(Agent[NoOptions]):
    """Its class cannot be made: its ``__init__`` raises (a missing key, say)."""

    def __init__(self, context: AgentContext) -> None:
        raise ValueError("no API key in the environment")

    async def on_message(self, turn: Turn) -> None:
        await turn.say("unreachable")


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


class AddRequest(BaseModel):
    a: int
    b: int


class CalculatorAgent(Agent[NoOptions]):
    """Takes structured messages only (no ``text`` in its schema): ``{"a": 2, "b": 40}``."""

    input_schema = AddRequest

    async def on_message(self, turn: Turn) -> None:
        await turn.say(f"{turn.payload['a']} + {turn.payload['b']} = {turn.payload['a'] + turn.payload['b']}")


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


class Gate:
    """A gate the test opens from its own thread for runs of ``GateAgent`` on the server's event loop
    (test servers run in a thread of the test's process): it counts the runs and holds them until opened."""

    def __init__(self) -> None:
        self.runs = 0
        self.cancelled = threading.Event()
        """Set when a run waiting at the gate is cancelled."""
        self._lock = threading.Lock()
        self._open = False
        self._waiting: list[tuple[anyio.lowlevel.EventLoopToken, anyio.Event]] = []

    def open(self) -> None:
        with self._lock:
            self._open, waiting = True, list(self._waiting)
        for token, event in waiting:
            anyio.from_thread.run_sync(event.set, token=token)

    async def wait(self) -> None:
        waiter = (anyio.lowlevel.current_token(), anyio.Event())
        with self._lock:
            self.runs += 1
            if self._open:
                return
            self._waiting.append(waiter)
        try:
            await waiter[1].wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        finally:
            with self._lock:
                self._waiting.remove(waiter)


#: The gates ``GateAgent`` runs wait at, by the message they are given (one per test).
GATES: dict[str, Gate] = {}


class GateAgent(Agent[NoOptions]):
    """Streams that it waits, waits at the gate named by the message (``GATES``), then answers."""

    async def on_message(self, turn: Turn) -> None:
        gate = GATES[turn.text]
        async with turn.stream() as out:
            await out.write("waiting at the gate")
            await gate.wait()
            await out.write(f"; through the gate {turn.text}")


class PatientAgent(Agent[NoOptions]):
    """Waits until cancelled (or its node dies) when told ``wait``; echoes anything else, meanwhile too."""

    concurrent_turns = None  # (its other turns answer while one waits)

    async def on_message(self, turn: Turn) -> None:
        if turn.text == "wait":
            async with turn.stream() as out:
                await out.write("waiting")
                await anyio.sleep_forever()
        await turn.say(f"you said: {turn.text}")


class ListenerAgent(Agent[NoOptions]):
    """Hears a recording through ``on_audio`` (no speech provider) and answers it in words."""

    async def on_message(self, turn: Turn) -> None:
        await turn.say(f"text: {turn.text}")

    async def on_audio(self, turn: Turn) -> None:
        assert turn.audio is not None
        await turn.say(f"heard {len(turn.audio.data)} bytes")


class LeakyScopeAgent(Agent[NoOptions]):
    """Leaves a cancel scope entered (as a misused task group does): its run fails leaving its own scope,
    outside the hook itself."""

    async def on_message(self, turn: Turn) -> None:
        anyio.CancelScope().__enter__()


class LoudAgent(Agent[NoOptions]):
    """Says ``N`` repetitions of a quote, an accented letter and a newline (each escaped or two bytes in
    JSON) in one message: past ``server.max_frame_bytes`` for a large N."""

    async def on_message(self, turn: Turn) -> None:
        await turn.say('"é\n' * int(turn.text))


class CallerAgent(Agent[NoOptions]):
    """Calls the tool its message names and says how the call ended: ``status code``."""

    async def on_message(self, turn: Turn) -> None:
        result = await turn.call_tool(turn.text)
        await turn.say(f"{result.status} {(result.error or {}).get('code', '')}")
