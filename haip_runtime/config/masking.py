"""Secrets out of sight: the effective config with secrets masked, and the values a log redactor hides.

Masked: every ``SecretStr`` (a database URL shows all but its password), MCP servers' ``env``
values, the password of their ``url`` and its query values named like secrets, their ``args`` that
follow or carry a flag named like one (``--api-key X``, ``--token=X``), agent options whose key looks like a
secret and the password in ``cluster.redis_url``.
``haip-runtime check`` prints ``masked_dump``; the log redactor is given ``secret_values``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from haip_runtime.config.base import MASK, endpoint_userinfo, masked_url, password_masked, url_password
from haip_runtime.config.models import HaipConfig

__all__ = ["MASK", "masked_dump", "masked_endpoint", "masked_url", "secret_values"]

_SECRETISH = re.compile(r"secret|key|token|password|passwd|credential|auth", re.IGNORECASE)


def masked_dump(config: HaipConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets shown as ``**********``.

    Masked: every ``SecretStr`` (auth.secret, MCP headers), every MCP server's ``env`` value (an
    environment is where API keys are handed to stdio servers), and any value in agent
    ``options`` whose key looks like a secret (``api_key``, ``token``, ...).
    """
    data: dict[str, Any] = config.model_dump(mode="json", exclude={"base_dir"})
    if config.storage.url is not None:
        data["storage"]["url"] = masked_url(config.storage.url.get_secret_value())
    for server in data["mcp"]["servers"].values():
        server["env"] = dict.fromkeys(server["env"], MASK)
        server["args"] = _masked_args(server["args"])
        if server.get("url"):
            server["url"] = masked_endpoint(server["url"])
    for agent in data["agents"].values():
        agent["options"] = _mask_secretish(agent["options"])
    if config.cluster is not None:
        data["cluster"]["redis_url"] = config.cluster.masked_url
    if config.auth.jwks_url is not None:  # (an operator's find: its ?api_key= was printed, and logged)
        data["auth"]["jwks_url"] = masked_endpoint(config.auth.jwks_url)
    return data


def secret_values(config: HaipConfig) -> list[str]:
    """Every value ``masked_dump`` hides, for the log redactor."""
    found: list[str] = []
    if config.auth.secret is not None:
        found.append(config.auth.secret.get_secret_value())
    if config.storage.url is not None:
        password = url_password(config.storage.url.get_secret_value())
        found += [password] if password else []
    for server in config.mcp.servers.values():
        found += [value.get_secret_value() for value in server.headers.values()]
        found += list(server.env.values())
        args = list(getattr(server, "args", []))
        found += [args[index] for index in _secret_args(args)]
        found += [arg.partition("=")[2] for arg in args if _mask_flag_value(arg) != arg]
        if url := getattr(server, "url", None):
            found += _endpoint_secrets(url)
    if config.auth.jwks_url is not None:
        found += _endpoint_secrets(config.auth.jwks_url)
    for agent in config.agents.values():
        found += _secretish_values(agent.options)
    if config.cluster is not None and config.cluster.redis_password:
        found.append(config.cluster.redis_password)
    return found


#: Words of a flag's or a query parameter's name that say its value is a secret (``--api-key``,
#: ``?access_token=``), matched whole: ``--author`` and ``--no-auth`` are not secrets, nor their values.
_SECRET_WORDS = frozenset(
    {"secret", "key", "apikey", "token", "password", "passwd", "pass", "pwd", "credential", "credentials", "sig"}
)


#: ...and those that do so in a URL's query only: ``?code=`` carries Azure Functions' key, ``?sig=`` and
#: ``?signature=`` a signed URL's (a ``--code`` flag, by contrast, names a file or a language).
_QUERY_SECRET_WORDS = _SECRET_WORDS | {"code", "signature", "sas"}


def _names_a_secret(name: str, words: frozenset[str] = _SECRET_WORDS) -> bool:
    return any(word in words for word in re.split(r"[^a-z0-9]+", name.lower()))


def _names_a_query_secret(name: str) -> bool:
    return _names_a_secret(name, _QUERY_SECRET_WORDS)


def _endpoint_secrets(url: str) -> list[str]:
    """The secrets in an endpoint's URL: its password, and the values of query parameters named as secrets."""
    parts = endpoint_userinfo(url)
    password = parts[1].partition(":")[2] if parts is not None else ""
    query = parse_qs(urlsplit(url).query)
    secret = [value for key, values in query.items() if _names_a_query_secret(key) for value in values if value]
    return [password, *secret] if password else secret


def masked_endpoint(url: str) -> str:
    """An endpoint's URL (an MCP server's, the JWKS) with its password, and the values of query parameters
    whose names say they are secrets (``?api_key=...`` is common), masked."""
    shown = password_masked(url, endpoint_userinfo(url))
    head, question, query = shown.partition("?")
    if not question:
        return shown
    query, hash_, fragment = query.partition("#")
    pairs = [pair.partition("=") for pair in query.split("&")]
    masked = "&".join(
        f"{key}={MASK}" if equals and _names_a_query_secret(key) else f"{key}{equals}{value}"
        for key, equals, value in pairs
    )
    return f"{head}?{masked}{hash_}{fragment}"


def _is_secret_flag(arg: str) -> bool:
    return arg.startswith("-") and _names_a_secret(arg.partition("=")[0])


def _secret_args(args: list[str]) -> set[int]:
    """Indexes of the arguments that follow a flag like ``--api-key`` (its value, given apart)."""
    return {index + 1 for index, arg in enumerate(args[:-1]) if _is_secret_flag(arg) and "=" not in arg}


def _masked_args(args: list[str]) -> list[str]:
    hidden = _secret_args(args)
    return [MASK if index in hidden else _mask_flag_value(arg) for index, arg in enumerate(args)]


def _mask_flag_value(arg: str) -> str:
    """``--token=X`` as ``--token=**********``; any other argument as it is."""
    return f"{arg.partition('=')[0]}={MASK}" if _is_secret_flag(arg) and "=" in arg else arg


def _secretish_values(value: Any, secretish: bool = False) -> list[str]:
    if isinstance(value, dict):
        return [
            found
            for key, item in value.items()
            for found in _secretish_values(item, secretish or bool(_SECRETISH.search(key)))
        ]
    if isinstance(value, list):
        return [v for item in value for v in _secretish_values(item, secretish)]
    return [value] if secretish and isinstance(value, str) else []


def _mask_secretish(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: MASK if _SECRETISH.search(key) and item is not None else _mask_secretish(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_mask_secretish(item) for item in value]
    return value
