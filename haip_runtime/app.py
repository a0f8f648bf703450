"""The runtime and its ASGI app: config in, routes out.

``Runtime`` owns the long-lived parts (hub, authenticator, tool proxy) for the lifetime of an
``async with``; ``create_app`` wraps it in a Starlette app whose lifespan enters it. Routes:
``/haip/websocket`` and ``/`` (WebSocket), ``/health``, and the browser playground at ``/``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from haip_runtime import __version__, playground
from haip_runtime.agents.registry import load_agents
from haip_runtime.auth import Authenticator
from haip_runtime.config import HaipConfig
from haip_runtime.connection import Connection
from haip_runtime.hub import Hub
from haip_runtime.session import Outbox
from haip_runtime.tools import ToolProxy
from haip_runtime.transports.websocket import websocket_credentials, websocket_streams

if TYPE_CHECKING:
    from haip_runtime.bridge import McpBridge, ServerStatus


logger = logging.getLogger(__name__)


class Runtime:
    """Everything one haip-runtime process runs, started and stopped as one unit."""

    def __init__(self, config: HaipConfig) -> None:
        self.config = config
        self.authenticator = Authenticator(config.auth, config.roles)
        self.agents = load_agents(config)
        self.tools = ToolProxy(config.mcp.servers) if config.mcp.servers else None
        self.hub = Hub(config, self.agents, self.tools)
        self.bridge: McpBridge | None = None
        self._server_states: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        await self.hub.__aenter__()
        if self.tools is not None:
            self.hub.spawn(self._run_bridge)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self.hub.__aexit__(*exc_info)

    async def _run_bridge(self) -> None:
        """Own the MCP bridge for the runtime's lifetime, without delaying the HTTP listener.

        Importing the MCP SDK takes about a second, so it happens in a worker thread; the servers
        then connect in parallel while clients are already being served (their tools appear in
        TOOL_LIST as each server connects).
        """
        module = await anyio.to_thread.run_sync(importlib.import_module, "haip_runtime.bridge")
        mcp = self.config.mcp
        bridge = module.McpBridge(
            mcp.servers,
            mcp.stdio,
            base_dir=self.config.base_dir,
            on_change=self._server_changed,
        )
        async with bridge:
            self.bridge = bridge
            assert self.tools is not None
            self.tools.attach(bridge)
            await anyio.sleep_forever()

    def _server_changed(self, status: ServerStatus) -> None:
        if status.state.value == "connected" and self._server_states.get(status.name) != "connected":
            logger.info("MCP server %r connected with %d tool(s)", status.name, len(status.tools))
        self._server_states[status.name] = status.state.value
        self.hub.server_changed(status.name, status.state.value, status.error)

    async def serve_websocket(self, ws: WebSocket) -> None:
        outbox = Outbox(self.config.session.max_buffered_messages)
        connection = Connection(self.hub, self.authenticator, websocket_credentials(ws), outbox)
        async with websocket_streams(ws, outbox, max_frame_bytes=self.config.server.max_frame_bytes) as inbound:
            await connection.serve(inbound)

    def health(self) -> dict[str, Any]:
        hub = self.hub
        return {
            "status": "ok",
            "uptime": int((time.monotonic() - hub.started_at) * 1000),
            "activeConnections": hub.active_connections,
            "totalConnections": hub.total_connections,
            "version": __version__,
            "sessions": len(hub.sessions),
            "transactions": sum(1 for t in hub.transactions.values() if not t.ended),
            "mcp": {
                name: {"state": status.state.value, "tools": len(status.tools), "error": status.error}
                for name, status in (self.bridge.status() if self.bridge else {}).items()
            },
        }


def create_app(config: HaipConfig, runtime: Runtime | None = None) -> Starlette:
    """The ASGI app. Pass ``runtime`` to share it with the caller (the CLI prints its dev token)."""
    rt = runtime or Runtime(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with rt:
            yield {"runtime": rt}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(rt.health())

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse("haip-runtime: connect a HAIP client over WebSocket to /haip/websocket\n")

    routes: list[BaseRoute] = [
        Route("/health", health),
        WebSocketRoute("/haip/websocket", rt.serve_websocket),
        WebSocketRoute("/", rt.serve_websocket),
    ]
    routes += playground.routes() if config.server.serves_playground else [Route("/", index)]
    return Starlette(routes=routes, lifespan=lifespan)
