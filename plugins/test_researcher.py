"""Tests of the Researcher template, in memory: a fake search tool and a scripted LLM, no server, no network.

Run them with ``pytest plugins/test_researcher.py``. ``pytestmark = pytest.mark.anyio`` runs the
async tests; ``conftest.py`` beside this file picks the asyncio backend.
"""

from __future__ import annotations

from typing import Any

import pytest

from haip_runtime import PluginError
from haip_runtime.testing import AgentHarness, FakeToolError, ScriptedLLM
from plugins.researcher import Researcher

pytestmark = pytest.mark.anyio


def search(arguments: dict[str, Any]) -> dict[str, Any]:
    """Search the docs."""
    if not arguments["query"].strip():
        raise FakeToolError("the query is empty")
    return {"hits": [{"title": "Resuming sessions", "text": "Send HAI with last_rx_seq."}]}


async def test_it_searches_then_answers_from_the_result() -> None:
    llm = ScriptedLLM(["Send HAI with your last_rx_seq."])
    async with AgentHarness(Researcher, tools={"docs.search": search}, llm=llm, instructions="Cite the docs.") as agent:
        turn = await agent.send("how do I resume?")
    assert turn.status == "OK" and turn.text == "Send HAI with your last_rx_seq."
    assert turn.tool_calls[0]["tool"] == "docs.search" and turn.tool_calls[0]["params"] == {"query": "how do I resume?"}
    # the model was given the search result, in the history, and the configured instructions
    (request,) = llm.requests
    assert [entry.role for entry in request.history] == ["user", "tool_call", "tool_result"]
    assert "last_rx_seq" in request.history[-1].text and request.instructions == "Cite the docs."
    end = [e for e in turn.events if e.type == "MESSAGE_END"][0]
    assert end.payload == {"message_id": end.payload["message_id"], "tokens": 5}  # type: ignore[index]


async def test_a_failed_search_is_said_without_asking_the_llm() -> None:
    llm = ScriptedLLM([])
    async with AgentHarness(Researcher, tools={"docs.search": search}, llm=llm) as agent:
        turn = await agent.send("   ")
    assert turn.text == "I could not search (ERROR): the query is empty"
    assert llm.requests == []


async def test_options_name_the_tool_and_reject_typos() -> None:
    llm = ScriptedLLM(["ok"])
    options = {"search_tool": "wiki.find", "query_argument": "q"}
    async with AgentHarness(Researcher, tools={"wiki.find": lambda args: args["q"]}, llm=llm, options=options) as agent:
        turn = await agent.send("tea")
    assert turn.tool_calls[0]["params"] == {"q": "tea"} and turn.tool_results[0]["status"] == "OK"
    with pytest.raises(PluginError, match="agents.researcher.options.search_tol: unknown option"):
        AgentHarness(Researcher, options={"search_tol": "x"})
