"""The demo MCP server (haip_runtime/demo/mcp_server.py) run over streamable HTTP as a real subprocess."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "haip_runtime" / "demo" / "mcp_server.py"


def start_http_demo(port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(DEMO), "--http", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 15)
    assert ready, "the demo HTTP server did not print its address within 15 s"
    assert process.stdout.readline().startswith("listening on ")
    return process


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(timeout=10)
    assert process.stdout is not None
    process.stdout.close()
