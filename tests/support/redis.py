"""A real redis-server (Debian's) for the cluster tests: on a free 127.0.0.1 port, in a temp folder.

``running_redis()`` starts one and stops it at the end; ``RedisServer.restart()`` stops it and starts
it again on the same port (to test reconnects); ``kill()`` ends it at once, as a crash would. Readiness
is the server's own "Ready to accept connections" line, then a PING: no sleeps. With
``HAIP_TEST_REDIS_URL`` set, the session's shared server is that one instead (``shared_redis_url``).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.support.ports import free_port

READY_LINE = b"Ready to accept connections"
START_TIMEOUT = 10.0


def ping(port: int, timeout: float = 5.0) -> None:
    """One PING over a raw socket; ``AssertionError`` unless the answer is ``+PONG``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(b"PING\r\n")
        answer = connection.recv(64)
    assert answer == b"+PONG\r\n", answer


class RedisServer:
    """One redis-server process at a time, always on ``port`` and in ``directory``."""

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = False):
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self._drainer: threading.Thread | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is missing: run scripts/setup as root (it installs Debian's redis-server)"
        args = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        self.starts += 1
        self._wait_ready(self.process)
        ping(self.port)

    def stop(self) -> None:
        """End the server (SIGTERM; SIGKILL if it lingers) and wait for it."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """End the server as a crash would: nothing flushed, connections cut."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(how)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if self._drainer is not None:
            self._drainer.join(timeout=10)  # the log's end: the drainer closes the pipe

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Read the server's log (unbuffered: select sees what is unread) until it says it is ready; drain the rest."""
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        seen = b""
        while READY_LINE not in seen:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
            line = process.stdout.readline() if readable else b""
            if not line:
                process.kill()
                process.wait(timeout=10)
                process.stdout.close()
                log = seen.decode(errors="replace")
                raise AssertionError(f"redis-server on port {self.port} did not start:\n{log}")
            seen += line
        self._drainer = threading.Thread(target=_drain, args=(process.stdout,), daemon=True)
        self._drainer.start()


def _drain(stream: IO[bytes]) -> None:
    with stream:
        for _ in stream:
            pass


@contextmanager
def running_redis(*, appendonly: bool = False) -> Iterator[RedisServer]:
    """A redis-server of its own in a temp folder, stopped (and the folder removed) at the end."""
    with tempfile.TemporaryDirectory(prefix="haip-redis-") as directory:
        server = RedisServer(Path(directory), appendonly=appendonly)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def shared_redis_url() -> Iterator[str]:
    """The URL of the test session's Redis: ``HAIP_TEST_REDIS_URL`` if set, else one started here."""
    external = os.environ.get("HAIP_TEST_REDIS_URL")
    if external:
        yield external
        return
    with running_redis() as server:
        yield server.url
