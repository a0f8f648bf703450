"""`@modelcontextprotocol/server-everything` from npm (installed by scripts/setup with `npm ci`), run over stdio.

Its `simulate-research-query` tool requires MCP tasks: four one-second stages ("Gathering sources...",
"Analyzing content...", "Synthesizing findings...", "Generating report..."), and with `ambiguous`
an elicitation at the third stage (task status `input_required`).
"""

from __future__ import annotations

import shutil
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
