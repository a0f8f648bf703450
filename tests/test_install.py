"""The package as a user installs it: the wheel, in a fresh venv in a temporary folder with no checkout
around, runs ``init`` and ``serve`` and answers.

The wheel is built once from a copy of the sources (building writes ``build/`` and ``*.egg-info``,
which must not land in the checkout) with the build tools already installed (no network). The
fresh venv gets the wheel itself; its dependencies, which this machine has no index for offline,
come from the test's own environment through a ``.pth`` line, and the test checks that
``haip_runtime`` is imported from the fresh venv, not from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import ROOT, serve_process

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "haip_runtime")


@dataclass
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "haip-runtime"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    quiet = {"capture_output": True, "text": True, "timeout": 300, "check": True}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(dist), str(source)], **quiet
    )  # type: ignore[call-overload]
    (wheel,) = dist.glob("haip_runtime-*.whl")
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)  # type: ignore[call-overload]
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], **quiet)  # type: ignore[call-overload]
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        **quiet,  # type: ignore[call-overload]
    ).stdout.strip()
    # The dependencies only: a path line in a .pth file is not a site dir, so the checkout's editable
    # install (itself a .pth there) is not followed, and the venv's own site-packages comes first.
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return Installed(wheel, venv, env)


def test_the_wheel_carries_the_license_the_defaults_the_starter_and_the_playground(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "haip_runtime-0.1.0.dist-info/licenses/LICENSE" in names
    assert {
        "haip_runtime/demo/haip.toml",
        "haip_runtime/demo/storyteller.py",
        "haip_runtime/demo/mcp_server.py",
        "haip_runtime/demo/starter/haip.toml",
        "haip_runtime/demo/starter/plugins/greeter.py.tmpl",
        "haip_runtime/server/playground/index.html",
        "haip_runtime/py.typed",
    } <= names


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed, tmp_path: Path) -> None:
    where = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import haip_runtime; print(haip_runtime.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
        env=installed.env,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.venv) and not Path(where).is_relative_to(ROOT)


async def _say(banner: dict[str, str], agent: str, text: str, answer_part: str, tool: str | None = None) -> str:
    """Say ``text`` to ``agent`` (once ``tool`` is listed: MCP servers connect after the banner);
    its first whole answer containing ``answer_part``."""
    async with HaipClient(banner["WebSocket"].split()[0], token=banner["token"]) as client:

        def text_of(message_id: object) -> str:
            parts = (e for e in client.received if e.type == "MESSAGE_PART" and e.get("message_id") == message_id)
            return "".join(str(e.get("text")) for e in parts)

        tx = await client.start_transaction(agent)
        if tool is not None:
            await client.wait_for(
                lambda e: e.type == "TOOL_LIST" and tool in {t["name"] for t in e.get("tools")}, timeout=30
            )
        await client.send_text(tx, text)
        end = await client.wait_for(
            lambda e: e.type == "MESSAGE_END" and answer_part in text_of(e.get("message_id")), timeout=30
        )
        return text_of(end.get("message_id"))


def test_init_then_serve_in_an_empty_folder_talks_to_the_starter_agent(installed: Installed, tmp_path: Path) -> None:
    made = subprocess.run(
        [installed.command, "init", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=installed.env,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[-1].startswith("next: cd hello && haip-runtime serve")
    project = tmp_path / "hello"
    with serve_process([str(installed.command), "serve", "--port", "0"], cwd=project, env=installed.env) as served:
        assert served.lines[0].startswith("haip-runtime listening on http://127.0.0.1:")
        assert served.banner["agents"] == "greeter, echo"
        answer = anyio.run(_say, served.banner, "greeter", "three small words", "word(s).", "notes.count_words")
    assert answer == "Hello, dev! Your message has 3 word(s)."


def test_serve_with_no_config_runs_the_embedded_defaults(installed: Installed, tmp_path: Path) -> None:
    with serve_process([str(installed.command), "serve", "--port", "0"], cwd=tmp_path, env=installed.env) as served:
        assert served.lines[0].startswith("haip-runtime: no haip.toml here: running the embedded defaults")
        assert "storyteller" in served.banner["agents"] and "operator" in served.banner["agents"]
        answer = anyio.run(_say, served.banner, "storyteller", "a kettle", "The end.")
    assert answer.startswith("Once upon a time, someone said 'a kettle'.")
