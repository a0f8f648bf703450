"""Reading haip.toml: TOML, ``${VAR}`` / ``${VAR:-default}`` expansion, validation against ``HaipConfig``.

Relative paths are taken from the config file's folder (the models resolve them with the
``base_dir`` this passes). Every failure becomes one ``ConfigError`` line: file, key path, what was
expected, and the bad value only when it cannot be a secret.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from haip_runtime.config.models import HaipConfig
from haip_runtime.exceptions import ConfigError

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, env: Mapping[str, str], where: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} for a default)")

    return _VAR.sub(substitute, value)


def _expand_tree(value: Any, env: Mapping[str, str], path: str, file: str) -> Any:
    if isinstance(value, str):
        return expand(value, env, f"{file}: {path or '(root)'}")
    if isinstance(value, dict):
        return {k: _expand_tree(v, env, f"{path}.{k}" if path else k, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_tree(v, env, f"{path}[{i}]", file) for i, v in enumerate(value)]
    return value


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, only: Collection[str] | None = None
) -> HaipConfig:
    """Read, expand and validate a haip.toml. Every failure is a one-line ``ConfigError``. ``only``: the
    top-level sections to read (the others take their defaults, their ``${VARS}`` not needed): for a
    command that needs a few, such as ``token``."""
    file = Path(path)
    shown = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    return validate_config(read_toml(text, shown, env, only=only), base_dir=file.resolve().parent, source=shown)


def read_toml(
    text: str, source: str, env: Mapping[str, str] | None = None, *, only: Collection[str] | None = None
) -> dict[str, Any]:
    """The TOML ``text`` parsed and expanded (``${HAIP_PYTHON}`` is this interpreter), not yet validated;
    ``only``: these top-level sections alone."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    if only is not None:
        raw = {section: value for section, value in raw.items() if section in only}
    environment = {"HAIP_PYTHON": sys.executable, **(os.environ if env is None else env)}
    expanded: dict[str, Any] = _expand_tree(raw, environment, "", source)
    return expanded


def validate_config(data: dict[str, Any], *, base_dir: Path, source: str = "<config>") -> HaipConfig:
    """``data`` (expanded already) as the config of a file in ``base_dir``; a failure is one ``ConfigError`` line."""
    if "base_dir" in data:  # (the loader's own: the config file's folder, never the file's to set)
        raise ConfigError(f"{source}: base_dir: unknown key (it is the config file's own folder)")
    try:
        return HaipConfig.model_validate({**data, "base_dir": base_dir}, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [f"{source}: {_describe(error, data)}" for error in exc.errors()]
        more = len(problems) - 1
        suffix = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(problems[0] + suffix, problems) from exc


def _written(loc: tuple[int | str, ...], data: Any) -> str:
    """The key path of an error as written in the file: without the tags pydantic adds for a
    union member (``llm.local.local.max_tokens`` is ``llm.local.max_tokens`` in the file)."""
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in node.values():
            continue  # not a key of the file: the tag of the union member (`kind = "local"`)
        else:
            node = None  # a missing key: the rest of the path is below it
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(parts).replace(".[", "[")


def _describe(error: ErrorDetails, data: Any = None) -> str:
    loc = _written(error["loc"], data) if data is not None else ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(error["loc"][:-1]), n=1, cutoff=0.6)
        guess = f"did you mean {near[0]!r}? " if near else ""
        message = f"unknown key ({guess}check the spelling; `haip-runtime schema` prints every key)"
    elif error["type"] == "missing":
        message = "required key is missing"
    else:
        message += got(error.get("input"), loc)
    if loc and message.startswith(f"{loc}."):
        return message  # a table's check that names its key itself ("storage.url ..."): not "storage: storage.url"
    return f"{loc}: {message}" if loc else message


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model at ``loc`` takes (a best effort through tables, ``[name]`` maps, lists and a
    union tagged by ``kind``: an unknown key's neighbours, for a "did you mean"); ``[]`` where it cannot
    tell. It never fails: a config error is said whatever this finds."""
    try:
        return _keys_at(list(loc))
    except Exception:  # (a hint, not worth a traceback)
        return []


def _keys_at(parts: list[int | str]) -> list[str]:
    model: Any = HaipConfig
    while parts:
        fields = getattr(model, "model_fields", None)
        part = parts.pop(0)
        if fields is None or part not in fields:
            return []
        model = _item(fields[part].annotation, parts)
    fields = getattr(model, "model_fields", None)
    return [] if fields is None else [field.alias or name for name, field in fields.items() if not field.exclude]


def _item(annotation: Any, parts: list[int | str]) -> Any:
    """The model of a field's value: through ``Annotated``, tables and lists (taking the item's name or
    index off ``parts``), and a union's member named by the next part (pydantic's tag: ``kind``)."""
    while True:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (dict, list) and args:
            annotation = args[-1]
            if parts:
                parts.pop(0)
        elif origin in (typing.Union, types.UnionType) and len(real := [a for a in args if a is not type(None)]) == 1:
            annotation = real[0]  # (an optional table: ``X | None``)
        elif origin in (typing.Union, types.UnionType):
            tag = parts[0] if parts else None
            members = [member for member in args if tag in _kinds(member)]
            if len(members) != 1:
                return None
            parts.pop(0)
            return members[0]
        else:
            return annotation


def _kinds(model: Any) -> tuple[Any, ...]:
    """The values of a model's ``kind`` (a ``Literal``): the tags that name it in a union."""
    field = getattr(model, "model_fields", {}).get("kind")
    return typing.get_args(field.annotation) if field is not None else ()


def got(value: object, loc: str) -> str:
    """`` (got <value>)`` to end a refusal of ``value`` at ``loc`` with, when it may be shown; else ''."""
    return f" (got {_short(value)})" if _showable(value, loc) else ""


def _showable(value: object, loc: str) -> bool:
    """Echo a bad value only if it is a scalar and cannot be a secret (a URL may carry a password)."""
    secretish = any(word in loc.lower() for word in ("secret", "key", "token", "password", "header", "url"))
    return isinstance(value, str | int | float | bool) and not secretish


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
