"""Finding the Python objects haip.toml names: agent classes and in-process MCP servers.

A spec is an entry-point name of the caller's group, a built-in name, ``package.module:attr``
(imported with the config file's folder on ``sys.path``) or ``path/to/file.py:attr`` (a file,
relative to that folder, imported as a module of a package made for its folder: it imports the
modules beside it relatively; nothing goes on ``sys.path``). Every failure is
one ``PluginError`` line naming the config key. What the object must be is the caller's check
(``agents/registry.py``, ``bridge/inprocess.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import re
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
    path: Path | None = None
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = (base_dir / module_name).resolve()
            if not path.is_file():
                raise PluginError(f"{where}: no such file: {path}")
            return _import_file(path)
        if str(base_dir) not in sys.path:
            sys.path.insert(0, str(base_dir))
        return importlib.import_module(module_name)
    except PluginError:
        raise
    except Exception as exc:  # an import runs arbitrary plugin code: report any failure in one line
        hint = _import_hint(exc, path, base_dir) or _place(exc, base_dir)
        raise PluginError(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}{hint}") from exc


def _import_file(path: Path) -> Any:
    """Import a plugin file once (a second spec naming the same file gets the same module), as a module of
    a package made for its folder: what is beside it imports relatively (``from .helpers import X``), each
    folder its own (two plugin folders with a ``helpers.py`` each never share one), and nothing of it goes
    on ``sys.path`` (a file named like a module, ``statistics.py``, never shadows that module for the rest
    of the server). Found by an author's tester and three reviewers: each way of putting a plugin's folder
    on ``sys.path`` had a proved fault. The folder's own ``__init__.py`` does not run: for a package, name
    the plugin ``package.module:Class``."""
    package = f"haip_plugin_{hashlib.sha1(os.fsencode(path.parent)).hexdigest()[:12]}"
    stem = re.sub(r"\W", "_", path.stem)  # (``agent.v2.py``: no dot in a module's own name)
    module_name = f"{package}.{stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    if package not in sys.modules:
        folder = importlib.machinery.ModuleSpec(package, None, is_package=True)
        folder.submodule_search_locations = [str(path.parent)]
        sys.modules[package] = importlib.util.module_from_spec(folder)
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


def _import_hint(exc: Exception, path: Path | None, base_dir: Path) -> str:
    """For a plugin file that imports by name a module beside it, or a package under the config's folder:
    how to write it."""
    name = getattr(exc, "name", None)
    if path is None or not isinstance(exc, ModuleNotFoundError) or not name or _failed_in(exc) != str(path):
        return ""  # (only for the file's own imports: one failing inside a package it imports is the package's)
    top = str(name).partition(".")[0]
    if top.startswith("haip_plugin_"):  # a relative import (the package made for the file's folder)
        return f" (nothing named {str(name).partition('.')[2]!r} beside {path.name})"

    def module_in(folder: Path) -> bool:
        return (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()

    if module_in(path.parent):
        return f" (a plugin file imports what is beside it relatively: 'from .{top} import ...')"
    if module_in(base_dir):
        return (
            f" ({top!r} is in the config's folder: a plugin named 'module:Class' imports it by name, a plugin"
            " file imports what is beside it relatively)"
        )
    return ""


def _failed_in(exc: BaseException) -> str | None:
    """The file whose code raised ``exc`` last (the import machinery's own frames left out)."""
    found = _failed_at(exc)
    return None if found is None else found[0]


def _failed_at(exc: BaseException) -> tuple[str, int] | None:
    """The file and line whose code raised ``exc`` last (the import machinery's own frames left out: its
    frozen ones, ``importlib``'s and this module's, which a module not found named, a newcomer's find)."""
    found = None
    trace = exc.__traceback__
    machinery = (os.path.dirname(importlib.__file__) + os.sep, __file__)
    while trace is not None:
        filename = trace.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen") and not filename.startswith(machinery):
            found = (filename, trace.tb_lineno)
        trace = trace.tb_next
    return found


def _place(exc: BaseException, base_dir: Path) -> str:
    """Where the import failed, when that is not said already (a SyntaxError names its file and line): a
    plugin importing a broken module beside it would otherwise name only the plugin (an author's find)."""
    found = _failed_at(exc)
    if found is None or isinstance(exc, SyntaxError):
        return ""
    filename, line = found
    shown = Path(filename)
    with contextlib.suppress(ValueError):
        shown = shown.relative_to(base_dir.resolve())
    return f" (at {shown}, line {line})"
