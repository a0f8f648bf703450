"""haip.toml: the models that define every option, and the loader that reads them.

The models are frozen pydantic models with ``extra="forbid"``; their attribute docstrings are the
option reference (``haip-runtime check`` and ``config/haip.schema.json`` come from them). The
loader expands ``${VAR}`` / ``${VAR:-default}`` in strings, resolves relative paths against the
config file's folder, and turns every failure into a one-line ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, model_validator
from pydantic.functional_validators import AfterValidator

from haip_runtime.exceptions import ConfigError

#: Environment variables a stdio MCP server inherits unless its config says otherwise.
SAFE_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TMPDIR", "USER")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


#: A filesystem path; relative values are taken from the config file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ServerConfig(Model):
    host: str = "127.0.0.1"
    """Address to listen on. In `dev` auth mode only loopback addresses are allowed."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port; 0 picks a free one (the chosen port is printed)."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest accepted envelope (one WebSocket frame / NDJSON line), in bytes."""
    ws_per_message_deflate: bool = False
    """WebSocket compression. Off by default: it costs ~50 KiB per connection and HAIP frames are small."""
    playground: bool | None = None
    """Serve the browser playground (HTML, CSS, JavaScript) at `/`. Default: on when `host` is a loopback address."""

    @property
    def serves_playground(self) -> bool:
        return self.playground if self.playground is not None else _is_loopback(self.host)


class SessionConfig(Model):
    replay_window_messages: int = Field(default=1000, ge=1000)
    """Outbound envelopes kept per session for replay and resume (at least 1000)."""
    replay_window_seconds: float = Field(default=300, ge=300)
    """...or all envelopes of the last this-many seconds, whichever holds more (at least 300)."""
    resume_timeout_seconds: float = Field(default=120, gt=0)
    """How long a disconnected session stays resumable."""
    heartbeat_interval_seconds: float = Field(default=20, gt=0)
    """The runtime sends PING this often."""
    heartbeat_timeout_seconds: float = Field(default=20, gt=0)
    """A peer silent this long after a PING is disconnected (its session stays resumable)."""
    max_concurrent_runs: int = Field(default=4, ge=1)
    """Agent turns one session may have running at once; more gets ERROR RUN_LIMIT_EXCEEDED."""
    max_buffered_messages: int = Field(default=1000, ge=16)
    """Envelopes queued for one connection that cannot keep up; past this it is closed with 1013."""
    handshake_timeout_seconds: float = Field(default=10, gt=0)
    """A connection that sends no HAI within this time is closed."""


class FlowControlConfig(Model):
    initial_credit_messages: int = Field(default=1000, ge=2)
    """Envelopes per channel a client may send before the runtime's first FLOW_UPDATE top-up."""
    initial_credit_bytes: int = Field(default=16 * 1024 * 1024, ge=2048)
    """Bytes per channel likewise. The runtime tops both up each time a client has used half."""


class AuthConfig(Model):
    mode: Literal["dev", "jwt"] = "dev"
    """`dev`: the runtime makes a signing key at start and prints a ready token (loopback only).
    `jwt`: bearer JWTs signed with `secret`."""
    algorithms: list[Literal["HS256", "HS384", "HS512"]] = Field(default_factory=lambda: ["HS256"])  # type: ignore[arg-type]
    """Accepted JWT algorithms (pinned; a token with any other `alg` is refused)."""
    secret: SecretStr | None = None
    """HMAC key for `jwt` mode, at least 32 bytes. Use `${HAIP_JWT_SECRET}`."""
    issuer: str | None = None
    """Required `iss` claim, if set."""
    audience: str | None = None
    """Required `aud` claim, if set."""
    leeway_seconds: float = Field(default=30, ge=0)
    """Clock skew tolerated on `exp`, `nbf` and `iat`."""
    roles_claim: str = "roles"
    """JWT claim naming the user's roles (a list, or a space- or comma-separated string)."""
    default_roles: list[str] = Field(default_factory=lambda: ["user"])
    """Roles of a user whose token names none."""

    @model_validator(mode="after")
    def _jwt_needs_a_key(self) -> AuthConfig:
        if self.mode == "jwt":
            if self.secret is None:
                raise ValueError("auth.mode = 'jwt' needs auth.secret")
            if len(self.secret.get_secret_value().encode()) < 32:
                raise ValueError("auth.secret must be at least 32 bytes for HMAC signing")
        return self


class RoleConfig(Model):
    agents: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of agent names this role may start."""
    tools: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of tool names (`server.tool`) this role may see and call, directly or through an
    agent answering this user."""


class AgentConfig(Model):
    plugin: str
    """The agent class: an entry-point name of group `haip_runtime.agents` (e.g. `echo`), or
    `module:Class` / `path/to/file.py:Class`, resolved relative to the config file's folder."""
    description: str | None = None
    """Shown to users in the agent list; defaults to the plugin class's description."""
    mcp_servers: list[str] = Field(default_factory=list)
    """Names of `[mcp.servers.*]` this agent's tools come from."""
    instructions: str | None = None
    """System instructions handed to the agent (for LLM-backed agents)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Plugin options, validated by the plugin's own `Options` model."""


class McpServerConfig(Model):
    transport: Literal["stdio", "http"]
    """`stdio`: a subprocess speaking MCP on stdin/stdout. `http`: streamable HTTP at `url`."""
    command: str | None = None
    """stdio: the program to run. `${HAIP_PYTHON}` is the interpreter running haip-runtime."""
    args: list[str] = Field(default_factory=list)
    """stdio: its arguments."""
    env: dict[str, str] = Field(default_factory=dict)
    """stdio: environment variables for the child, besides `[mcp.stdio] inherit_env`."""
    cwd: ConfigPath | None = None
    """stdio: working directory (default: the config file's folder)."""
    url: str | None = None
    """http: the streamable HTTP endpoint, e.g. `http://127.0.0.1:9000/mcp`."""
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """http: extra request headers (e.g. Authorization); masked in output."""
    allowed_tools: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of tool names (without the server prefix) that are exposed."""
    require_approval: list[str] = Field(default_factory=list)
    """Glob patterns of tools that wait for a member's approval before they run."""
    timeout_seconds: float = Field(default=60, gt=0)
    """A call that takes longer ends with TOOL_DONE ERROR and is cancelled on the server."""
    approval_timeout_seconds: float = Field(default=120, gt=0)
    """How long an approval or elicitation waits for an answer; silence counts as a refusal."""
    protocol_mode: Literal["auto", "legacy", "modern"] = "auto"
    """MCP protocol era, passed to the MCP SDK's client (`auto` probes, then falls back)."""

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("transport 'stdio' needs 'command'")
        if self.transport == "http" and not self.url:
            raise ValueError("transport 'http' needs 'url'")
        return self


class McpStdioConfig(Model):
    allowed_commands: list[str] | None = None
    """If set, a stdio server's `command` must be one of these (after `${...}` expansion)."""
    inherit_env: list[str] = Field(default_factory=lambda: list(SAFE_ENV))
    """Variables of the runtime's environment passed to stdio servers. Never the whole environment."""


class McpConfig(Model):
    servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    """The MCP servers, by name. Tools are shown as `<server>.<tool>`."""
    stdio: McpStdioConfig = Field(default_factory=McpStdioConfig)

    @model_validator(mode="after")
    def _commands_allowed(self) -> McpConfig:
        allowed = self.stdio.allowed_commands
        for name, server in self.servers.items():
            if "." in name:
                raise ValueError(f"server name {name!r} must not contain '.'")
            if allowed is not None and server.transport == "stdio" and server.command not in allowed:
                raise ValueError(f"servers.{name}.command {server.command!r} is not in mcp.stdio.allowed_commands")
        return self


class ObservabilityConfig(Model):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the runtime's loggers."""
    log_format: Literal["console", "json"] = "console"
    """`console` for people, `json` (one object per line) for log collectors."""


class HaipConfig(Model):
    """The whole haip.toml."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    session: SessionConfig = Field(default_factory=SessionConfig)
    flow_control: FlowControlConfig = Field(default_factory=FlowControlConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    """The agents users may start, by name (the name is the HAIP `toolName`)."""
    roles: dict[str, RoleConfig] = Field(default_factory=dict)
    """What each role may do. With no roles configured, every user may use every agent and tool."""
    mcp: McpConfig = Field(default_factory=McpConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    """(Not a key.) The config file's folder."""

    @model_validator(mode="after")
    def _cross_checks(self) -> HaipConfig:
        for name, agent in self.agents.items():
            for server in agent.mcp_servers:
                if server not in self.mcp.servers:
                    raise ValueError(f"agents.{name}.mcp_servers names unknown server {server!r}")
        if self.auth.mode == "dev" and not _is_loopback(self.server.host):
            raise ValueError(
                f"auth.mode = 'dev' may only bind a loopback address, not {self.server.host!r}; use mode = 'jwt'"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- loading ------------------------------------------------------------------------------------

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


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> HaipConfig:
    """Read, expand and validate a haip.toml. Every failure is a one-line ``ConfigError``."""
    file = Path(path)
    shown = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from exc
    environment = {"HAIP_PYTHON": sys.executable, **(os.environ if env is None else env)}
    expanded = _expand_tree(raw, environment, "", shown)
    base_dir = file.resolve().parent
    return validate_config(expanded, base_dir=base_dir, source=shown)


def validate_config(data: dict[str, Any], *, base_dir: Path, source: str = "<config>") -> HaipConfig:
    try:
        return HaipConfig.model_validate({**data, "base_dir": base_dir}, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see config/haip.schema.json)"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif _showable(error.get("input"), loc):
        message = f"{message} (got {_short(error.get('input'))})"
    more = len(exc.errors()) - 1
    suffix = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{loc or '(root)'}: {message}{suffix}"


def _showable(value: object, loc: str) -> bool:
    """Echo a bad value only if it is a scalar and cannot be a secret."""
    secretish = any(word in loc.lower() for word in ("secret", "key", "token", "password", "header"))
    return isinstance(value, str | int | float | bool) and not secretish


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def masked_dump(config: HaipConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets shown as ``**********``."""
    data: dict[str, Any] = config.model_dump(mode="json", exclude={"base_dir"})
    return data


def json_schema() -> dict[str, Any]:
    schema = HaipConfig.model_json_schema(mode="validation")
    schema["properties"].pop("base_dir", None)
    schema["title"] = "haip.toml"
    return schema
