"""Finding the Python objects haip.toml names: agent classes and in-process MCP servers.

A spec is an entry-point name of the caller's group, a built-in name, ``package.module:attr``
(imported with the config file's folder on ``sys.path``) or ``path/to/file.py:attr`` (a file,
relative to that folder, imported with its own folder and the config's on ``sys.path``: it imports
the modules beside it by name, and packages under the config's folder; not relatively, as it is
no package's module). Every failure is one ``PluginError`` line naming the config key. What
the object must be is the caller's check (``agents/registry.py``, ``bridge/inprocess.py``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from haip_runtime.exceptions import PluginError


@dataclass(frozen=True)
class PluginKind:
    """What a kind of plugin is called, where its entry points are, and its built-in names."""

    noun: str
    """How error messages name it: 'agent', 'MCP server'."""
    group: str
    """The entry-point group installed packages register it in."""
    form: str
    """The spec's shape, for messages: 'module:Class', 'module:server'."""
    builtin: Mapping[str, str] = field(default_factory=dict)
    """Names that work before ``pip install`` registers the entry points."""


def resolve(
    spec: str, base_dir: Path, where: str, kind: PluginKind, *, hint: Callable[[Any], str] | None = None
) -> tuple[str, Any]:
    """The ``module:attr`` target `spec` stands for, and the object found there.

    Raises ``PluginError`` (prefixed with `where`, the config key) for an unknown name, a module
    that cannot be found or imported, or a missing attribute (``hint(module)`` says what is there).
    """
    target = _entry_point(spec, kind.group) or kind.builtin.get(spec) or spec
    if ":" not in target and target.endswith(".py"):
        attr = kind.form.partition(":")[2]
        raise PluginError(f"{where}: {spec!r} names a file but not what in it to use: write '{spec}:{attr}'")
    if ":" not in target:
        known = sorted({*kind.builtin, *(ep.name for ep in entry_points(group=kind.group))})
        listed = f" ({', '.join(known)})" if known else ""
        raise PluginError(f"{where}: {spec!r} is neither a known {kind.noun}{listed} nor {kind.form!r}")
    module_name, _, attr = target.partition(":")
    module = _import(module_name, base_dir, where)
    if not hasattr(module, attr):
        more = f" ({hint(module)})" if hint is not None else ""
        raise PluginError(f"{where}: {module_name!r} has no attribute {attr!r}{more}")
    return target, getattr(module, attr)


def _entry_point(name: str, group: str) -> str | None:
    for ep in entry_points(group=group, name=name):
        return str(ep.value)
    return None


def _import(module_name: str, base_dir: Path, where: str) -> Any:
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = (base_dir / module_name).resolve()
            if not path.is_file():
                raise PluginError(f"{where}: no such file: {path}")
            # The modules beside it import by name, and packages under the config's folder (an author's
            # tester found either depended on the agents' order); behind everything else on the path, so a
            # plugin's folder never shadows a package of the same name (``agents/redis.py`` importing redis)
            _importable(path.parent, base_dir, last=True)
            _beside(path, where)
            return _import_file(path)
        _importable(base_dir)
        return importlib.import_module(module_name)
    except PluginError:
        raise
    except Exception as exc:  # an import runs arbitrary plugin code: report any failure in one line
        raise PluginError(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc


def _importable(*folders: Path, last: bool = False) -> None:
    """Put ``folders`` on ``sys.path`` (in this order: ahead of the rest, or ``last`` behind it), unless there."""
    for folder in folders if last else reversed(folders):
        if str(folder) not in sys.path:
            if last:
                sys.path.append(str(folder))
            else:
                sys.path.insert(0, str(folder))


def _beside(path: Path, where: str) -> None:
    """Refuse a plugin file that imports a module beside it by a name that resolves elsewhere: a module
    loaded already from another plugin's folder, or an installed or standard one (its folder comes
    last on the path). It would silently get the other one (a reviewer's find)."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError):
        return  # (the import says so, in its own words)
    imported = {
        alias.name.partition(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {
        node.module.partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
    }
    folder = path.parent.resolve()
    for name in sorted(imported):
        modules = (folder / f"{name}.py", folder / name / "__init__.py")  # (a folder of data is no module)
        beside = [module for module in modules if module.exists() and module != path.resolve()]
        if not beside:
            continue
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = found.origin if found is not None else None
        if origin is not None and not (origin.startswith("/") and Path(origin).resolve().is_relative_to(folder)):
            raise PluginError(
                f"{where}: {path.name} imports {name!r}, which is beside it ({beside[0]}) but is {origin}"
                " for Python (another plugin's, installed or built in): rename yours, or make the folder a"
                " package and name the plugin 'package.module:Class'"
            )


def _import_file(path: Path) -> Any:
    """Import a plugin file once: a second spec naming the same file gets the same module (another file of
    the same name, in another folder, a module of its own)."""
    module_name = f"haip_plugin_{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    if loaded is not None:
        module_name = f"haip_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        loaded = sys.modules.get(module_name)
        if loaded is not None:
            return loaded
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # a broken file is retried, not half-remembered
        raise
    return module
