"""One runtime process under uvicorn: what ``serve`` runs, alone or as each worker of ``serve --workers N``.

``run`` serves a ``Runtime`` on a listening socket made by ``bind``. A worker is this module run as a
program (``python -m haip_runtime.server.node``, started by ``workers.Supervisor``): it reads its
``WorkerSpec`` from stdin, binds a listening socket of its own on the port the supervisor reserved
(``SO_REUSEPORT``), tells the supervisor on stdout when it serves, and stops gracefully when its stdin
closes, which happens when the supervisor is gone, even killed with SIGKILL: no worker outlives it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import uvicorn

from haip_runtime.config import HaipConfig, secret_values, validate_config
from haip_runtime.exceptions import ConfigError, PluginError
from haip_runtime.observability.logs import configure_logging
from haip_runtime.protocol.codec import READ_OVERSIZE
from haip_runtime.server import allocator
from haip_runtime.server.app import Runtime, create_app

logger = logging.getLogger(__name__)

#: A worker's stdout lines that start with this are for the supervisor (the rest is passed through).
MARK = "\x1ehaip-worker "
#: Seconds a worker whose supervisor is gone has to stop gracefully before it exits regardless.
ORPHAN_GRACE_SECONDS = 15.0
#: The exit code of a worker that could not start (a config or plugin error, a port it cannot bind).
START_FAILED = 3


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker: its config (``server.port`` the reserved port,
    ``cluster.node_id`` its own) and its number, which tags its log lines."""

    config: HaipConfig
    index: int
    #: The node id the workers' own are made from (``base-w1``...): names what they share (their metrics).
    group: str = ""

    def sent(self) -> bytes:
        """The spec as the supervisor writes it to a worker's stdin: plain data (the config as its fields'
        values), which the worker validates with its own code (``received``). A pickled ``HaipConfig``
        held the supervisor's classes: a worker restarted after the code on disk changed (an upgrade
        under a running ``serve --workers``) crash-looped on a config model without a new field (an
        operator's find)."""
        config = self.config.model_dump(exclude_unset=True)  # (what the file left out: the worker's defaults)
        sent = {"config": config, "base_dir": self.config.base_dir, "index": self.index}
        return pickle.dumps({**sent, "group": self.group})

    @classmethod
    def received(cls, pipe: IO[bytes]) -> WorkerSpec:
        """What ``sent`` wrote on ``pipe`` (read to its end, no further: the pipe stays open); ``ConfigError``
        if this code's models refuse the config."""
        spec = pickle.load(pipe)
        config = validate_config(spec["config"], base_dir=spec["base_dir"], source="the supervisor's config")
        return cls(config, int(spec["index"]), str(spec.get("group", "")))


def bind(host: str, port: int, *, share_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port``; ``share_port`` sets ``SO_REUSEPORT``, so that each worker
    listens on a socket of its own on one port and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP;
    # without it every streamed frame after the first waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"server: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if listen:
        sock.listen(2048)
    # Not inheritable (Python's default, kept): uvloop, unlike asyncio, does not close a child's inherited
    # descriptors, and a stdio MCP server holding the port would outlive a killed node on it.
    return sock


def unshared(host: str, port: int) -> tuple[int, socket.socket | None]:
    """``port`` (a free one for 0), checked to be held by nobody, and a lock on it for as long as the
    supervisor lives: ``ConfigError`` if another process listens on it, or another ``serve --workers``
    holds it. Before the port is reserved for workers: with ``SO_REUSEPORT`` a second ``serve --workers``
    of the same user would bind it too, and the two share its connections without a word (an operator's
    find: two deploys served one port, each half of the clients). The probe alone misses one whose
    workers do not listen yet (a reviewer's find); the lock, a Linux abstract socket named after the
    address, goes with its process however it ends. Elsewhere there is the probe only."""
    with bind(host, port, listen=False) as probe:
        address, port = str(probe.getsockname()[0]), int(probe.getsockname()[1])
    if not sys.platform.startswith("linux"):
        return port, None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:  # (named after the address bound, not as written: "localhost" and "127.0.0.1" are one: a reviewer)
        lock.bind(f"\0haip-runtime serve --workers {address}:{port}")
    except OSError as exc:
        lock.close()
        raise ConfigError(
            f"server: cannot listen on {host}:{port}: another haip-runtime serve --workers holds it ({exc.strerror})"
        ) from exc
    return port, lock


def run(
    config: HaipConfig, sock: socket.socket, on_ready: Callable[[Runtime], None], worker: tuple[str, str] | None = None
) -> bool:
    """Serve ``config`` on ``sock`` until a signal stops uvicorn; ``on_ready`` once it serves.
    ``False`` when it never served (uvicorn logged why: the runtime's start-up failed). ``worker``: (its
    ``serve``'s group, its tag ``w<N>``) when it is one of ``serve --workers N``."""
    allocator.tune()
    runtime = Runtime(config, worker=worker)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            runtime.close_connections()  # SSE, HTTP and AG-UI streams end now: uvicorn would wait for them
            await super().shutdown(sockets)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                on_ready(runtime)
                # Off the start-up path, not left to the first handshake (~40 ms of imports).
                threading.Thread(target=runtime.authenticator.warm, name="haip-warm", daemon=True).start()

    uv_config = uvicorn.Config(
        create_app(config, runtime),
        log_config=None,
        loop=config.server.event_loop,
        timeout_graceful_shutdown=5,
        **websocket_options(config),
    )
    allocator.settle()
    server = Server(uv_config)
    runtime.reaper.attach(server)  # sockets of ended connections whose peer stopped reading are aborted
    server.run(sockets=[sock])
    return server.started


def websocket_options(config: HaipConfig) -> dict[str, Any]:
    """uvicorn's WebSocket settings for ``config``."""
    return {
        # Frames over the limit, up to READ_OVERSIZE times it, reach the runtime and get ERROR MESSAGE_TOO_LARGE
        # (the connection stays, the frame keeps its seq); only larger ones are closed 1009 by uvicorn.
        "ws_max_size": config.server.max_frame_bytes * READ_OVERSIZE + 1024,
        "ws_per_message_deflate": config.server.ws_per_message_deflate,
        # WebSocket ping/pong finds dead peers: a healthy client silent in HAIP stays (PROTOCOL.md section 3).
        "ws_ping_interval": config.session.heartbeat_interval_seconds,
        "ws_ping_timeout": config.session.heartbeat_timeout_seconds,
    }


def tell_supervisor(kind: str, **fields: Any) -> None:
    """One line for the supervisor on stdout: ``ready`` (with the node and agents) or ``failed``."""
    sys.stdout.write(f"{MARK}{kind} {json.dumps(fields)}\n")
    sys.stdout.flush()


def watch_supervisor(pipe: IO[bytes]) -> threading.Thread:
    """Stop this worker when ``pipe`` (its stdin, whose other end only the supervisor holds) closes:
    SIGTERM to itself (uvicorn's graceful stop), then exit after ``ORPHAN_GRACE_SECONDS`` regardless."""

    fd = pipe.fileno()

    def watch() -> None:
        # The descriptor, not the buffered reader: a daemon thread blocked in the reader holds its lock,
        # and the interpreter, taking that lock at exit, died with "Fatal Python error" on every stop.
        while os.read(fd, 4096):  # the supervisor writes nothing more: this returns at EOF
            pass
        logger.warning("the supervisor is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = threading.Timer(ORPHAN_GRACE_SECONDS, os._exit, (1,))
        deadline.daemon = True
        deadline.start()

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread


def main() -> int:
    """A worker: the spec from stdin, then ``run`` on a socket of its own until SIGTERM or its supervisor goes."""
    try:
        spec = WorkerSpec.received(sys.stdin.buffer)
    except ConfigError as exc:  # (a supervisor of another version: ``serve`` must be restarted as a whole)
        for problem in exc.problems:
            print(f"haip-runtime: worker: {problem}; restart serve after changing its code", file=sys.stderr)
        tell_supervisor("failed", error=str(exc))
        return START_FAILED
    config, tag = spec.config, f"w{spec.index}"
    configure_logging(config.observability, secrets=secret_values(config), worker=tag)
    # Until uvicorn takes SIGTERM over, and when it raises it again after its graceful stop: exit 0.
    signal.signal(signal.SIGTERM, _stop)
    watch_supervisor(sys.stdin.buffer)

    def ready(runtime: Runtime) -> None:
        node = runtime.fleet.bus.node_id if runtime.fleet is not None and runtime.fleet.bus is not None else None
        tell_supervisor("ready", pid=os.getpid(), node=node, agents=list(runtime.agents))

    try:
        # Listening only once the runtime has started (uvicorn listens on it then): the kernel spreads
        # connections over the listening sockets of the port, and one queued at a worker still reaching
        # Redis waited out its start-up, then was reset if it failed (found by a tester).
        sock = bind(config.server.host, config.server.port, share_port=True, listen=False)
        served = run(config, sock, ready, worker=(spec.group, tag) if spec.group else None)
    except (ConfigError, PluginError) as exc:
        for problem in exc.problems:  # (every one, as check and one process print them)
            print(f"haip-runtime: worker {spec.index}: {problem}", file=sys.stderr, flush=True)
        tell_supervisor("failed", error=str(exc))
        return START_FAILED
    finally:  # exiting already: a SIGTERM now must not cut short what runs at exit (flushes, atexit)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not served:
        tell_supervisor("failed", error="the runtime did not start (its log says why)")
        return START_FAILED
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
