"""Finding agent plugins: entry points of group ``haip_runtime.agents`` and ``module:Class`` strings
(found by ``haip_runtime/plugins.py``, shared with in-process MCP servers).

Installed is not enabled: only agents named in ``[agents.*]`` are loaded. Each is imported and
its options validated at start-up, so a broken plugin stops ``serve``/``check`` with one line,
not a user's first message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from haip_runtime.agents.api import Agent, AgentContext
from haip_runtime.config import AgentConfig, HaipConfig
from haip_runtime.exceptions import PluginError
from haip_runtime.plugins import PluginKind, resolve

AGENTS = PluginKind(
    noun="agent",
    group="haip_runtime.agents",
    form="module:Class",
    # Built-ins, so a source checkout works before ``pip install`` registers the entry points.
    builtin={
        "echo": "haip_runtime.agents.echo:EchoAgent",
        "operator": "haip_runtime.agents.operator:OperatorAgent",
    },
)


@dataclass(frozen=True)
class AgentSpec:
    """One configured agent: its name, class, validated options and config table."""

    name: str
    cls: type[Agent]
    options: BaseModel
    config: AgentConfig

    @property
    def description(self) -> str:
        return self.config.description or self.cls.description or self.cls.__doc__ or ""

    def create(self, *, transaction_id: str, started_by: str, params: dict[str, Any]) -> Agent:
        context = AgentContext(
            name=self.name,
            transaction_id=transaction_id,
            started_by=started_by,
            params=params,
            config=self.config,
            options=self.options,
        )
        return self.cls(context)


def load_agents(config: HaipConfig) -> dict[str, AgentSpec]:
    """Import and validate every configured agent. Raises ``PluginError`` naming the key."""
    return {name: load_agent(name, agent, config.base_dir) for name, agent in config.agents.items()}


def load_agent(name: str, config: AgentConfig, base_dir: Path) -> AgentSpec:
    where = f"agents.{name}.plugin"
    cls = resolve_plugin(config.plugin, base_dir, where)
    try:
        options = cls.Options.model_validate(config.options)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        raise PluginError(f"agents.{name}.options.{key}: {error['msg']}") from exc
    return AgentSpec(name=name, cls=cls, options=options, config=config)


def resolve_plugin(spec: str, base_dir: Path, where: str) -> type[Agent]:
    target, cls = resolve(spec, base_dir, where, AGENTS)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise PluginError(f"{where}: {target!r} is not a subclass of haip_runtime.Agent")
    return cls
