"""haip-runtime: host agent plugins, bridge them to MCP servers, show humans what they do, over HAIP."""

__version__ = "0.1.0"

from haip_runtime.agents.api import Agent, AgentContext, HistoryEntry, MessageStream, NoOptions, Turn
from haip_runtime.config import HaipConfig, load_config
from haip_runtime.exceptions import (
    ClientError,
    ConfigError,
    DecodeError,
    HaipError,
    HandshakeError,
    PluginError,
    ProtocolError,
    ToolError,
    ToolTimeoutError,
    ToolUnavailableError,
)
from haip_runtime.tools import ToolCallResult, ToolView

__all__ = [
    "Agent",
    "AgentContext",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "HaipConfig",
    "HaipError",
    "HandshakeError",
    "HistoryEntry",
    "MessageStream",
    "NoOptions",
    "PluginError",
    "ProtocolError",
    "ToolCallResult",
    "ToolError",
    "ToolTimeoutError",
    "ToolUnavailableError",
    "ToolView",
    "Turn",
    "__version__",
    "load_config",
]
