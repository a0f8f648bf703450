"""The MCP Inspector's command-line mode (`@modelcontextprotocol/inspector --cli`, installed by scripts/setup
with `npm ci`): an MCP client no one here wrote, on the TypeScript SDK 2.x."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.everything import NPM

INSPECTOR = NPM / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


def inspect(url: str, token: str, home: Path, *args: str) -> dict[str, Any]:
    """Run one Inspector CLI method against the streamable HTTP server at ``url``; its JSON answer."""
    node = shutil.which("node")
    assert node is not None and INSPECTOR.is_file(), f"{INSPECTOR} is missing: run scripts/setup (npm ci in {NPM})"
    command = [node, str(INSPECTOR), "--cli", url, "--transport", "http", "--header", f"Authorization: Bearer {token}"]
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HOME": str(home)},  # it keeps a catalog of servers in ~/.mcp-inspector
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
