"""Opening an MCP server's transport, noticing when it ends, and saying why a connection failed.

stdio children get only the `[mcp.stdio] inherit_env` variables that are set, plus the server's
own `env` (the SDK adds HOME, LOGNAME, PATH, SHELL, TERM and USER itself). HTTP servers get an
httpx2 client carrying the configured headers. Session logic lives in `supervisor.py`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, Self, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
import mcp_types as types
from mcp import MCPError, StdioServerParameters
from mcp.client import Transport
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from haip_runtime.config.models import McpServerConfig, McpStdioConfig
from haip_runtime.exceptions import PluginError

logger = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The MCP SDK's own defaults: reads wait long because a server may hold a response stream open."""


async def open_transport(
    config: McpServerConfig, stdio: McpStdioConfig, stack: AsyncExitStack, *, base_dir: Path, stderr: TextIO | None
) -> Transport:
    """The (not yet entered) transport for `config`; resources it needs are entered on `stack`."""
    if config.transport == "stdio":
        assert config.command is not None, "validated by McpServerConfig"
        if stdio.allowed_commands is not None and config.command not in stdio.allowed_commands:
            raise PermissionError(f"command {config.command!r} is not in mcp.stdio.allowed_commands")
        inherited = {name: os.environ[name] for name in stdio.inherit_env if name in os.environ}
        params = StdioServerParameters(
            command=config.command, args=config.args, env=inherited | config.env, cwd=config.cwd or base_dir
        )
        return stdio_client(params, errlog=stderr or sys.stderr)
    assert config.url is not None, "validated by McpServerConfig"
    headers = {key: value.get_secret_value() for key, value in config.headers.items()}
    http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=HTTP_TIMEOUT))
    return streamable_http_client(config.url, http_client=http)


@asynccontextmanager
async def watching_end(transport: Transport, on_end: Callable[[], None]) -> AsyncIterator[tuple[Any, Any]]:
    """`transport`, with `on_end` called when it ends its read stream (process exit, HTTP teardown)."""
    async with transport as (read_stream, write_stream):
        yield _EndWatchingStream(read_stream, on_end), write_stream


_T_co = TypeVar("_T_co", covariant=True)


class _Receiver(Protocol[_T_co]):
    async def receive(self) -> _T_co: ...
    async def aclose(self) -> None: ...


class _EndWatchingStream:
    def __init__(self, inner: _Receiver[Any], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> contextvars.Context | None:
        # The SDK runs a server request's handler in the context the transport captured with it.
        context: contextvars.Context | None = getattr(self._inner, "last_context", None)
        return context

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def describe_failure(config: McpServerConfig, exc: BaseException, *, connect_timeout: float) -> str:
    """One line for why a connection failed; unexpected failures are logged with their traceback."""
    leaf = _first_leaf(exc)
    if isinstance(leaf, PluginError):
        return str(leaf)
    if config.transport == "stdio":
        return _describe(config, leaf, repr(config.command), connect_timeout)
    if config.transport == "python":
        return _describe(config, leaf, repr(config.server), connect_timeout)
    where = shown_url(str(config.url))
    return _describe(config, leaf, where, connect_timeout).replace(str(config.url), where)


def shown_url(url: str) -> str:
    """``url`` as members and logs may see it: without credentials or query (they can hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _describe(config: McpServerConfig, leaf: BaseException, where: str, connect_timeout: float) -> str:
    if isinstance(leaf, FileNotFoundError):
        cwd = getattr(config, "cwd", None)
        if cwd is not None and not Path(cwd).is_dir():  # (the process's folder, not its command, is missing)
            return f"cannot start {where}: its cwd {str(cwd)!r} is not a folder"
        return f"cannot start {where}: command not found"
    if isinstance(leaf, httpx2.ConnectError):
        return f"cannot connect to {where}: {leaf}"
    if isinstance(leaf, httpx2.HTTPError):
        return f"HTTP error from {where}: {leaf}"
    if isinstance(leaf, TimeoutError):  # before OSError: TimeoutError is one
        return f"{where} did not complete the MCP handshake within {connect_timeout:g} s"
    if isinstance(leaf, OSError):
        return f"cannot start {where}: {leaf.strerror or leaf!r}"
    if isinstance(leaf, MCPError) and leaf.code == types.CONNECTION_CLOSED:
        return f"{where} closed the connection" + (" (see its stderr)" if config.transport == "stdio" else "")
    if isinstance(leaf, MCPError):
        return f"{where} answered with MCP error {leaf.code}: {leaf.message}"
    logger.error("MCP server %s failed unexpectedly", where, exc_info=leaf)
    return f"{where} failed: {type(leaf).__name__}: {leaf}"


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
