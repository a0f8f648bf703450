"""haip-runtime: host agent plugins, bridge them to MCP servers, show humans what they do, over HAIP.

This is the plugin author's surface. Their test harness is ``haip_runtime.testing``; the Python
client is ``haip_runtime.client``; the operator's config is ``haip_runtime.config``.
"""

__version__ = "0.1.0"

from haip_runtime.agents.api import Agent, AgentContext, AudioClip, MessageStream, NoOptions, Turn, TurnServices
from haip_runtime.exceptions import HaipError, LlmError, PluginError, ToolError, ToolTimeoutError, ToolUnavailableError
from haip_runtime.llm.provider import Delta, HistoryEntry, Provider, Reply, ToolCall, ToolSpec, Usage
from haip_runtime.protocol.events import LlmErrorCode
from haip_runtime.tools.proxy import ToolCallResult, ToolView

__all__ = [
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
]
