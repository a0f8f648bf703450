"""``haip-runtime serve`` as an operator runs it: a real process, its banner, a real client."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.client import HaipClient
from tests.support import serving
from tests.support.serving import ROOT


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """The repository's haip.toml in a folder of its own: its store and dev key go there, not into the checkout."""
    copy = tmp_path / "haip.toml"
    shutil.copyfile(ROOT / "haip.toml", copy)
    return copy


@pytest.fixture
def serve_process(config_copy: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config_copy), "--port", "0"]
    with serving.serve_process(command, cwd=Path("/")) as served:
        yield served.process, served.banner


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


def test_serve_runs_on_uvloop_unless_the_config_asks_for_asyncio(config_copy: Path) -> None:
    """``server.event_loop``: ``auto`` (the default) is uvloop, which comes with the runtime here;
    ``asyncio`` is Python's own. ``/health`` says which one serves, and both answer a turn."""
    loops = []
    for asked in ("auto", "asyncio"):
        text = config_copy.read_text()
        config_copy.write_text(text.replace("[server]\n", f'[server]\nevent_loop = "{asked}"\n', 1))
        command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config_copy), "--port", "0"]
        with serving.serve_process(command, cwd=Path("/")) as served:
            url = served.banner["WebSocket"].split()[0]
            health = url.replace("ws://", "http://").replace("/haip/websocket", "/health")
            with urllib.request.urlopen(health) as answer:
                loops.append(json.loads(answer.read())["eventLoop"])

            async def talk(url: str = url, token: str = served.banner["token"]) -> str:
                async with HaipClient(url, token=token) as client:
                    tx = await client.start_transaction("echo")
                    await client.send_text(tx, "hi")
                    return str((await client.wait_for("MESSAGE_PART")).get("text"))

            assert anyio.run(talk) == "you said: hi"
        config_copy.write_text(text)
    assert loops == ["uvloop", "asyncio"]


def test_access_log_writes_a_line_per_http_request_with_its_token_redacted(config_copy: Path) -> None:
    """An operator's wish: no HTTP request was logged. Off by default; on, a query's token is not written."""
    text = config_copy.read_text()
    config_copy.write_text(text.replace("[server]\n", "[observability]\naccess_log = true\n[server]\n", 1))
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config_copy), "--port", "0"]
    with serving.serve_process(command, cwd=Path("/")) as served:
        base = served.banner["WebSocket"].split()[0].replace("ws://", "http://").removesuffix("haip/websocket")
        with urllib.request.urlopen(f"{base}health?token=not-for-the-log") as answer:
            assert answer.status == 200
        served.process.send_signal(signal.SIGINT)
        served.process.wait(timeout=15)
        assert served.process.stderr is not None
        err = served.process.stderr.read()
    assert '"GET /health?token=<redacted> HTTP/1.1" 200' in err and "not-for-the-log" not in err


def test_serve_stops_cleanly_on_interrupt(serve_process: tuple[subprocess.Popen[str], dict[str, str]]) -> None:
    process, _ = serve_process
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) in (0, 130)  # uvicorn re-raises the signal after a graceful shutdown
    assert process.stderr is not None
    assert "Application shutdown complete" in process.stderr.read()


def test_a_stop_ends_an_open_event_stream_with_1012_at_once(
    serve_process: tuple[subprocess.Popen[str], dict[str, str]],
) -> None:
    """A front-end developer's find: an open SSE response held the stop for uvicorn's 5 s, was then cancelled
    with a traceback, and its client got no ``event: close`` to resume on (WebSockets got their 1012)."""
    process, banner = serve_process
    base = banner["WebSocket"].split()[0].replace("ws://", "http://").removesuffix("/haip/websocket")
    with httpx2.Client(timeout=20) as http:
        with http.stream("GET", f"{base}/haip/sse", headers={"authorization": f"Bearer {banner['token']}"}) as sse:
            lines = sse.iter_lines()
            received = [next(lines)]  # open: the server's HAI is on its way
            process.send_signal(signal.SIGTERM)
            received += list(lines)  # until the server ends the response
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)  # (uvicorn raises the signal again once stopped)
    assert process.stderr is not None
    stderr = process.stderr.read()
    closing = [line for line in received if line.startswith("data: ") and "1012" in line]
    assert received[-3:-1] == ["event: close", closing[-1]] and "resume" in closing[-1], received[-4:]
    assert "Traceback" not in stderr and "graceful shutdown exceeded" not in stderr


def test_a_stop_ends_an_open_ag_ui_run_with_run_error_at_once(
    serve_process: tuple[subprocess.Popen[str], dict[str, str]],
) -> None:
    """A reviewer's find: an AG-UI run's stream (the storyteller's, which takes seconds) held the stop for
    uvicorn's 5 s and was cut without an end."""
    process, banner = serve_process
    base = banner["WebSocket"].split()[0].replace("ws://", "http://").removesuffix("/haip/websocket")
    run: dict[str, Any] = {"threadId": "t-stop", "runId": "r1", "state": {}, "tools": [], "context": []}
    run |= {"messages": [{"id": "m1", "role": "user", "content": "a fox"}], "forwardedProps": {}}
    with httpx2.Client(timeout=20) as http:
        headers = {"authorization": f"Bearer {banner['token']}"}
        with http.stream("POST", f"{base}/ag-ui/storyteller", json=run, headers=headers) as answer:
            lines = answer.iter_lines()
            received = [next(line for line in lines if "TEXT_MESSAGE_CONTENT" in line)]  # the story is going
            process.send_signal(signal.SIGTERM)
            received += list(lines)
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    assert process.stderr is not None
    stderr = process.stderr.read()
    [end] = [json.loads(line[6:]) for line in received if line.startswith("data: ") and "RUN_ERROR" in line]
    assert end["code"] == "SHUTTING_DOWN" and "restarting" in end["message"]
    assert "Traceback" not in stderr and "graceful shutdown exceeded" not in stderr


def test_serve_refuses_dev_mode_on_a_public_address(config_copy: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config_copy), "--host", "0.0.0.0"],
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


def test_tools_and_check_connect_show_what_a_failed_server_said_on_stderr(tmp_path: Path) -> None:
    """A tester's find: both said "closed the connection (see its stderr)" and showed none of it."""
    config = tmp_path / "haip.toml"
    config.write_text(
        "[mcp.servers.exits]\ntransport = 'stdio'\ncommand = '${HAIP_PYTHON}'\n"
        "args = ['-c', 'import sys; print(\"starting\", file=sys.stderr); "
        'print("fatal: missing API key", file=sys.stderr); sys.exit(2)\']\n'
    )
    said = "closed the connection; its stderr ended: starting | fatal: missing API key"
    tools = run(["tools", "--config", str(config), "--timeout", "30"])
    assert tools.returncode == 1
    assert tools.stdout.splitlines()[1].endswith(said), tools.stdout
    check = run(["check", "--config", str(config), "--connect", "--timeout", "30"])
    assert check.returncode == 1
    assert check.stderr.splitlines()[0].startswith("failed: mcp.servers.exits: '")  # (its state said once)
    assert check.stderr.splitlines()[0].endswith(said), check.stderr


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
    # A node's config: what token does not need is not read (a tester: it asked for HAIP_REDIS_URL).
    node = tmp_path / "node.toml"
    node.write_text(
        config.read_text()
        + '[storage]\nbackend = "postgres"\nurl = "${HAIP_DATABASE_URL}"\n[cluster]\nredis_url = "${HAIP_REDIS_URL}"\n'
    )
    from_node = run(["token", "--config", str(node), "--user", "bob"])
    assert from_node.returncode == 0, from_node.stderr
    assert jwt.decode(from_node.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "bob"


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "haip_runtime", *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
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


def test_the_repository_haip_toml_is_the_embedded_default() -> None:
    embedded = ROOT / "haip_runtime" / "demo" / "haip.toml"
    assert (ROOT / "haip.toml").read_text() == embedded.read_text()


def test_serve_without_a_config_runs_the_embedded_defaults_and_says_so_first(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "haip_runtime", "serve", "--port", "0"]
    with serving.serve_process(command, cwd=tmp_path) as served:
        assert served.lines[0].startswith("haip-runtime: no haip.toml here: running the embedded defaults")
        assert served.lines[1].startswith("haip-runtime listening on http://127.0.0.1:")
        assert served.banner["agents"] == "echo, storyteller, operator, assistant"
        assert served.banner["history"].endswith(f"(kept in {tmp_path / 'haip.db'})")
        assert served.banner["AG-UI"].endswith("/ag-ui/<agent>") and "MCP" not in served.banner

        async def talk() -> str:
            async with HaipClient(served.banner["WebSocket"].split()[0], token=served.banner["token"]) as client:
                tx = await client.start_transaction("storyteller")
                await client.send_text(tx, "a lamp")
                return str((await client.wait_for("MESSAGE_END")).get("message_id"))

        assert anyio.run(talk)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["haip.db", "haip.db.dev-key", "haip.db.lock"]


def test_the_banner_names_the_mcp_door_when_it_is_on(capsys: pytest.CaptureFixture[str]) -> None:
    """An integrator's find: with [mcp_server] enabled, nothing said where it was."""
    from haip_runtime.auth.tokens import Authenticator
    from haip_runtime.cli import _announce
    from haip_runtime.config import validate_config

    config = validate_config({"mcp_server": {"enabled": True}, "agents": {"echo": {"plugin": "echo"}}}, base_dir=ROOT)
    _announce(config, ["echo"], Authenticator(config.auth, config.roles), "127.0.0.1", 8080)
    lines = capsys.readouterr().out.splitlines()
    assert "  MCP:       http://127.0.0.1:8080/mcp  (each agent a tool; streamable HTTP)" in lines


def test_check_names_the_embedded_defaults_on_stderr(tmp_path: Path) -> None:
    result = run(["check"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, last = result.stderr.splitlines()
    assert first.startswith("haip-runtime: no haip.toml here: running the embedded defaults")
    assert last == "ok: (embedded defaults) is valid (4 agent(s), 2 MCP server(s))"


def test_init_writes_a_project_whose_tests_pass_and_refuses_to_overwrite(tmp_path: Path) -> None:
    made = run(["init", "proj"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "proj"
    written = sorted(str(path.relative_to(project)) for path in project.rglob("*") if path.is_file())
    assert written == [
        ".gitignore",
        "haip.toml",
        "plugins/__init__.py",
        "plugins/conftest.py",
        "plugins/greeter.py",
        "plugins/notes.py",
        "plugins/test_greeter.py",
        "plugins/test_notes.py",
    ]
    assert made.stdout.splitlines()[-1].startswith("next: cd proj && haip-runtime serve")
    # What serve leaves beside the project (the store, its journal, its lock and the dev key) is ignored.
    ignored = [line for line in (project / ".gitignore").read_text().splitlines() if line and line[0] != "#"]
    left = ["haip.db", "haip.db-wal", "haip.db-shm", "haip.db.lock", "haip.db.dev-key"]
    assert [name for name in left if not any(fnmatch.fnmatch(name, pattern) for pattern in ignored)] == []
    checked = run(["check"], cwd=project)
    assert checked.returncode == 0 and checked.stderr.strip() == "ok: haip.toml is valid (2 agent(s), 1 MCP server(s))"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "plugins"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert tests.returncode == 0 and "4 passed" in tests.stdout, tests.stdout
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "E,F,W,I,UP,B", "--line-length", "120", "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout
    again = run(["init", "proj"], cwd=tmp_path)
    assert (
        again.returncode == 1
        and again.stderr
        == "haip-runtime: proj/haip.toml: already exists; init writes only into a folder without its files\n"
    )


def test_token_in_dev_mode_signs_with_the_dev_key_for_any_user_and_roles(config_copy: Path) -> None:
    import jwt

    made = run(["token", "--config", str(config_copy), "--user", "ann", "--roles", "admin,user"])
    assert made.returncode == 0, made.stderr
    key = (config_copy.parent / "haip.db.dev-key").read_text().strip()
    claims = jwt.decode(made.stdout.strip(), key, algorithms=["HS256"], issuer="haip-runtime-dev")
    assert claims["sub"] == "ann" and claims["roles"] == ["admin", "user"]
    assert "works only with this runtime's dev key" in made.stderr
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config_copy), "--port", "0"]
    with serving.serve_process(command, cwd=config_copy.parent) as served:

        async def talk() -> str:
            async with HaipClient(served.banner["WebSocket"].split()[0], token=made.stdout.strip()) as client:
                tx = await client.start_transaction("echo")
                await client.send_text(tx, "it is ann")
                return str((await client.wait_for("MESSAGE_PART")).get("text"))

        assert anyio.run(talk) == "you said: it is ann"


def test_token_in_dev_mode_without_a_durable_store_says_to_use_the_printed_one(tmp_path: Path) -> None:
    config = tmp_path / "haip.toml"
    config.write_text("[auth]\nmode = 'dev'\n")
    result = run(["token", "--config", str(config)])
    assert result.returncode == 1 and "use the token `serve` prints" in result.stderr


def test_version_and_every_command_has_a_description() -> None:
    version = run(["--version"])
    assert version.returncode == 0 and version.stdout.strip() == "haip-runtime 0.1.0"
    top = run(["--help"])
    assert "``" not in top.stdout
    for command in ("serve", "init", "check", "token", "tools", "chat", "schema"):
        described = run([command, "--help"])
        assert described.returncode == 0
        description = described.stdout.split("\n\n")[1]
        assert len(description) > 30 and not description.startswith(("positional", "options")), command


def test_check_names_each_thing_that_would_fail_at_start_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    config = tmp_path / "haip.toml"
    config.write_text(
        "[auth]\nmode = 'jwt'\nalgorithms = ['RS256']\npublic_key_file = 'keys'\n"
        "[mcp.servers.ghost]\ntransport = 'stdio'\ncommand = 'no-such-mcp-server-here'\n"
        "[mcp.servers.script]\ntransport = 'stdio'\ncommand = './missing.sh'\n"
        "[llm.offline]\nkind = 'local'\nmodel_path = 'models/none.gguf'\n"
    )
    result = run(["check", "--config", str(config)])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"haip-runtime: {config}: mcp.servers.ghost.command: 'no-such-mcp-server-here' is not on PATH",
        f"haip-runtime: {config}: mcp.servers.script.command: './missing.sh' is not an executable file",
        f"haip-runtime: {config}: llm.offline.model_path: cannot read '{tmp_path / 'models/none.gguf'}': "
        "No such file or directory",
        f"haip-runtime: {config}: auth.public_key_file: cannot read '{tmp_path / 'keys'}': Is a directory",
        f"haip-runtime: {config}: 4 problem(s)",
    ]


def test_check_notes_default_roles_that_roles_does_not_define_and_still_passes(tmp_path: Path) -> None:
    """An operator's wish: users whose token named no role could do nothing, and nothing said why."""
    config = tmp_path / "haip.toml"
    config.write_text("[roles.staff]\nagents = ['*']\n")
    result = run(["check", "--config", str(config)])
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"haip-runtime: {config}: note: auth.default_roles names 'user', which [roles] does not define: a user"
        " whose token names no role may start no agent and use no tool; define it under [roles], or set"
        " default_roles = [] to say so"
    )
    config.write_text("[auth]\ndefault_roles = []\n[roles.staff]\nagents = ['*']\n")
    assert "note:" not in run(["check", "--config", str(config)]).stderr


def test_check_finds_the_offline_speech_that_would_fail_on_first_use(tmp_path: Path) -> None:
    """A voice tester's find: each of these passed ``check`` and failed only when someone spoke."""
    (tmp_path / "haip.toml").write_text(
        "[speech.missing]\nkind = 'local'\nmodel_path = 'no-such-model'\n"
        "[speech.mute]\nkind = 'local'\nvoice = 'xx-nonexistent'\n"
        "[speech.french]\nkind = 'local'\nlanguage = 'fr'\n"
        "[speech.fine]\nkind = 'local'\nvoice = 'en+f3'\n"
        "[agents.echo]\nplugin = 'echo'\nspeech = 'fine'\n"
    )
    result = run(["check"], cwd=tmp_path)
    lines = [line.removeprefix("haip-runtime: haip.toml: ") for line in result.stderr.splitlines()]
    assert result.returncode == 1
    assert lines == [
        f"speech.missing.model_path: '{tmp_path / 'no-such-model'}' is not a whisper model folder",
        "speech.mute.voice: espeak-ng has no voice 'xx-nonexistent' (`espeak-ng --voices` lists them)",
        "speech.french.language: 'fr', but the packaged model (tiny.en) knows English only: set model_path to a"
        " multilingual whisper model",
        "3 problem(s)",
    ]


def test_check_connect_starts_each_mcp_server_and_reaches_each_llm(tmp_path: Path) -> None:
    from tests.support.vendor import vendor_server

    with vendor_server() as vendor:
        vendor.accepted_key = "sk-good"
        config = tmp_path / "haip.toml"
        config.write_text(
            "[mcp.servers.demo]\ntransport = 'stdio'\ncommand = '${HAIP_PYTHON}'\n"
            "args = ['-m', 'haip_runtime.demo.mcp_server']\n"
            "require_approval = ['demo.delete_everything', 'delete_everythng']\n"  # (a typo: noted, not fatal)
            "[mcp.servers.team]\ntransport = 'python'\nserver = 'haip_runtime.demo.team_tools:server'\n"
            f"[llm.good]\nkind = 'openai'\nmodel = 'm'\nbase_url = '{vendor.url}/v1'\napi_key = 'sk-good'\n"
            f"[llm.refused]\nkind = 'anthropic'\nmodel = 'c'\nbase_url = '{vendor.url}'\napi_key = 'sk-bad'\n"
            "[llm.away]\nkind = 'openai'\nmodel = 'm'\nbase_url = 'http://127.0.0.1:1/v1'\n"
        )
        result = run(["check", "--config", str(config), "--connect", "--timeout", "30"])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    typo = "note: mcp.servers.demo.require_approval: 'delete_everythng' matches none of its 10 tool(s) (add, "
    assert lines.pop(1).startswith(typo), result.stderr
    assert lines == [
        "reached: mcp.servers.demo: connected, 10 tool(s)",
        "reached: mcp.servers.team: connected, 8 tool(s)",
        f"reached: llm.good: {vendor.url}/v1/models answered HTTP 200",
        f"failed: llm.refused.api_key: refused by {vendor.url}/v1/models (HTTP 401)",
        "failed: llm.away.base_url: cannot reach http://127.0.0.1:1/v1/models: ConnectError",
        f"haip-runtime: {config}: 2 problem(s)",
    ]
    assert "sk-good" not in result.stderr + result.stdout and "sk-bad" not in result.stderr + result.stdout


def test_check_connect_fetches_the_jwks_key_set(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.support.jwks_server import jwk_of, serve_jwks

    def check(url: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "haip.toml"
        config.write_text(f"[auth]\nmode = 'jwt'\nalgorithms = ['RS256']\njwks_url = '{url}'\n")
        return run(["check", "--config", str(config), "--connect", "--timeout", "10"])

    with serve_jwks() as jwks:
        jwks.keys = [jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=2048), "k1")]
        held = check(jwks.url)
        jwks.keys = []
        empty = check(jwks.url)
    away = check("http://127.0.0.1:1/jwks.json")
    assert held.returncode == 0 and f"reached: auth.jwks_url: {jwks.url} holds 1 key(s)" in held.stderr
    assert empty.returncode == 1 and "did not contain any keys" in empty.stderr
    assert away.returncode == 1 and "failed: auth.jwks_url: cannot fetch the key set: http://127.0.0.1:1" in away.stderr


def test_the_banner_suggests_a_chat_only_with_an_agent_to_talk_to(capsys: pytest.CaptureFixture[str]) -> None:
    """A newcomer's find: with no agents configured, its ``try:`` line named ``--agent echo``, which was not there."""
    from haip_runtime.auth.tokens import Authenticator
    from haip_runtime.cli import _announce
    from haip_runtime.config.loading import validate_config

    config = validate_config({"agents": {}}, base_dir=Path.cwd())
    for agents in ([], ["helper", "operator"], ["helper"]):
        _announce(config, agents, Authenticator(config.auth), "127.0.0.1", 8080)
        tried = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  try:")]
        assert [line.split("--agent ")[1].split()[0] for line in tried] == (
            [] if not agents else ["operator" if "operator" in agents else agents[0]]
        )
