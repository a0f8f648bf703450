"""Nodes of a cluster as an operator runs them: ``haip-runtime serve --config config/multi-node.toml``
processes on one Redis and one PostgreSQL, with JWTs from a JWKS endpoint (the example's auth).

``with deployment(2, redis_url, postgres_url) as cluster:`` starts the nodes (each on a free
127.0.0.1 port, its JSON log in a file) and waits until each prints its banner; ``cluster.token(user)``
signs a token every node accepts; ``node.kill()`` ends one as a crash would, ``node.terminate()`` as
an orchestrator stopping it does (SIGTERM). The block's end stops what is left.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.jwks_server import jwk_of, serve_jwks
from tests.support.ports import free_port
from tests.support.serving import ROOT

EXAMPLE = ROOT / "config" / "multi-node.toml"
ISSUER = "https://id.example.com/"
AUDIENCE = "haip"
#: Seconds a node may take to print its banner (imports, PostgreSQL migration, Redis) on a busy machine.
START_DEADLINE = 60.0
#: The banner's last line: the node listens and is ready.
READY_LABEL = "history:"


@dataclass
class Node:
    """One ``serve`` process: its port, banner lines and log file."""

    process: subprocess.Popen[str]
    port: int
    log: Path
    env: dict[str, str]
    banner: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/haip/websocket"

    def kill(self) -> None:
        """SIGKILL: nothing flushed, no goodbye to Redis or the clients (their kernel resets the sockets)."""
        self.process.kill()
        self.process.wait(timeout=15)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as systemd or Kubernetes stop a node; waits for it to exit and returns its code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, SIGKILL if it lingers: the process running now (started again, perhaps)."""
        _stop(self.process)

    def start_again(self) -> None:
        """A new process on the same port and config (a deploy's next version), once it says it is ready."""
        assert self.process.poll() is not None, "stop it first"
        _stop(self.process)  # (its pipe closed)
        self.process = _start(self.env, self.log)
        self.banner = _banner(self)


@dataclass
class Deployment:
    nodes: list[Node]
    key: rsa.RSAPrivateKey
    folder: Path

    def token(self, user: str, **claims: Any) -> str:
        """A token as the identity provider would sign it: RS256, its ``kid`` in the JWKS, issuer, audience."""
        now = int(time.time())
        body = {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600, **claims}
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "deploy-1"})


def example_env(redis_url: str, postgres_url: str, jwks_url: str, port: int) -> dict[str, str]:
    """What the example config reads from the environment, for a node on 127.0.0.1:``port``."""
    return {
        "HAIP_HOST": "127.0.0.1",
        "HAIP_PORT": str(port),
        "HAIP_REDIS_URL": redis_url,
        "HAIP_DATABASE_URL": postgres_url,
        "HAIP_JWKS_URL": jwks_url,
    }


@contextmanager
def deployment(count: int, redis_url: str | Sequence[str], postgres_url: str) -> Iterator[Deployment]:
    """``count`` nodes of ``config/multi-node.toml`` on ``redis_url`` and ``postgres_url``, until the block
    ends. ``redis_url`` may be a list (one URL per node: one of them through a ``netcut`` proxy)."""
    urls = [redis_url] * count if isinstance(redis_url, str) else list(redis_url)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with serve_jwks() as jwks, tempfile.TemporaryDirectory(prefix="haip-nodes-") as directory, ExitStack() as stack:
        jwks.keys = [jwk_of(key, "deploy-1")]
        folder = Path(directory)
        nodes = []
        for index in range(count):  # all started before any is waited for: they start side by side
            port = free_port()
            env = {**os.environ, **example_env(urls[index], postgres_url, jwks.url, port)}
            log = folder / f"node{index + 1}.log"
            node = Node(_start(env, log), port, log, env)
            stack.callback(node.stop)
            nodes.append(node)
        for node in nodes:
            node.banner = _banner(node)
        yield Deployment(nodes, key, folder)


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(EXAMPLE)]
    with open(log, "w") as stderr:  # the node's JSON log; the child keeps its own descriptor
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env)


def _banner(node: Node) -> list[str]:
    """The node's banner lines, read until the one saying it is ready, within ``START_DEADLINE``.

    A thread reads stdout (to its end, so the pipe never fills) and hands each line over a queue:
    a read with a deadline, where ``select`` would miss lines already in the text buffer."""
    stdout = node.process.stdout
    assert stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(stdout, lines), daemon=True).start()
    banner: list[str] = []
    deadline = time.monotonic() + START_DEADLINE
    while not (banner and banner[-1].strip().startswith(READY_LABEL)):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError(f"node on port {node.port} did not start:\n{node.log.read_text()[-4000:]}")
        banner.append(line.rstrip("\n"))
    return banner


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed by _stop
        for line in stream:
            lines.put(line)
    lines.put(None)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    if process.stdout is not None:
        process.stdout.close()
