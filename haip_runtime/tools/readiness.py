"""Waiting for MCP servers still making their first connection, so a turn that starts then is offered their tools.

At start-up the runtime serves clients at once while the MCP SDK is imported and every server connects
in parallel (``server/app.py``). A turn whose agent uses a server that is still ``connecting`` (or whose
bridge does not exist yet) waits for it, at most that server's ``connect_timeout_seconds`` from the
turn's start. A server that failed, or lost a connection it had, is not waited for: it costs its tools,
never the turn. The runtime tells ``Readiness`` when the bridge is up and whenever a server changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import anyio

from haip_runtime.config.models import McpServerConfig
from haip_runtime.protocol.events import ServerState

if TYPE_CHECKING:
    from haip_runtime.bridge import ServerStatus


class Readiness:
    """Which configured MCP servers are still making their first connection, and a way to wait for them."""

    def __init__(self, servers: Mapping[str, McpServerConfig]) -> None:
        self.servers = servers
        self._status: Callable[[], Mapping[str, ServerStatus]] | None = None
        self._changed: anyio.Event | None = None

    def attach(self, status: Callable[[], Mapping[str, ServerStatus]]) -> None:
        """The bridge is up: ``status`` says where each server is."""
        self._status = status
        self.changed()

    def changed(self) -> None:
        """A server's state changed: waiters look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def connecting(self, server: str) -> bool:
        """Whether ``server`` is configured and has not yet connected or failed for the first time."""
        if server not in self.servers:
            return False
        if self._status is None:
            return True  # the bridge is still starting
        status = self._status().get(server)
        return status is None or status.state is ServerState.CONNECTING

    async def wait(self, servers: Iterable[str]) -> None:
        """Until none of ``servers`` is connecting, each given its connect timeout from now at most."""
        start = anyio.current_time()
        for server in servers:
            if not self.connecting(server):
                continue
            with anyio.CancelScope(deadline=start + self.servers[server].connect_timeout_seconds):
                while self.connecting(server):
                    if self._changed is None:
                        self._changed = anyio.Event()
                    await self._changed.wait()
