"""`serve` with a `[cluster]` whose Redis does not answer: one line naming the URL (its password
masked) and exit 1, before it listens; not a failed start-up with a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def test_serve_refuses_an_unreachable_redis_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    with socket.socket() as unused:  # bound, never listening: connecting is refused at once
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        (tmp_path / "haip.toml").write_text(
            f'[server]\nport = 0\n[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n'
            f'[cluster]\nredis_url = "redis://:hunter2@127.0.0.1:{port}/0"\nconnect_timeout_seconds = 1\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "haip_runtime", "serve", "--config", str(tmp_path / "haip.toml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"haip-runtime: cluster.redis_url: cannot reach Redis at redis://:**********@127.0.0.1:{port}/0"
    )
    assert "hunter2" not in done.stderr
