"""The public surfaces, one per user: each ``__all__`` is sorted, complete, documented and pinned here.

``haip_runtime`` is the plugin author's, ``haip_runtime.testing`` their test harness,
``haip_runtime.client`` the front-end author's, ``haip_runtime.config`` the operator's (and the
server's). A name added to or dropped from one of them is a change to a public API, so it changes
this file too.
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

SURFACES = {
    "haip_runtime": [
        "Agent",
        "AgentContext",
        "AudioClip",
        "Delta",
        "HaipError",
        "HistoryEntry",
        "LlmError",
        "LlmErrorCode",
        "MessageStream",
        "NoOptions",
        "PluginError",
        "Provider",
        "Reply",
        "ToolCall",
        "ToolCallResult",
        "ToolError",
        "ToolSpec",
        "ToolTimeoutError",
        "ToolUnavailableError",
        "ToolView",
        "Turn",
        "TurnServices",
        "Usage",
        "__version__",
    ],
    "haip_runtime.client": ["ClientError", "HaipClient", "Received"],
    "haip_runtime.config": [
        "ConfigError",
        "HaipConfig",
        "json_schema",
        "load_config",
        "masked_dump",
        "secret_values",
        "validate_config",
    ],
    "haip_runtime.testing": [
        "AgentHarness",
        "FakeToolContext",
        "FakeToolError",
        "ScriptedLLM",
        "ToolFunc",
        "ToolResult",
        "TurnResult",
    ],
}


def public_names(module: types.ModuleType) -> set[str]:
    """Every name a reader of ``module`` sees as public: not underscored, not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_all_is_the_pinned_list(name: str) -> None:
    assert importlib.import_module(name).__all__ == SURFACES[name]


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__)
    assert public_names(module) == set(module.__all__) - {"__version__"}


def documented(module: types.ModuleType, name: str) -> bool:
    """A class or function by a docstring of its own (not a dataclass's made-up signature), anything
    else (a type alias) by a ``#:`` comment on the line above its definition, in the module's package."""
    value = getattr(module, name)
    if isinstance(value, type | types.FunctionType):
        doc = value.__doc__ or ""
        return bool(doc.strip()) and not doc.startswith(f"{value.__name__}(")
    assert module.__file__ is not None
    definition = re.compile(rf"^#: .*\n{re.escape(name)}\b[^\n]*=", re.MULTILINE)
    return any(definition.search(path.read_text()) for path in Path(module.__file__).parent.rglob("*.py"))


@pytest.mark.parametrize("name", sorted(SURFACES))
def test_every_export_is_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
    for export in module.__all__:
        if export != "__version__":
            assert documented(module, export), f"{name}.{export}"
