"""haip.toml loading: expansion, paths, one-line errors, the check command and the schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from haip_runtime.config import (
    ConfigError,
    HaipConfig,
    json_schema,
    load_config,
    masked_dump,
    secret_values,
    validate_config,
)
from haip_runtime.config.loading import expand
from tests.support.serving import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "haip.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_haip_toml_loads_with_no_environment() -> None:
    config = load_config(ROOT / "haip.toml", env={})
    assert config.auth.mode == "dev" and config.server.host == "127.0.0.1"
    assert "echo" in config.agents


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}).model_dump(exclude={"base_dir"}) == HaipConfig().model_dump(
        exclude={"base_dir"}
    )


def test_variables_and_defaults_are_expanded(tmp_path: Path) -> None:
    text = (
        '[server]\nhost = "${HOST:-127.0.0.1}"\nport = 0\n'
        '[agents.e]\nplugin = "echo"\ndescription = "$${HOST} ${WHO}"\n'
    )
    config = load_config(write(tmp_path, text), env={"WHO": "ops"})
    assert config.server.host == "127.0.0.1"
    assert config.agents["e"].description == "${HOST} ops"


def test_empty_variable_takes_the_default_but_plain_form_keeps_it() -> None:
    assert expand("${A:-x}", {"A": ""}, "k") == "x"
    assert expand("${A}", {"A": ""}, "k") == ""


def test_missing_variable_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[auth]\nmode = "jwt"\nsecret = "${HAIP_JWT_SECRET}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert (
        str(caught.value) == f"{path}: auth.secret: environment variable HAIP_JWT_SECRET is not set "
        "(write ${HAIP_JWT_SECRET:-default} for a default)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 99999\n", "server.port: Input should be less than or equal to 65535 (got 99999)"),
        (
            "[server]\nprot = 1\n",
            "server.prot: unknown key (did you mean 'port'? check the spelling; `haip-runtime schema` prints"
            " every key)",
        ),
        (
            "[agent.x]\nplugin = 'echo'\n",
            "agent: unknown key (did you mean 'agents'? check the spelling; `haip-runtime schema` prints every key)",
        ),
        (
            "[agents.x]\nplugn = 'echo'\nplugin = 'echo'\n",
            "agents.x.plugn: unknown key (did you mean 'plugin'? check the spelling; `haip-runtime schema` prints"
            " every key)",
        ),
        ("base_dir = '/etc'\n", "base_dir: unknown key (it is the config file's own folder)"),
        (
            "[llm.x]\nkind = 'openai'\nmodel = 'm'\nmodle = 'm'\n",
            "llm.x.modle: unknown key (did you mean 'model'? check the spelling; `haip-runtime schema` prints"
            " every key)",
        ),
        ("[agents.x]\ndescription = 'no plugin'\n", "agents.x.plugin: required key is missing"),
        ("[auth]\nmode = 'jwt'\n", "auth.mode = 'jwt' with HS* algorithms needs auth.secret"),
        ("[auth]\nmode = 'jwt'\nsecret = 'short'\n", "auth.secret must be at least 32 bytes for HMAC signing"),
        (
            "[server]\nhost = '0.0.0.0'\n",
            "auth.mode = 'dev' may only bind a loopback address, not '0.0.0.0'; use mode = 'jwt'",
        ),
        (
            "[agents.a]\nplugin = 'echo'\nmcp_servers = ['nope']\n",
            "agents.a.mcp_servers names unknown server 'nope'",
        ),
        (  # pydantic's path has the union tag too (llm.local.local.max_tokens): the file's has not
            "[llm.local]\nkind = 'local'\nmax_tokens = 'x'\n",
            "llm.local.max_tokens: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "[mcp.servers.x]\ntransport = 'stdio'\ncommand = 'x'\nargs = ['a', 1]\n",
            "mcp.servers.x.args[1]: Input should be a valid string (got 1)",
        ),
        (  # an operator's finds: "yes" granted it; the check named the table twice, and '/' for an '@'
            "[roles.staff]\nmay_join_others = 'yes'\n",
            "roles.staff.may_join_others: true or false (got 'yes')",
        ),
        (
            "[storage]\nbackend = 'postgres'\nurl = 'postgresql://u:p@ss@127.0.0.1/db'\n",
            "storage.url: percent-encode @ in the user name or password (@ as %40)",
        ),
        (  # last stops' note: it passed, was fetched from host "svc", and its masking showed "ss@idp..."
            "[auth]\nmode = 'jwt'\nalgorithms = ['RS256']\njwks_url = 'https://svc:pa/ss@idp.example/jwks'\n",
            "auth.jwks_url: its port is not a number; a password holding '/', '?' or '#' must be percent-encoded"
            " (%2F, %3F, %23)",
        ),
        (
            "[mcp.servers.x]\ntransport = 'http'\nurl = 'https://u:p#w@mcp.example:8443/mcp'\n",
            "mcp.servers.x.url: its port is not a number; a password holding '/', '?' or '#' must be"
            " percent-encoded (%2F, %3F, %23)",
        ),
        (  # a newcomer's find: a key of another transport was accepted, and did nothing
            "[mcp.servers.x]\ntransport = 'stdio'\ncommand = 'x'\nserver = 'y:z'\nurl = 'http://127.0.0.1:9/mcp'\n",
            "mcp.servers.x: transport 'stdio' takes no 'server' (transport 'python''s), 'url' (transport 'http''s)",
        ),
    ],
    ids=[
        "range",
        "typo",
        "table-typo",
        "nested-typo",
        "base-dir",
        "union-typo",
        "missing",
        "jwt-without-secret",
        "short-secret",
        "dev-on-public-address",
        "unknown-server",
        "union-member",
        "list-item",
        "strict-bool",
        "url-userinfo",
        "jwks-url-unencoded-password",
        "mcp-url-unencoded-password",
        "other-transports-key",
    ],
)
def test_invalid_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}: {expected}"
    assert "\n" not in str(caught.value)


def test_a_secret_never_appears_in_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[auth]\nmode = 'jwt'\nsecret = 'tiny-but-secret'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "tiny-but-secret" not in str(caught.value)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid TOML: ") and "line 1" in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")
    assert "cannot read" in str(caught.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    text = "[mcp.servers.demo]\ntransport = 'stdio'\ncommand = 'python'\ncwd = 'servers'\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.mcp.servers["demo"].cwd == (tmp_path / "servers").resolve()
    assert config.base_dir == tmp_path.resolve()


def test_config_is_frozen() -> None:
    config = HaipConfig()
    with pytest.raises(Exception, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


def test_generated_schema_is_committed_and_current() -> None:
    committed = json.loads((ROOT / "config" / "haip.schema.json").read_text())
    assert committed == json_schema(), "run: haip-runtime schema --output config/haip.schema.json"
    assert committed["properties"]["server"]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "haip_runtime", *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def test_check_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    secret = "s" * 40
    path = write(tmp_path, f"[auth]\nmode = 'jwt'\nsecret = '{secret}'\n[agents.e]\nplugin = 'echo'\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["auth"]["secret"] == "**********" and secret not in result.stdout + result.stderr
    assert "is valid (1 agent(s), 0 MCP server(s))" in result.stderr


def test_check_on_a_bad_file_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 'eighty'\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr == f"haip-runtime: {path}: server.port: Input should be a valid integer, unable to parse "
        "string as an integer (got 'eighty')\n"
    )


def test_check_reports_a_plugin_that_cannot_be_imported(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.x]\nplugin = 'no_such_module:Agent'\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"haip-runtime: {path}: agents.x.plugin: cannot import 'no_such_module'")
    assert "importlib" not in result.stderr  # (a newcomer's find: it ended "(at .../importlib/__init__.py, line 126)")


def test_check_reports_bad_plugin_options_by_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.x]\nplugin = 'echo'\noptions = { prefix = 3 }\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr == f"haip-runtime: {path}: agents.x.options.prefix: Input should be a valid string (got 3)\n"


def test_plugin_file_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "from haip_runtime import Agent, Turn\n\nclass Mine(Agent):\n"
        "    async def on_message(self, turn: Turn) -> None:\n        await turn.say('mine')\n"
    )
    path = write(tmp_path, "[agents.mine]\nplugin = 'mine.py:Mine'\n[agents.mod]\nplugin = 'mine:Mine'\n")
    result = run_cli("check", "--config", str(path), cwd=Path("/"))
    assert result.returncode == 0, result.stderr


def test_plugin_that_is_not_an_agent_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.x]\nplugin = 'json:dumps'\n")
    result = run_cli("check", "--config", str(path))
    assert (
        result.stderr
        == f"haip-runtime: {path}: agents.x.plugin: 'json:dumps' is not a subclass of haip_runtime.Agent\n"
    )


def test_builtin_agents_are_registered_as_entry_points() -> None:
    from haip_runtime.agents.echo import EchoAgent
    from haip_runtime.agents.registry import resolve_plugin
    from haip_runtime.config.references import _entry_point

    assert _entry_point("echo", "haip_runtime.agents") == "haip_runtime.agents.echo:EchoAgent"
    assert resolve_plugin("echo", ROOT, "agents.e.plugin") is EchoAgent


def test_unknown_plugin_name_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.x]\nplugin = 'ech'\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1
    expected = f"haip-runtime: {path}: agents.x.plugin: 'ech' is neither a known agent (assistant, echo, operator"
    assert result.stderr.startswith(expected)


def test_every_schema_error_of_a_file_is_a_line_of_its_own(tmp_path: Path) -> None:
    """A tester's find: check said the first and "(+2 more errors)", though it promises one line per problem."""
    path = write(tmp_path, "[server]\nport = 'x'\nhost = 5\n[session]\nbogus = 1\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"haip-runtime: {path}: server.host: Input should be a valid string (got 5)",
        f"haip-runtime: {path}: server.port: Input should be a valid integer, unable to parse string as an integer"
        " (got 'x')",
        f"haip-runtime: {path}: session.bogus: unknown key (check the spelling; `haip-runtime schema` prints"
        " every key)",
        "haip-runtime: 3 problem(s)",
    ]
    with pytest.raises(ConfigError) as refused:  # where one line is all there is room for
        validate_config({"server": {"port": "x", "host": 5}}, base_dir=ROOT, source="f.toml")
    assert str(refused.value) == "f.toml: server.host: Input should be a valid string (got 5) (+1 more error)"


@pytest.mark.parametrize("name", ["my agent", "é/x", "-dash", "x" * 65, ""])
def test_an_agent_name_no_client_could_call_is_refused(name: str) -> None:
    """A tester's find: "my agent" and "é/x" passed check; MCP clients reject such tool names, and the
    second could not be reached at /ag-ui/<name> at all."""
    with pytest.raises(ConfigError, match="an agent's name is 1 to 64 letters"):
        validate_config({"agents": {name: {"plugin": "echo"}}}, base_dir=ROOT)


def test_agent_names_clients_can_call_are_taken() -> None:
    names = ["echo", "Help-Desk_2", "v1.2", "x" * 64]
    config = validate_config({"agents": {name: {"plugin": "echo"} for name in names}}, base_dir=ROOT)
    assert list(config.agents) == names


def test_check_masks_mcp_env_headers_and_secretish_agent_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[agents.e]\nplugin = 'echo'\n[agents.e.options]\nprefix = 'visible: '\n"
        "[mcp.servers.s]\ntransport = 'stdio'\ncommand = 'true'\nenv = { API_KEY = 'sk-secret123' }\n"
        "[mcp.servers.h]\ntransport = 'http'\nurl = 'http://127.0.0.1:1/mcp'\n"
        "headers = { Authorization = 'Bearer hdr-secret' }\n",
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["mcp"]["servers"]["s"]["env"] == {"API_KEY": "**********"}
    assert shown["mcp"]["servers"]["h"]["headers"] == {"Authorization": "**********"}
    assert "sk-secret123" not in result.stdout and "hdr-secret" not in result.stdout
    assert shown["agents"]["e"]["options"] == {"prefix": "visible: "}


def test_mcp_urls_and_secretish_arguments_are_masked_in_check_and_known_to_the_log_redactor() -> None:
    """A tester's find: an MCP server's ``url`` (user:password@, ``?api_key=``) and ``--key=`` arguments
    printed as written by ``check``, ``${VAR}`` interpolated."""
    url = "http://user:pa55word@127.0.0.1:1/mcp?api_key=sekrit123&workspace=production#top"
    args = ["--key=sekrit456", "--api-key", "sekrit789", "-v", "--no-auth", "/srv/mcp/server.py", "--author=ada"]
    servers = {"h": {"transport": "http", "url": url}, "s": {"transport": "stdio", "command": "true", "args": args}}
    config = validate_config({"mcp": {"servers": servers}}, base_dir=ROOT)
    shown = masked_dump(config)["mcp"]["servers"]
    assert shown["h"]["url"] == "http://user:**********@127.0.0.1:1/mcp?api_key=**********&workspace=production#top"
    assert shown["s"]["args"] == [
        "--key=**********",
        "--api-key",
        "**********",
        "-v",
        "--no-auth",  # not a secret's flag (a reviewer's find: these were masked, and redacted from the logs)
        "/srv/mcp/server.py",
        "--author=ada",
    ]
    secrets = set(secret_values(config))
    assert {"pa55word", "sekrit123", "sekrit456", "sekrit789"} <= secrets
    assert not {"production", "/srv/mcp/server.py", "ada"} & secrets


def test_a_urls_code_and_signature_are_masked_but_a_code_flag_is_not() -> None:
    """Left open last stop: Azure Functions' ``?code=`` key, and a signed URL's ``sig``/``signature``."""
    url = "https://fn.example/api/mcp?code=azkey123&sig=sig456&signature=sig789&lang=en"
    args = ["--code", "main.py"]
    servers = {"h": {"transport": "http", "url": url}, "s": {"transport": "stdio", "command": "true", "args": args}}
    config = validate_config({"mcp": {"servers": servers}}, base_dir=ROOT)
    shown = masked_dump(config)["mcp"]["servers"]
    assert shown["h"]["url"] == (
        "https://fn.example/api/mcp?code=**********&sig=**********&signature=**********&lang=en"
    )
    assert shown["s"]["args"] == ["--code", "main.py"]
    assert {"azkey123", "sig456", "sig789"} <= set(secret_values(config)) and "main.py" not in secret_values(config)


def test_masked_dump_and_secret_values_cover_nested_agent_options() -> None:
    data = {
        "agents": {"a": {"plugin": "echo", "options": {"llm": {"api_key": "k-123456789", "model": "m"}, "n": 1}}},
        "auth": {"mode": "jwt", "secret": "z" * 40},
    }
    config = validate_config(data, base_dir=ROOT)
    assert masked_dump(config)["agents"]["a"]["options"] == {"llm": {"api_key": "**********", "model": "m"}, "n": 1}
    assert set(secret_values(config)) == {"z" * 40, "k-123456789"}


def test_uvloop_asked_for_where_it_is_not_installed_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # (import uvloop raises ImportError)
    with pytest.raises(ConfigError) as refused:
        validate_config({"server": {"event_loop": "uvloop"}}, base_dir=ROOT)
    assert "server.event_loop: 'uvloop' cannot be imported here" in str(refused.value)
    assert validate_config({"server": {"event_loop": "auto"}}, base_dir=ROOT).server.event_loop == "auto"


def test_a_plugin_file_imports_the_modules_beside_it_whatever_the_order_of_the_agents(tmp_path: Path) -> None:
    """An author's tester: a ``path.py:Class`` plugin could not import its neighbours, and ``mystuff.util``
    imported only when a ``mystuff.x:Class`` agent happened to come first in the file. What is beside a
    plugin file imports relatively; an import by name says how to write it."""
    plugins = tmp_path / "mystuff"
    plugins.mkdir()
    (plugins / "__init__.py").write_text("")
    (plugins / "util.py").write_text("GREETING = 'hello'\n")
    agent = (
        "from haip_runtime import Agent, Turn\n{imports}\n\n"
        "class {name}(Agent):\n"
        "    async def on_message(self, turn: Turn) -> None:\n"
        "        await turn.say(GREETING)\n"
    )
    (plugins / "beside.py").write_text(agent.format(imports="from .util import GREETING", name="Beside"))
    (plugins / "package.py").write_text(agent.format(imports="from mystuff.util import GREETING", name="Package"))
    (plugins / "by_name.py").write_text(agent.format(imports="from util import GREETING", name="ByName"))
    for first, second in (("b", "p"), ("p", "b")):
        tables = {
            "b": "[agents.b]\nplugin = 'mystuff/beside.py:Beside'\n",
            "p": "[agents.p]\nplugin = 'mystuff.package:Package'\n",
        }
        result = run_cli("check", "--config", str(write(tmp_path, tables[first] + tables[second])), cwd=Path("/"))
        assert result.returncode == 0, result.stderr
    hints = []
    for spec in ("mystuff/by_name.py:ByName", "mystuff/package.py:Package"):
        result = run_cli("check", "--config", str(write(tmp_path, f"[agents.n]\nplugin = '{spec}'\n")), cwd=Path("/"))
        hints.append(result.stderr.rpartition("ModuleNotFoundError: ")[2].strip())
    assert hints == [
        "No module named 'util' (a plugin file imports what is beside it relatively: 'from .util import ...')",
        "No module named 'mystuff' ('mystuff' is in the config's folder: a plugin named 'module:Class' imports it"
        " by name, a plugin file imports what is beside it relatively)",
    ]
    bare = write(tmp_path, "[agents.b]\nplugin = 'mystuff/beside.py'\n")
    result = run_cli("check", "--config", str(bare), cwd=Path("/"))
    assert result.stderr == (
        f"haip-runtime: {bare}: agents.b.plugin: 'mystuff/beside.py' names a file but not what in it to use:"
        " write 'mystuff/beside.py:Class'\n"
    )


def test_a_plugin_file_named_after_what_it_imports_loads_and_two_folders_neighbours_are_their_own(
    tmp_path: Path,
) -> None:
    """Reviewers' finds in the first versions of the above, which put a plugin's folder on ``sys.path``:
    ``a/json.py`` importing json imported itself; two plugin folders with a ``helpers.py`` each gave the
    second plugin the first one's, silently; and ``statistics.py`` in the config's folder took the place
    of the standard module for every other importer (``report.py`` here)."""
    plugin = (
        "{imports}\nfrom haip_runtime import Agent, Turn\n\n"
        "class {name}(Agent):\n"
        "    async def on_message(self, turn: Turn) -> None:\n"
        "        await turn.say({says})\n"
    )
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "helpers.py").write_text(f"NAME = {folder!r}\n")
        imports = f"from . import helpers\nassert helpers.NAME == {folder!r}, helpers.NAME"  # (its own, or it fails)
        (tmp_path / folder / "agent.py").write_text(plugin.format(imports=imports, name="Agent", says="helpers.NAME"))
    (tmp_path / "a" / "json.py").write_text(plugin.format(imports="import json", name="Json", says="json.dumps(1)"))
    (tmp_path / "statistics.py").write_text(plugin.format(imports="import statistics", name="Stats", says="'x'"))
    report = "import statistics\nMEAN = statistics.mean([1, 2])"  # (the standard module, whatever sits beside it)
    (tmp_path / "report.py").write_text(plugin.format(imports=report, name="Report", says="str(MEAN)"))
    config = (
        "[agents.a]\nplugin = 'a/agent.py:Agent'\n[agents.j]\nplugin = 'a/json.py:Json'\n"
        "[agents.b]\nplugin = 'b/agent.py:Agent'\n[agents.s]\nplugin = 'statistics.py:Stats'\n"
        "[agents.r]\nplugin = 'report.py:Report'\n"
    )
    result = run_cli("check", "--config", str(write(tmp_path, config)), cwd=Path("/"))
    assert result.returncode == 0, result.stderr


def test_every_plugin_problem_is_a_line_of_its_own(tmp_path: Path) -> None:
    """An author's tester: check said the first bad option and stopped, though it promises one line per problem."""
    (tmp_path / "odd.py").write_text(
        "from dataclasses import dataclass\nfrom haip_runtime import Agent, Turn\n\n"
        "@dataclass\nclass Opts:\n    n: int = 1\n\n"
        "class Odd(Agent):\n    Options = Opts\n\n    async def on_message(self, turn: Turn) -> None:\n        pass\n\n"
        "class Plain(Agent):\n    async def on_message(self, turn: Turn) -> None:\n        pass\n"
    )
    path = write(
        tmp_path,
        "[agents.s]\nplugin = 'haip_runtime.demo.storyteller:Storyteller'\n"
        "options = { words_per_second = 'x', greting = 1 }\n"
        "[agents.o]\nplugin = 'odd.py:Odd'\n[agents.p]\nplugin = 'odd.py:Plain'\noptions = { n = 2 }\n",
    )
    result = run_cli("check", "--config", str(path), cwd=Path("/"))
    assert result.returncode == 1
    lines = [line.removeprefix(f"haip-runtime: {path}: ") for line in result.stderr.splitlines()]
    assert lines[0].startswith("agents.s.options.words_per_second: Input should be a valid number")
    assert lines[1] == "agents.s.options.greting: unknown option (check the spelling)"
    assert lines[2].startswith("agents.o.plugin: 'odd.py:Odd'.Options must be a pydantic model (a BaseModel subclass)")
    assert lines[3:] == [
        "agents.p.options.n: unknown option of Plain (it declares no Options)",
        "haip-runtime: 4 problem(s)",
    ]
    assert "Traceback" not in result.stderr


def test_a_plugin_files_relative_imports_are_said_in_its_own_words_and_a_dotted_name_works(tmp_path: Path) -> None:
    """A reviewer's finds: a relative import's typo named the package made for the folder and nothing else,
    an import failing inside a package got advice about the plugin file that did not apply, and a file
    named ``agent.v2.py`` could not import relatively."""
    (tmp_path / "helpers.py").write_text("Y = 2\n")
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "__init__.py").write_text("from inner.core import X\n")  # (fails: not on the path)
    (tmp_path / "inner" / "core.py").write_text("X = 1\n")
    agent = (
        "{imports}\nfrom haip_runtime import Agent, Turn\n\n"
        "class A(Agent):\n    async def on_message(self, turn: Turn) -> None:\n        pass\n"
    )
    (tmp_path / "typo.py").write_text(agent.format(imports="from .helpres import Y"))
    (tmp_path / "deep.py").write_text(agent.format(imports="from .inner import X"))
    (tmp_path / "agent.v2.py").write_text(agent.format(imports="from .helpers import Y"))
    said = []
    for spec in ("typo.py", "deep.py", "agent.v2.py"):
        result = run_cli("check", "--config", str(write(tmp_path, f"[agents.a]\nplugin = '{spec}:A'\n")), cwd=Path("/"))
        said.append(result.stderr.rpartition("ModuleNotFoundError: ")[2].strip() if result.returncode else "ok")
    assert said[0].endswith("(nothing named 'helpres' beside typo.py)")
    assert said[1] == f"No module named 'inner' (at {Path('inner', '__init__.py')}, line 1)" and said[2] == "ok"


def test_may_join_others_takes_a_variables_true_or_false() -> None:
    """A reviewer's find: made strict, it refused the text a ``${VAR}`` gives ("true")."""
    roles = {"roles": {"staff": {"may_join_others": "True"}, "guest": {"may_join_others": "false"}}}
    config = validate_config(roles, base_dir=Path("."))
    assert config.roles["staff"].may_join_others is True and config.roles["guest"].may_join_others is False
