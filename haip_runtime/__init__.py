"""haip-runtime: host agent plugins, bridge them to MCP servers, show humans what they do, over HAIP."""

__version__ = "0.1.0"

from haip_runtime.agents.api import Agent, AgentContext, AudioClip, MessageStream, NoOptions, Turn, TurnServices
from haip_runtime.config.models import HaipConfig, load_config
from haip_runtime.exceptions import (
    ClientError,
    ConfigError,
    DecodeError,
    HaipError,
    HandshakeError,
    LlmError,
    PluginError,
    ProtocolError,
    ToolError,
    ToolTimeoutError,
    ToolUnavailableError,
)
from haip_runtime.llm import Delta, Provider, Reply, ScriptedLLM, ToolCall, ToolSpec, Usage
from haip_runtime.llm.provider import HistoryEntry
from haip_runtime.protocol.events import LlmErrorCode
from haip_runtime.tools.proxy import ToolCallResult, ToolView

__all__ = [
    "Agent",
    "AgentContext",
    "AudioClip",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "Delta",
    "HaipConfig",
    "HaipError",
    "HandshakeError",
    "HistoryEntry",
    "LlmError",
    "LlmErrorCode",
    "MessageStream",
    "NoOptions",
    "PluginError",
    "ProtocolError",
    "Provider",
    "Reply",
    "ScriptedLLM",
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
    "load_config",
]
