"""Finding agent plugins: entry points of group ``haip_runtime.agents`` and ``module:Class`` strings.

Installed is not enabled: only agents named in ``[agents.*]`` are loaded. Each is imported and
its options validated at start-up, so a broken plugin stops ``serve``/``check`` with one line,
not a user's first message.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from haip_runtime.agents.api import Agent, AgentContext
from haip_runtime.config import AgentConfig, HaipConfig
from haip_runtime.exceptions import PluginError

ENTRY_POINT_GROUP = "haip_runtime.agents"
#: Built-ins, so a source checkout works before ``pip install`` registers the entry points.
BUILTIN = {
    "echo": "haip_runtime.agents.echo:EchoAgent",
    "operator": "haip_runtime.agents.operator:OperatorAgent",
}


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
    target = _entry_point(spec) or BUILTIN.get(spec) or spec
    if ":" not in target:
        known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise PluginError(f"{where}: {spec!r} is neither a known agent ({', '.join(known)}) nor 'module:Class'")
    module_name, _, attr = target.partition(":")
    module = _import(module_name, base_dir, where)
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise PluginError(f"{where}: {target!r} is not a subclass of haip_runtime.Agent")
    return cls


def _entry_point(name: str) -> str | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return str(ep.value)
    return None


def _import(module_name: str, base_dir: Path, where: str) -> Any:
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = (base_dir / module_name).resolve()
            if not path.is_file():
                raise PluginError(f"{where}: no such file: {path}")
            return _import_file(path)
        if str(base_dir) not in sys.path:
            sys.path.insert(0, str(base_dir))
        return importlib.import_module(module_name)
    except PluginError:
        raise
    except Exception as exc:  # an import runs arbitrary plugin code: report any failure in one line
        raise PluginError(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> Any:
    module_name = f"haip_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
