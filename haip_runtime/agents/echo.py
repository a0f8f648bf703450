"""The built-in ``echo`` agent: answers every message with the message itself."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from haip_runtime.agents.api import Agent, Turn


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = "you said: "
    """Put before the echoed text."""


class EchoAgent(Agent[EchoOptions]):
    name = "echo"
    description = "Repeats what you say. Needs no LLM, no keys, no network."
    Options = EchoOptions
    concurrent_turns = None  # each answer stands alone: no order to keep between them

    async def on_message(self, turn: Turn) -> None:
        await turn.say(f"{self.options.prefix}{turn.text}")
