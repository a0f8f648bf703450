"""A real uvicorn serving the runtime on 127.0.0.1 (an ephemeral port), in a thread of its own."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from haip_runtime.config import HaipConfig, validate_config
from haip_runtime.server.app import Runtime, create_app
from haip_runtime.server.node import websocket_options

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveServer:
    runtime: Runtime
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/haip/websocket"

    @property
    def bare_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str = "alice", **claims: Any) -> str:
        return self.runtime.authenticator.issue(user, **claims)


def make_config(data: dict[str, Any] | None = None) -> HaipConfig:
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "agents": {
            "echo": {"plugin": "echo"},
            "storyteller": {
                "plugin": "haip_runtime.demo.storyteller:Storyteller",
                "options": {"words_per_second": 2000},
            },
        },
    }
    for key, value in (data or {}).items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(base, base_dir=ROOT)


class ReadyServer(uvicorn.Server):
    """A uvicorn server that sets ``ready`` once it listens (for servers run in a thread by tests)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def running(
    config: uvicorn.Config, what: str, port: int = 0, before: Callable[[ReadyServer], None] | None = None
) -> Iterator[int]:
    """A uvicorn server for ``config`` in a thread, on 127.0.0.1 (``port`` 0: a free one), until the
    block ends; yields the port. ``before`` sees the server before it starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    ready = threading.Event()
    server = ReadyServer(config, ready)
    if before is not None:
        before(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout=15):
            raise RuntimeError(f"{what} did not start within 15 s")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextmanager
def served(app: ASGIApp, what: str) -> Iterator[str]:
    """A stand-in service (an ASGI ``app``) on a free 127.0.0.1 port until the block ends; yields its base URL."""
    with running(uvicorn.Config(app, log_config=None, lifespan="off"), what) as port:
        yield f"http://127.0.0.1:{port}"


@contextmanager
def live_server(config: HaipConfig, port: int = 0) -> Iterator[LiveServer]:
    """Serve ``config`` on 127.0.0.1 (``port`` 0: a free one) until the block ends."""
    runtime = Runtime(config)
    uv_config = uvicorn.Config(
        create_app(config, runtime),
        log_config=None,
        **{**websocket_options(config), "ws_per_message_deflate": False},
    )
    with running(uv_config, "uvicorn", port, runtime.reaper.attach) as bound:
        yield LiveServer(runtime, bound)


@dataclass
class ServeProcess:
    """``haip-runtime serve`` in a subprocess: its banner lines, and the lines keyed by label."""

    process: subprocess.Popen[str]
    lines: list[str]
    banner: dict[str, str]


@contextmanager
def serve_process(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """Run ``command`` (a ``serve`` in dev mode) in ``cwd`` until its banner's ``try:`` line, then
    yield it; interrupt it (as Ctrl-C does) when the block ends."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []
    banner: dict[str, str] = {}
    try:
        for line in process.stdout:  # bounded: the banner is a dozen lines, then the loop breaks
            lines.append(line.rstrip("\n"))
            key, _, value = line.strip().partition(": ")
            banner[key.strip()] = value.strip()
            if key.strip() == "try":
                break
        else:
            raise AssertionError(f"serve ended before its banner: {process.stderr.read()}")
        yield ServeProcess(process, lines, banner)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        finally:
            process.kill() if process.poll() is None else None
            process.stdout.close()
            process.stderr.close()
