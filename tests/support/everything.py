"""`@modelcontextprotocol/server-everything` from npm (installed by scripts/setup with `npm ci`), run over stdio.

Its `simulate-research-query` tool requires MCP tasks: four one-second stages ("Gathering sources...",
"Analyzing content...", "Synthesizing findings...", "Generating report..."), and with `ambiguous`
an elicitation at the third stage (task status `input_required`).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NPM = Path(__file__).resolve().parent / "npm"
EVERYTHING = NPM / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def everything_server(**extra: Any) -> dict[str, Any]:
    """The `[mcp.servers.<name>]` table running server-everything over stdio."""
    node = shutil.which("node")
    assert node is not None, "node is not installed (scripts/setup expects node >= 20 and npm)"
    assert EVERYTHING.is_file(), f"{EVERYTHING} is missing: run scripts/setup (npm ci in {NPM})"
    return {"transport": "stdio", "command": node, "args": [str(EVERYTHING), "stdio"], **extra}


@contextmanager
def everything_over_http() -> Iterator[str]:
    """server-everything serving streamable HTTP on a free 127.0.0.1 port; yields its `/mcp` URL."""
    server = everything_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [server["command"], str(EVERYTHING), "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], 20)
        assert ready, "server-everything did not start within 20 s"
        line = process.stderr.readline()
        assert f"listening on port {port}" in line, line
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.kill()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()
