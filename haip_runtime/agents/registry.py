"""Finding agent plugins: entry points of group ``haip_runtime.agents`` and ``module:Class`` strings
(found by ``haip_runtime/config/references.py``, shared with in-process MCP servers).

Installed is not enabled: only agents named in ``[agents.*]`` are loaded. Each is imported and
its options validated at start-up, so a broken plugin stops ``serve``/``check`` with one line,
not a user's first message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from haip_runtime.agents.api import Agent, AgentContext
from haip_runtime.config.loading import got
from haip_runtime.config.models import AgentConfig, HaipConfig
from haip_runtime.config.references import PluginKind, resolve
from haip_runtime.exceptions import PluginError

if TYPE_CHECKING:
    from haip_runtime.llm.provider import Provider

logger = logging.getLogger(__name__)

#: Agents already said to lack ``super().__init__(context)`` (said once, not at every conversation).
_WITHOUT_SUPER: set[str] = set()

AGENTS = PluginKind(
    noun="agent",
    group="haip_runtime.agents",
    form="module:Class",
    # Built-ins, so a source checkout works before ``pip install`` registers the entry points.
    builtin={
        "echo": "haip_runtime.agents.echo:EchoAgent",
        "operator": "haip_runtime.agents.operator:OperatorAgent",
        "assistant": "haip_runtime.agents.assistant:AssistantAgent",
    },
)


@dataclass(frozen=True)
class AgentSpec:
    """One configured agent: its name, class, validated options and config table."""

    name: str
    cls: type[Agent[Any]]
    options: BaseModel
    config: AgentConfig
    llm: Provider | None = None

    @property
    def description(self) -> str:
        return self.config.description or self.cls.description or self.cls.__doc__ or ""

    @property
    def hears(self) -> bool:
        """Whether members' audio reaches this agent: it has a speech provider, or overrides ``on_audio``."""
        return self.config.speech is not None or self.cls.on_audio is not Agent.on_audio

    def create(self, *, transaction_id: str, started_by: str, params: dict[str, Any]) -> Agent[Any]:
        context = AgentContext(
            name=self.name,
            transaction_id=transaction_id,
            started_by=started_by,
            params=params,
            config=self.config,
            options=self.options,
            llm=self.llm,
        )
        agent = self.cls(context)
        if not hasattr(agent, "context"):  # its __init__ did not call super().__init__(context)
            if self.name not in _WITHOUT_SUPER:
                _WITHOUT_SUPER.add(self.name)
                logger.warning(
                    "agent %r: %s.__init__ does not call super().__init__(context); the runtime sets its context"
                    " and options itself",
                    self.name,
                    self.cls.__qualname__,
                )
            agent.context = context
            agent.options = context.options
        return agent


def load_agents(config: HaipConfig, llms: Mapping[str, Provider] | None = None) -> dict[str, AgentSpec]:
    """Import and validate every configured agent, handing each its ``[llm.*]`` provider from ``llms``.

    Raises ``PluginError`` naming the key.
    """
    providers = llms or {}
    loaded: dict[str, AgentSpec] = {}
    problems: list[str] = []  # every agent's, not only the first's (an author fixes them in one go)
    for name, agent in config.agents.items():
        try:
            loaded[name] = load_agent(name, agent, config.base_dir, providers.get(agent.llm) if agent.llm else None)
        except PluginError as exc:
            problems += exc.problems
    if problems:
        raise PluginError(problems[0], problems)
    return loaded


def load_agent(name: str, config: AgentConfig, base_dir: Path, llm: Provider | None = None) -> AgentSpec:
    where = f"agents.{name}.plugin"
    cls = resolve_plugin(config.plugin, base_dir, where)
    options = validate_options(cls, config.options, f"agents.{name}.options")
    return AgentSpec(name=name, cls=cls, options=options, config=config, llm=llm)


def validate_options(cls: type[Agent[Any]], options: Mapping[str, Any], where: str) -> BaseModel:
    """``options`` through the plugin's ``Options`` model; unknown keys are refused even if the model allows them."""
    model = cls.Options
    names = _option_names(model)
    problems: list[str] = []
    unknown = sorted(set(options) - names)
    if unknown and model.model_config.get("extra") != "forbid":
        takes = f"it takes: {', '.join(sorted(names))}" if names else "it declares no Options"
        problems += [f"{where}.{key}: unknown option of {cls.__name__} ({takes})" for key in unknown]
    try:
        validated = model.model_validate(dict(options))
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                none = f"unknown option of {cls.__name__} (it declares no Options)"
                message = none if not names else "unknown option (check the spelling)"
            elif error["type"] != "missing":  # (the value, as the config's own errors show it: a newcomer's find)
                message += got(error.get("input"), f"{where}.{key}")
            problems.append(f"{where}.{key}: {message}")
        raise PluginError(problems[0], problems) from exc
    if problems:
        raise PluginError(problems[0], problems)
    return validated


def _option_names(model: type[BaseModel]) -> set[str]:
    return {alias for name, f in model.model_fields.items() for alias in (name, f.alias) if alias}


def resolve_plugin(spec: str, base_dir: Path, where: str) -> type[Agent[Any]]:
    target, cls = resolve(spec, base_dir, where, AGENTS, hint=_agents_defined)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise PluginError(f"{where}: {target!r} is not a subclass of haip_runtime.Agent")
    _check_hooks(cls, target, where)
    turns = cls.concurrent_turns
    if turns is not None and (not isinstance(turns, int) or isinstance(turns, bool) or turns < 1):
        raise PluginError(f"{where}: {target}.concurrent_turns is a number of turns from 1 up, or None; not {turns!r}")
    return cls


#: The hooks the runtime awaits: a plain ``def`` among them fails at its first turn, so it fails here.
HOOKS = ("on_start", "on_message", "on_end", "on_audio")


def _check_hooks(cls: type[Agent[Any]], target: str, where: str) -> None:
    """What would fail at every turn, found at load (``check``, ``serve``): a hook that is not ``async
    def``, and a class that answers no message (``on_message`` is required)."""
    for hook in HOOKS:
        method = getattr(cls, hook, None)
        # Only a plain function that is not async (nor wraps one, decorated) is sure to fail; a callable
        # object, or a decorator that hides a coroutine function, may well return an awaitable.
        plain = inspect.isfunction(method) and not inspect.iscoroutinefunction(inspect.unwrap(method))
        if plain and not inspect.iscoroutinefunction(method):
            raise PluginError(f"{where}: {target!r}.{hook} must be 'async def' (the runtime awaits it)")
    if cls.on_message is Agent.on_message:
        raise PluginError(f"{where}: {target!r} does not define on_message, which answers a member's message")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel)):
        raise PluginError(
            f"{where}: {target!r}.Options must be a pydantic model (a BaseModel subclass), not {cls.Options!r}"
        )


def _agents_defined(module: Any) -> str:
    found = sorted(
        n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Agent) and v is not Agent
    )
    return f"agents defined there: {', '.join(found)}" if found else "it defines no Agent subclass"
