"""``haip-runtime serve`` as an operator runs it: a real process, its banner, a real client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import ROOT


@pytest.fixture
def serve_process() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "haip_runtime", "serve", "--config", str(ROOT / "haip.toml"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert process.stdout is not None
    banner: dict[str, str] = {}
    try:
        for line in process.stdout:  # bounded: the banner is six lines, then the loop breaks
            key, _, value = line.strip().partition(": ")
            banner[key.strip()] = value.strip()
            if key.strip() == "try":
                break
        yield process, banner
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        finally:
            process.kill() if process.poll() is None else None
            process.stdout.close()
            assert process.stderr is not None
            process.stderr.close()


def test_serve_prints_where_to_connect_and_a_dev_token_that_works(
    serve_process: tuple[subprocess.Popen[str], dict[str, str]],
) -> None:
    _, banner = serve_process
    url = banner["WebSocket"].split()[0]
    assert url.startswith("ws://127.0.0.1:") and url.endswith("/haip/websocket")
    assert banner["agents"] == "echo, storyteller, operator, assistant"
    playground = banner["playground"]
    assert playground == f"{url.replace('ws://', 'http://').removesuffix('haip/websocket')}?token={banner['token']}"
    with urllib.request.urlopen(playground) as page:
        assert "<title>haip-runtime playground</title>" in page.read().decode()

    async def talk() -> str:
        async with HaipClient(url, token=banner["token"]) as client:
            tx = await client.start_transaction("echo")
            await client.send_text(tx, "hi from the CLI test")
            return str((await client.wait_for("MESSAGE_PART")).get("text"))

    assert anyio.run(talk) == "you said: hi from the CLI test"


def test_serve_stops_cleanly_on_interrupt(serve_process: tuple[subprocess.Popen[str], dict[str, str]]) -> None:
    process, _ = serve_process
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) in (0, 130)  # uvicorn re-raises the signal after a graceful shutdown
    assert process.stderr is not None
    assert "Application shutdown complete" in process.stderr.read()


def test_serve_refuses_dev_mode_on_a_public_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "serve", "--config", str(ROOT / "haip.toml"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert result.returncode == 1
    assert "auth.mode = 'dev' may only bind a loopback address" in result.stderr and "Traceback" not in result.stderr


def test_tools_command_lists_each_server_state_and_tools() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "tools", "--config", str(ROOT / "haip.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    header, demo, team = result.stdout.splitlines()[:3]
    assert header.split() == ["SERVER", "TRANSPORT", "STATE", "TOOLS", "ERROR"]
    assert demo.split() == ["demo", "stdio", "connected", "10"]
    assert team.split() == ["team", "python", "connected", "8"]
    assert "  demo.slow_count  " in result.stdout and "  team.index_notes  " in result.stdout
    assert result.stderr == ""  # nor the in-process server's own logging


def test_tools_command_fails_with_the_reason_when_a_server_cannot_start(tmp_path: Path) -> None:
    config = tmp_path / "haip.toml"
    config.write_text("[mcp.servers.ghost]\ntransport = 'stdio'\ncommand = '/nonexistent/mcp-server'\n")
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "tools", "--config", str(config), "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    row = result.stdout.splitlines()[1]
    assert row.split()[:4] == ["ghost", "stdio", "failed", "0"]
    assert row.endswith("cannot start '/nonexistent/mcp-server': command not found")
    assert result.stderr == "\nhaip-runtime: not connected: ghost\n"


def test_token_carries_the_roles_given_and_refuses_unknown_ones(tmp_path: Path) -> None:
    import jwt

    secret = "r" * 40
    config = tmp_path / "haip.toml"
    config.write_text(f"[auth]\nmode = 'jwt'\nsecret = '{secret}'\nroles_claim = 'grp'\n[roles.user]\n[roles.admin]\n")
    made = run(["token", "--config", str(config), "--user", "ann", "--roles", "user, admin"])
    claims = jwt.decode(made.stdout.strip(), secret, algorithms=["HS256"])
    assert made.returncode == 0 and claims["sub"] == "ann" and claims["grp"] == ["user", "admin"]
    bad = run(["token", "--config", str(config), "--roles", "root"])
    assert bad.returncode == 1 and bad.stderr.strip().endswith("roles: no [roles.root] in this config")


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "haip_runtime", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_server_runs_without_the_chat_extra_and_chat_says_how_to_get_it() -> None:
    """prompt-toolkit and rich are the `chat` extra: the server never imports them, `chat` names the extra."""
    hide = "import sys; sys.modules['prompt_toolkit'] = None; sys.modules['rich'] = None; "
    server = subprocess.run(
        [sys.executable, "-c", hide + "from haip_runtime.server.app import create_app; import haip_runtime.client"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    chat = subprocess.run(
        [
            sys.executable,
            "-c",
            hide + "from haip_runtime.cli import main; sys.exit(main(['chat', 'ws://127.0.0.1:9']))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server.returncode == 0, server.stderr
    assert chat.returncode == 2 and "pip install 'haip-runtime[chat]'" in chat.stderr
