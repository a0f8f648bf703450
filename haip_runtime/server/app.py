"""The runtime and its ASGI app: config in, routes out.

``Runtime`` owns the long-lived parts (store, hub, authenticator, tool proxy, LLM providers) for
the lifetime of an ``async with``; ``create_app`` wraps it in a Starlette app whose lifespan enters
it. Routes: ``/haip/websocket`` and ``/`` (WebSocket), ``/haip/sse`` (SSE), ``/haip/stream`` (HTTP
streaming), ``/ag-ui/{agent}`` (AG-UI), ``/health``, ``/metrics`` (Prometheus, unless ``observability.metrics`` is off),
``/haip/transactions`` (REST history), and the browser playground at ``/`` (``haip_runtime.server.playground``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from haip_runtime import __version__
from haip_runtime.agents.registry import load_agents
from haip_runtime.auth.tokens import Authenticator
from haip_runtime.config.models import AuthConfig, HaipConfig, StorageConfig
from haip_runtime.exceptions import ConfigError
from haip_runtime.hub.router import Hub
from haip_runtime.llm import create_providers
from haip_runtime.llm.metered import metered
from haip_runtime.observability import tracing
from haip_runtime.observability.metrics import Metrics
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import CloseCode, ServerState
from haip_runtime.server import allocator, playground
from haip_runtime.server.agui import AguiDoor
from haip_runtime.server.doors import Doorway, haip_routes
from haip_runtime.server.failsafe import JsonFailsafe
from haip_runtime.server.fleet import Fleet
from haip_runtime.server.gauges import RuntimeGauges
from haip_runtime.server.mcp_door import McpEndpoint
from haip_runtime.server.mcp_relay import McpRelay
from haip_runtime.server.mcp_tasks import AgentTasks
from haip_runtime.server.rest import history_routes
from haip_runtime.server.sockets import ReapOnEnd, SocketReaper
from haip_runtime.server.storage import storage_metrics, storage_status, tell_members
from haip_runtime.server.worker_metrics import WorkerMetrics
from haip_runtime.session.connection import Connection, Gateway, serve_detached
from haip_runtime.session.timers import Timers
from haip_runtime.session.window import Outbox
from haip_runtime.store import open_store
from haip_runtime.store.base import StorageState
from haip_runtime.tools.proxy import ToolProxy
from haip_runtime.tools.readiness import Readiness
from haip_runtime.transports.base import FrameSource, Inbound, Transport
from haip_runtime.transports.origin import normal_origin

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from haip_runtime.bridge import McpBridge, ServerStatus
    from haip_runtime.server.roaming import Roaming


logger = logging.getLogger(__name__)


#: Why the connections close when the server stops (1012: resume).
STOPPING = "the server is restarting: resume"


class Runtime:
    """Everything one haip-runtime process runs, started and stopped as one unit."""

    def __init__(self, config: HaipConfig, *, worker: tuple[str, str] | None = None) -> None:
        self.config = config
        #: One of ``serve --workers N``: its ``/metrics`` answers for every worker (``worker_metrics``).
        self.worker = worker
        self.worker_metrics: WorkerMetrics | None = None
        self.authenticator = Authenticator(config.auth, config.roles, dev_key=dev_key(config.storage, config.auth))
        self.metrics = Metrics()
        self.metrics.auth_refusals = self.authenticator.refusals
        self.llms = {name: metered(name, llm, self.metrics) for name, llm in create_providers(config.llm).items()}
        self.agents = load_agents(config, self.llms)
        servers, frame = config.mcp.servers, config.server.max_frame_bytes
        self.tools = ToolProxy(servers, max_frame_bytes=frame) if servers else None
        prefix = config.cluster.numbering if config.cluster is not None else None
        self.store = open_store(config.storage, clustered=config.cluster is not None, cluster_prefix=prefix)
        #: Turns wait for MCP servers still making their first connection (their tools are offered then).
        self.readiness = Readiness(config.mcp.servers)
        self.hub = Hub(config, self.agents, self.tools, self.store, metrics=self.metrics, readiness=self.readiness)
        self.hub.on_freed = allocator.release
        self.store.on_storage = tell_members(self.hub.transactions)
        self.store.on_sequenced = self.hub.transactions.sequenced
        gauges = RuntimeGauges(self.metrics, self.hub.sessions, self.hub.transactions, self.server_health)
        #: This process as a node of a cluster (``[cluster]``): per-user limits counted over every node.
        self.fleet = Fleet(config.cluster, self.hub.sessions, list(self.agents)) if config.cluster is not None else None
        #: Sessions that outlive this node: mirrored to Redis, resumed from any node (``[cluster]``).
        self.roaming: Roaming | None = None
        if self.fleet is not None:
            from haip_runtime.server.roaming import Roaming  # it needs redis: only a cluster imports it

            self.roaming = Roaming(config, self.fleet, self.hub, self.metrics)
        gauges.extra = self._extra_metrics
        self.metrics.watch(gauges)
        self.timers = Timers()
        self.gateway = Gateway(
            config,
            self.hub.sessions,
            self.authenticator.authenticate,
            self.hub.handle,
            self.timers,
            self.metrics,
            self.hub.spawn,
        )
        if self.tools is not None:
            self.tools.on_done = self.metrics.tool_call
        self.reaper = SocketReaper()  # the server that serves the app attaches itself (serve, live_server)
        #: The connections' outboxes (``close_connections`` ends them all), and whether the server is stopping.
        self._outboxes: set[Outbox] = set()
        self._closing = False
        #: Called with why when the server begins to stop: doors whose responses are not outboxes end them.
        self.on_closing: list[Callable[[str], None]] = []
        self._stack = AsyncExitStack()
        self.bridge: McpBridge | None = None
        self._server_states: dict[str, ServerState] = {}
        self._shown: dict[str, tuple[bool, object, str | None]] = {}
        self._notices: MemoryObjectSendStream[tuple[str, str, str | None, bool]] | None = None
        #: The event loop serving it (``server.event_loop``): known once started.
        self.event_loop = ""

    async def __aenter__(self) -> Self:
        self.event_loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
        if self.config.observability.tracing != "off":
            tracing.configure(self.config.observability)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.store)
            if self.fleet is not None:
                await stack.enter_async_context(self.fleet)
            if self.roaming is not None:  # before the hub: it flushes what the hub's stop sends
                await stack.enter_async_context(self.roaming)
            await stack.enter_async_context(self.hub)
            if self.fleet is not None and self.fleet.bus is not None:
                bus = self.fleet.bus
                self.fleet.relay = self.hub.share(bus)  # conversations shared with the other nodes
                self.hub.spawn(self.fleet.watch)  # members told when Redis stops answering, and when it is back
                if self.worker is not None and self.config.observability.metrics:
                    group, tag = self.worker
                    key = bus.keys.worker_metrics(group)
                    self.worker_metrics = WorkerMetrics(bus.redis, key, tag, self.metrics.render)
                    self.hub.spawn(self.worker_metrics.run)
            self._stack = stack.pop_all()
        self.hub.spawn(self.timers.run)
        self.hub.spawn(self.reaper.patrol, self.config.server.header_timeout_seconds)
        if self.tools is not None:
            self._notices, pending = anyio.create_memory_object_stream[tuple[str, str, str | None, bool]](math.inf)
            self.hub.spawn(self._run_bridge)
            self.hub.spawn(self._notify_members, pending)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._notices is not None:
            self._notices.close()
        try:
            return await self._stack.__aexit__(*exc_info)
        finally:
            with anyio.CancelScope(shield=True):
                for llm in self.llms.values():
                    await llm.aclose()
            if self.config.observability.tracing != "off":
                await anyio.to_thread.run_sync(tracing.shutdown)  # exports what is pending

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
            on_task_end=self.metrics.task_ended,
        )
        async with bridge:
            self.bridge = bridge
            assert self.tools is not None
            self.tools.attach(bridge)
            self.readiness.attach(bridge.status)
            await anyio.sleep_forever()

    def _server_changed(self, status: ServerStatus) -> None:
        self.readiness.changed()
        connected = status.state is ServerState.CONNECTED
        if connected and self._server_states.get(status.name) is not ServerState.CONNECTED:
            logger.info("MCP server %r connected with %d tool(s)", status.name, len(status.tools))
        self._server_states[status.name] = status.state
        self.metrics.server_state(status.name, status.state)
        shown = (connected, status.tools, status.error)
        before = self._shown.get(status.name)
        if before == shown:
            return  # another retry of a failing server: nothing a member sees has changed
        self._shown[status.name] = shown
        tools_changed = connected and before is not None and before[0]  # connected all along: its tools changed
        if self._notices is not None:
            with contextlib.suppress(anyio.ClosedResourceError):
                self._notices.send_nowait((status.name, status.state.value, status.error, tools_changed))

    async def _notify_members(self, pending: MemoryObjectReceiveStream[tuple[str, str, str | None, bool]]) -> None:
        """Tell transactions about server changes in order, off the supervisor's call stack."""
        async with pending:
            async for name, state, error, tools_changed in pending:
                await self.hub.server_changed(name, state, error, tools_changed=tools_changed)

    async def serve(self, transport: Transport) -> None:
        """Serve one connection over ``transport`` until either side ends it."""
        outbox = Outbox(self.config.session.max_buffered_messages)
        if self._closing:
            outbox.close(CloseCode.SERVICE_RESTART, STOPPING)
        self._outboxes.add(outbox)
        try:
            connection = Connection(self.gateway, transport.link, outbox)
            async with transport.streams(outbox) as inbound:
                await connection.serve(inbound)
        finally:
            self._outboxes.discard(outbox)

    def close_connections(self) -> None:
        """The server begins to stop: every connection ends after what it was sent, with 1012 (a WebSocket's
        close; an SSE or HTTP stream's last event), so its client resumes; an open AG-UI run ends with
        ``RUN_ERROR`` (``on_closing``). uvicorn closes WebSockets itself but waits for HTTP responses: an
        open SSE stream held the stop for its 5 s and was cancelled with a traceback, and its client got no
        ``event: close`` (a front-end developer's find; AG-UI's, a reviewer's)."""
        self._closing = True
        for outbox in list(self._outboxes):
            outbox.close(CloseCode.SERVICE_RESTART, STOPPING)
        for close in self.on_closing:
            close(STOPPING)

    def doorway(self) -> Doorway:
        """What the transport routes may use of the runtime."""

        def outbox_of(session_id: str) -> FrameSource | None:
            session = self.hub.sessions.get(session_id)
            return session.outbox if session is not None else None

        async def detached(session_id: str, user: str, items: list[Inbound]) -> bool:
            return await serve_detached(self.gateway, session_id, user, items)

        roaming = self.roaming
        if roaming is None:
            return Doorway(self.config, self.authenticator.authenticate, self.serve, outbox_of, detached)

        def on_forwarded(post: Callable[[str, str, list[Inbound]], Awaitable[bool]]) -> None:
            roaming.local_post = post

        return Doorway(
            self.config,
            self.authenticator.authenticate,
            self.serve,
            outbox_of,
            detached,
            roaming.forward,
            on_forwarded,
            roaming.stream_opened,
        )

    def _extra_metrics(self) -> Iterable[Metric]:
        """The store's gauges, and the cluster's when there is one."""
        yield from storage_metrics(self.store)
        if self.fleet is not None:
            yield from self.fleet.metrics()

    def server_health(self) -> dict[str, tuple[str, int, str | None]]:
        """(state, tool count, error) of every configured MCP server; ``starting`` until the bridge is up."""
        statuses = self.bridge.status() if self.bridge else {}
        starting: tuple[str, int, str | None] = (ServerState.STARTING, 0, None)
        health = dict.fromkeys(self.config.mcp.servers, starting)
        for name, status in statuses.items():
            health[name] = (status.state.value, len(status.tools), status.error)
        return health

    def serving(self) -> tuple[bool, dict[str, Any]]:
        """``/health/ready``: whether a balancer should send this node new connections. Only a node cut
        from the cluster's Redis is not (its members would hear nothing of the others); what every node
        shares (PostgreSQL, an MCP server) does not count: taking every node out would leave no service."""
        cluster = self.fleet.status() if self.fleet is not None else None
        if cluster is not None and cluster["state"] != "ok":
            why = f"{cluster['state']}: {cluster['error']}" if cluster.get("error") else cluster["state"]
            return False, {"ready": False, "cluster": why}
        if cluster is not None and not cluster.get("subscribed"):  # commands answer, deliveries do not come
            return False, {"ready": False, "cluster": "reconnecting: the node's subscription to Redis is down"}
        return True, {"ready": True}

    def health(self) -> dict[str, Any]:
        """``status`` is ``degraded`` (still HTTP 200) while a configured MCP server is not connected,
        the store cannot write, the cluster's bus is down or the JWKS's last fetch failed; ``degraded``
        then says why, per server (and ``storage``, ``cluster``, ``auth``)."""
        hub = self.hub
        servers = self.server_health()
        down = {
            name: f"{state}: {error}" if error else state
            for name, (state, _tools, error) in servers.items()
            if state != ServerState.CONNECTED
        }
        if self.store.health.state is not StorageState.OK:
            down["storage"] = f"{self.store.health.state}: {self.store.health.error}"
        cluster = self.fleet.status() if self.fleet is not None else None
        if cluster is not None and cluster["state"] != "ok":
            down["cluster"] = f"{cluster['state']}: {cluster.get('error')}"
        if (keys := self.authenticator.keys_failure) is not None:
            down["auth"] = f"cannot fetch auth.jwks_url: {keys}"
        return {
            "status": "degraded" if down else "ok",
            **({"degraded": down} if down else {}),
            "uptime": int((time.monotonic() - hub.started_at) * 1000),
            "activeConnections": hub.sessions.active_connections,
            "totalConnections": hub.sessions.total_connections,
            "version": __version__,
            "eventLoop": self.event_loop,
            "sessions": len(hub.sessions),
            "transactions": sum(1 for t in hub.transactions.live.values() if not t.ended),
            "storage": storage_status(self.config.storage.backend, self.store),
            **({"cluster": cluster} if cluster is not None else {}),
            "mcp": {
                name: {"state": state, "tools": tools, "error": error}
                for name, (state, tools, error) in servers.items()
            },
        }


def create_app(config: HaipConfig, runtime: Runtime | None = None) -> Starlette:
    """The ASGI app. Pass ``runtime`` to share it with the caller (the CLI prints its dev token)."""
    rt = runtime or Runtime(config)

    mcp = None
    if config.mcp_server.enabled:
        mcp = McpEndpoint(
            config,
            rt.hub.context,
            rt.authenticator.authenticate,
            rt.hub.sessions.quotas.check_message,
            tasks=lambda door: AgentTasks(
                door.run,
                door.reserve,
                ttl_seconds=config.mcp_server.task_ttl_seconds,
                per_user=config.mcp_server.max_tasks_per_user,
                on_end=rt.metrics.served_task_ended,
            ),
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with rt, mcp.lifespan() if mcp is not None else nullcontext(), mcp_sessions_shared(rt, mcp):
            yield {"runtime": rt}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(rt.health())

    async def ready(request: Request) -> JSONResponse:
        serving, body = rt.serving()
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        shared = rt.worker_metrics
        body = await shared.render() if shared is not None else rt.metrics.render()
        return Response(body, media_type=rt.metrics.content_type)

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse("haip-runtime: connect a HAIP client over WebSocket to /haip/websocket\n")

    agui = AguiDoor(rt.doorway(), rt.hub)
    rt.on_closing.append(agui.close_runs)
    routes: list[BaseRoute] = [
        Route("/health", health),
        Route("/health/ready", ready),
        *([Route("/metrics", metrics)] if config.observability.metrics else []),
        *haip_routes(rt.doorway()),
        *agui.routes(),
        *history_routes(rt.store, rt.hub.transactions, rt.authenticator.authenticate, config.server.allowed_origins),
        *([Route(config.mcp_server.path, mcp)] if mcp is not None else []),
    ]
    routes += playground.routes() if config.server.serves_playground else [Route("/", index)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.add_middleware(JsonFailsafe)  # within Starlette's own: it never sees an exception
    if config.server.allowed_origins:
        app.add_middleware(CORSMiddleware, **cors(config.server.allowed_origins))
    app.add_middleware(ReapOnEnd, reaper=rt.reaper)  # outermost: sees every connection end
    return app


def cors(allowed: list[str]) -> dict[str, Any]:
    """What a page of an origin in ``server.allowed_origins`` (``*``: any) needs to use the HTTP doors from
    the browser (found by a front-end tester: a page on a Vite dev server could open the WebSocket and
    nothing else): preflights answered, and its responses readable. The origins get the CORS headers;
    the doors' own Origin check (``transports/origin.py``) still refuses the others. Credentials are a
    bearer token or ``?token=``, never cookies, so no ``Allow-Credentials``."""
    origins = ["*"] if "*" in allowed else [normal_origin(origin) for origin in allowed]
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST", "DELETE"],
        "allow_headers": ["*"],  # Authorization, Content-Type, Last-Event-ID, traceparent, MCP's own...
        "expose_headers": ["Mcp-Session-Id", "Mcp-Protocol-Version"],  # what a browser MCP client reads
        "max_age": 600,
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take) in the body every HTTP
    error of the runtime has, ``{"error": {code, message}}``, not as plain text."""
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_MESSAGE")
    body = {"error": error_body(code, f"{request.method} {request.url.path}: {exc.detail}")}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@asynccontextmanager
async def mcp_sessions_shared(rt: Runtime, mcp: McpEndpoint | None) -> AsyncIterator[None]:
    """In a cluster, the `/mcp` door's sessions are served from any node (``mcp_relay.py``). Its notices
    are heard for as long as the node follows the bus: those that come while it stops are sent back."""
    if mcp is None or rt.roaming is None:
        yield
        return
    roaming = rt.roaming
    relay = McpRelay(roaming.bus, mcp, roaming.spawn)
    mcp.relay, roaming.on_mcp = relay, relay.notice
    async with relay.serving():
        yield


def dev_key(storage: StorageConfig, auth: AuthConfig | None = None) -> str | None:
    """The dev-mode signing key kept in a file (made on first use) beside a durable store's path, so
    that a restart does not invalidate tokens already handed out, and processes of one machine on one
    PostgreSQL database accept each other's; ``None`` (a key per process) with the memory store, and
    with ``auth`` not in dev mode (no file made: an operator's find, in jwt mode with PostgreSQL)."""
    if storage.backend == "memory" or (auth is not None and auth.mode != "dev"):
        return None
    path = Path(f"{storage.path}.dev-key")
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"storage.path: cannot read the dev key {str(path)!r}: {exc.strerror or exc}") from exc
    key = secrets.token_urlsafe(48)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(key + "\n")
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError(f"storage.path: cannot write the dev key {str(path)!r}: {exc.strerror or exc}") from exc
    return key
