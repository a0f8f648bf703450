"""Loading agent plugins: what an author sees when a class name or an option is wrong."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from haip_runtime import Agent, PluginError, Turn
from haip_runtime.agents.registry import load_agents, resolve_plugin
from haip_runtime.config import validate_config
from haip_runtime.llm import ScriptedLLM
from tests.support.serving import ROOT

pytestmark = pytest.mark.anyio


class LooseOptions(BaseModel):  # no extra="forbid": the registry refuses unknown keys anyway
    greeting: str = "hi"


class Loose(Agent[LooseOptions]):
    Options = LooseOptions

    async def on_message(self, turn: Turn) -> None:
        await turn.say(self.options.greeting)


def test_a_missing_class_in_a_plugin_file_is_named_with_the_classes_there() -> None:
    with pytest.raises(PluginError) as caught:
        resolve_plugin("haip_runtime/demo/storyteller.py:StoryTeller", ROOT, "agents.s.plugin")
    assert str(caught.value) == (
        "agents.s.plugin: 'haip_runtime/demo/storyteller.py' has no attribute 'StoryTeller'"
        " (agents defined there: Storyteller)"
    )


def test_an_import_failing_in_a_module_the_plugin_imports_names_where(tmp_path: Path) -> None:
    """An author's find: a plugin importing a broken module beside it said only the plugin's name."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "helper.py").write_text("VALUE = 1\nOTHER = undefined_name\n")
    (tmp_path / "plugins" / "agent.py").write_text("from .helper import VALUE\n")
    with pytest.raises(PluginError) as caught:
        resolve_plugin("plugins/agent.py:A", tmp_path, "agents.a.plugin")
    assert str(caught.value) == (
        "agents.a.plugin: cannot import 'plugins/agent.py': NameError: name 'undefined_name' is not defined"
        f" (at {Path('plugins', 'helper.py')}, line 2)"
    )


def test_a_missing_class_in_a_module_without_agents_says_so() -> None:
    with pytest.raises(PluginError, match=r"'json' has no attribute 'Nope' \(it defines no Agent subclass\)"):
        resolve_plugin("json:Nope", ROOT, "agents.j.plugin")


@pytest.mark.parametrize(
    ("plugin", "options", "message"),
    [
        (
            "tests.agents.test_registry:Loose",
            {"greting": "x"},
            "agents.a.options.greting: unknown option of Loose (it takes: greeting)",
        ),
        ("echo", {"prefx": "x"}, "agents.a.options.prefx: unknown option (check the spelling)"),
        ("echo", {"prefix": 3}, "agents.a.options.prefix: Input should be a valid string (got 3)"),
    ],
)
def test_plugin_options_with_unknown_keys_or_bad_values_are_refused(
    plugin: str, options: dict[str, object], message: str
) -> None:
    config = validate_config({"agents": {"a": {"plugin": plugin, "options": options}}}, base_dir=ROOT)
    with pytest.raises(PluginError) as caught:
        load_agents(config)
    assert str(caught.value) == message


def test_each_agent_gets_the_provider_its_config_names() -> None:
    config = validate_config(
        {
            "llm": {"small": {"kind": "local"}},
            "agents": {"a": {"plugin": "assistant", "llm": "small"}, "e": {"plugin": "echo"}},
        },
        base_dir=ROOT,
    )
    small = ScriptedLLM([])
    specs = load_agents(config, {"small": small})
    assert specs["a"].llm is small and specs["e"].llm is None
    agent = specs["a"].create(transaction_id="t", started_by="u", params={})
    assert agent.context.llm is small and agent.instructions == ""


async def test_each_llm_kind_gets_its_provider() -> None:
    from haip_runtime.llm import create_providers
    from haip_runtime.llm.anthropic import AnthropicProvider
    from haip_runtime.llm.local import LocalProvider
    from haip_runtime.llm.openai import OpenAiProvider

    config = validate_config(
        {
            "llm": {
                "o": {"kind": "openai", "model": "gpt-4o-mini"},
                "a": {"kind": "anthropic", "model": "claude-sonnet-4-5", "api_key": "k"},
                "l": {"kind": "local"},
            }
        },
        base_dir=ROOT,
    )
    providers = create_providers(config.llm)
    assert [type(p) for p in providers.values()] == [OpenAiProvider, AnthropicProvider, LocalProvider]
    assert [(p.id, p.model) for p in providers.values()] == [
        ("o", "gpt-4o-mini"),
        ("a", "claude-sonnet-4-5"),
        ("l", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]
    for provider in providers.values():
        await provider.aclose()


class Silent(Agent[LooseOptions]):
    Options = LooseOptions


class Blocking(Agent[LooseOptions]):
    Options = LooseOptions

    def on_message(self, turn: Turn) -> None:  # type: ignore[override]
        turn.say("never awaited")  # type: ignore[unused-coroutine]


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("Silent", "'tests.agents.test_registry:Silent' does not define on_message, which answers a member's message"),
        ("Blocking", "'tests.agents.test_registry:Blocking'.on_message must be 'async def' (the runtime awaits it)"),
    ],
)
def test_a_plugin_whose_hooks_would_fail_every_turn_is_refused_when_it_loads(name: str, said: str) -> None:
    """A tester's find: both passed check, and failed at run time (NotImplementedError; a TypeError and
    "coroutine 'Turn.say' was never awaited")."""
    with pytest.raises(PluginError) as caught:
        resolve_plugin(f"tests.agents.test_registry:{name}", ROOT, "agents.a.plugin")
    assert str(caught.value) == f"agents.a.plugin: {said}"


def logged(hook: Any) -> Any:
    """A plain decorator around an async hook (``functools.wraps``): the hook is still awaited."""

    @functools.wraps(hook)
    def wrapper(self: Any, turn: Turn) -> Any:
        return hook(self, turn)

    return wrapper


class Decorated(Agent[LooseOptions]):
    Options = LooseOptions

    @logged
    async def on_message(self, turn: Turn) -> None:
        await turn.say("fine")


def test_a_hook_behind_a_plain_decorator_is_taken() -> None:
    """A reviewer's find: ``iscoroutinefunction`` is false for an async hook wrapped by a plain decorator."""
    assert resolve_plugin("tests.agents.test_registry:Decorated", ROOT, "agents.a.plugin") is Decorated


async def test_an_agent_whose_init_forgets_super_still_answers_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An author's find: an ``__init__`` without ``super().__init__(context)`` passed ``check``, then every
    message was a session-level INTERNAL_ERROR (the runtime reads the agent's context to start a turn)
    and the history showed the message unanswered. It now answers; the log says what to fix, once."""
    import anyio

    from haip_runtime import Agent, NoOptions
    from haip_runtime.testing import AgentHarness

    class Forgetful(Agent[NoOptions]):
        def __init__(self, context: object) -> None:
            self.count = 0

        async def on_message(self, turn: Turn) -> None:
            self.count += 1
            await turn.say(f"count {self.count} for {self.context.name}")

    with caplog.at_level("WARNING", logger="haip_runtime.agents.registry"):
        async with AgentHarness(Forgetful) as agent:
            first = await agent.send("one")
            second = await agent.send("two")
    await anyio.lowlevel.checkpoint()
    assert (first.text, second.text) == ("count 1 for forgetful", "count 2 for forgetful")
    said = [r.getMessage() for r in caplog.records if "super().__init__(context)" in r.getMessage()]
    assert len(said) == 1 and "Forgetful.__init__" in said[0]


def test_a_class_s_concurrent_turns_is_checked_when_it_loads(tmp_path: Path) -> None:
    (tmp_path / "greedy.py").write_text(
        "from haip_runtime import Agent, NoOptions, Turn\n\n"
        "class Greedy(Agent[NoOptions]):\n"
        "    concurrent_turns = 0\n\n"
        "    async def on_message(self, turn: Turn) -> None:\n"
        "        await turn.say('hi')\n"
    )
    with pytest.raises(PluginError) as caught:
        resolve_plugin("greedy.py:Greedy", tmp_path, "agents.g.plugin")
    assert "concurrent_turns is a number of turns from 1 up, or None; not 0" in str(caught.value)
