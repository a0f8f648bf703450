"""The bridge to MCP servers: the only code in haip-runtime that imports the MCP SDK.

`McpBridge` keeps one supervised, long-lived MCP client per configured server (stdio, streamable
HTTP, or an `MCPServer` in this process), follows their tool lists, and carries tool calls with
progress, elicitation, timeouts and cancellation. It does not decide who may call what and does
not coalesce progress: the tool proxy does. Modules: `models` (the values handed out), `mcp_bridge`,
`supervisor` (one server's connection), `calls` (one tool call), `tasks` (a call run as an MCP task),
`dialer` (opening stdio / HTTP), `inprocess` (finding a `python` server's `MCPServer`).
"""

from haip_runtime.bridge.mcp_bridge import McpBridge
from haip_runtime.bridge.models import (
    ElicitationAnswer,
    ElicitationRequest,
    OnElicit,
    OnProgress,
    OnTask,
    Progress,
    ServerState,
    ServerStatus,
    TaskState,
    ToolInfo,
    ToolResult,
)

__all__ = [
    "ElicitationAnswer",
    "ElicitationRequest",
    "McpBridge",
    "OnElicit",
    "OnProgress",
    "OnTask",
    "Progress",
    "ServerState",
    "ServerStatus",
    "TaskState",
    "ToolInfo",
    "ToolResult",
]
