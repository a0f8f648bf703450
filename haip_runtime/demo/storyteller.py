"""An example agent plugin that streams its answer word by word (no LLM needed).

Enable it in haip.toml::

    [agents.storyteller]
    plugin = "haip_runtime.demo.storyteller:Storyteller"
    options = { words_per_second = 40 }
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel, ConfigDict, Field

from haip_runtime import Agent, Turn


class StorytellerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    words_per_second: float = Field(default=40, gt=0)
    """Pace of the stream, as an LLM would produce tokens."""


class Storyteller(Agent[StorytellerOptions]):
    name = "storyteller"
    description = "Streams a short story about what you say."
    Options = StorytellerOptions

    async def on_message(self, turn: Turn) -> None:
        subject = turn.text.strip() or "nothing at all"
        story = (
            f"Once upon a time, someone said {subject!r}. "
            f"The words travelled far, and everyone who heard {subject!r} smiled. The end."
        )
        pause = 1 / self.options.words_per_second
        async with turn.stream() as out:
            for index, word in enumerate(story.split(" ")):
                await out.write(word if index == 0 else " " + word)
                await anyio.sleep(pause)
