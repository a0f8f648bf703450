"""haip.toml's options: the frozen pydantic models (``extra="forbid"``) that are their only definition.

Each option's attribute docstring is its reference (``schema.py`` reads them into the JSON Schema).
Reading a file, ``${VAR}`` expansion and error lines are ``loading.py``'s; secret masking is
``masking.py``'s. Every layer above reads its own section's model from here.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from haip_runtime.config.base import ConfigPath, Model, endpoint_port_refused, url_userinfo
from haip_runtime.config.clustering import ClusterConfig
from haip_runtime.config.providers import LlmConfig, SpeechConfig

#: What an agent's name may be: MCP's tool-name characters, and nothing a URL path must escape.
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Environment variables a stdio MCP server inherits unless its config says otherwise.
SAFE_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TMPDIR", "USER")


class ServerConfig(Model):
    host: str = "127.0.0.1"
    """Address to listen on. In `dev` auth mode only loopback addresses are allowed."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port; 0 picks a free one (the chosen port is printed)."""
    workers: int = Field(default=1, ge=1, le=64)
    """Processes `serve` runs on the port, each a node of the cluster: more than 1 needs `[cluster]`.
    `serve --workers N` overrides it."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=4096)
    """Largest accepted envelope (one WebSocket frame / NDJSON line), in bytes."""
    ws_per_message_deflate: bool = False
    """WebSocket compression. Off by default: it costs ~50 KiB per connection and HAIP frames are small."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop: `uvloop` (installed with the runtime on Linux and macOS), `asyncio` (Python's own), or
    `auto`, uvloop where it is installed, else asyncio."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Browser origins (`https://app.example`) allowed to open the WebSocket, besides the server's own
    origin; `*` allows any. Clients that send no `Origin` (non-browser clients) are always allowed.
    Others are refused at the upgrade with HTTP 403."""
    header_timeout_seconds: float = Field(default=10, gt=0)
    """An HTTP connection that has not sent a complete request head (request line and headers) this long
    after it opened, or after its last response, is closed: a slow client cannot hold connections open."""
    body_timeout_seconds: float = Field(default=15, gt=0)
    """A request body (an SSE POST, an AG-UI POST, any request to `/mcp`) that has not fully arrived this
    long after its head is refused (INVALID_MESSAGE)."""
    playground: bool | None = None
    """Serve the browser playground (HTML, CSS, JavaScript) at `/`. Default: on when `host` is a loopback address."""

    @field_validator("event_loop")
    @classmethod
    def _uvloop_installed(cls, value: str) -> str:
        if value == "uvloop":
            try:
                import uvloop  # noqa: F401  (importable, not only found: a broken install fails here, in one line)
            except ImportError as exc:
                raise ValueError(
                    f"'uvloop' cannot be imported here ({exc}; it comes with haip-runtime on Linux and macOS:"
                    " `pip install uvloop`); 'auto' uses it where it is, 'asyncio' is Python's own"
                ) from None
        return value

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
    """Agent turns one session may have running at once; a message past it waits in its transaction's queue."""
    max_queued_messages: int = Field(default=16, ge=0)
    """User messages that may wait in one transaction for a run to end (in order); past it ERROR RUN_LIMIT_EXCEEDED."""
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
    """TRANSACTION_JOIN replays at most this many of the latest events after `since`, and no more than
    half the session's replay window (`session.replay_window_bytes`) holds; older ones are read with
    `GET /haip/transactions/{id}/events` (the reply's `omitted` counts them)."""
    agent_history_messages: int = Field(default=200, ge=1)
    """Messages of the conversation kept for the agents (`turn.history`), newest last."""
    agent_history_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    """...and at most this many bytes of their text (the newest entry is always kept)."""


class StorageConfig(Model):
    backend: Literal["memory", "sqlite", "postgres"] = "memory"
    """`memory`: conversations live in this process only (tests, throwaway runs).
    `sqlite`: transaction logs and metadata in the file at `path`, kept across restarts (one process).
    `postgres`: in the PostgreSQL database at `url`, which several runtime processes and nodes share."""
    path: ConfigPath = Path("haip.db")
    """sqlite: the database file (relative to the config file's folder). The dev auth key is kept
    beside it (`<path>.dev-key`), so a restart does not invalidate the printed token."""
    url: SecretStr | None = None
    """postgres: `postgresql://user:password@host:port/database` (libpq's URL form; `?sslmode=...` and
    the other libpq parameters asyncpg knows are honoured; percent-encode `/ ? # @ :` in the password).
    Use `${PGPASSWORD}`-style references for the password; it is masked wherever the URL is shown."""
    pool_size: int = Field(default=5, ge=2, le=100)
    """postgres: connections this process keeps open at most, shared by its writer and its reads."""
    statement_timeout_seconds: float = Field(default=10, gt=0)
    """postgres: the server cancels any statement of ours running longer than this (a batch then waits
    and is retried, a read answers STORAGE_ERROR): a stuck database never holds the runtime."""
    connect_timeout_seconds: float = Field(default=10, gt=0)
    """postgres: how long opening a connection may take; at start the runtime refuses to start (one
    line) if the database cannot be reached in this time."""
    flush_interval_seconds: float = Field(default=0.05, gt=0, le=5)
    """sqlite, postgres: writes are batched and committed at most this long after they happen. A crash
    loses at most the events of this interval."""
    max_pending_writes: int = Field(default=100_000, ge=1000)
    """sqlite, postgres: writes waiting for the writer; past this the oldest waiting write is dropped and
    logged (only a database far slower than the conversations, or one down for long, gets there)."""

    @model_validator(mode="after")
    def _url_for_postgres(self) -> StorageConfig:
        if self.backend == "postgres":
            if self.url is None:
                raise ValueError("storage.url is required with backend = 'postgres'")
            scheme, separator, _ = self.url.get_secret_value().partition("://")
            if not separator or scheme not in ("postgresql", "postgres"):
                raise ValueError("storage.url must be a postgresql://user:password@host:port/database URL")
            parts = url_userinfo(self.url.get_secret_value())
            found = sorted({character for character in parts[1] if character in "/?#@"}) if parts is not None else []
            if found:  # (named, and its own code: an operator's '@' was told '/ is %2F')
                codes = ", ".join(f"{character} as %{ord(character):02X}" for character in found)
                shown = " ".join(found)
                raise ValueError(f"storage.url: percent-encode {shown} in the user name or password ({codes})")
        return self


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
        if self.jwks_url is not None and (refused := endpoint_port_refused(self.jwks_url)):
            raise ValueError(f"auth.jwks_url: {refused}")
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
    """Open transactions one user may own. At the limit a new one first ends the user's least recently
    active transaction that nobody is in and nothing runs in (its history stays readable); if each is in
    use, TRANSACTION_START gets RATE_LIMITED."""
    members_per_transaction: int = Field(default=50, ge=1)
    """Sessions in one transaction; a join beyond it gets RATE_LIMITED."""
    tool_calls_per_session: int = Field(default=16, ge=1)
    """Direct TOOL_CALLs one session may have in flight; more get RATE_LIMITED."""


def true_or_false(value: object) -> object:
    """A boolean, or the text `true` / `false` (what a `${VAR}` reference gives); anything else is refused
    (pydantic's own bool takes "yes", "on" and 1 too)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError("true or false")  # (the error adds what it got)
    return value


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
    may_join_others: Annotated[bool, BeforeValidator(true_or_false)] = False
    """Whether this role may TRANSACTION_JOIN (and read the history of) transactions other users
    started, given the transaction id. Everyone may join their own. `true` or `false` (also as the
    text a `${VAR}` gives): "yes" granting it was taken as true (an operator's find)."""


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
    speech: str | None = None
    """Name of the `[speech.*]` provider: members' audio is transcribed into their messages, and answers
    to spoken messages are spoken back (AUDIO_CHUNKs)."""
    reply_audio: bool = False
    """Speak every answer of this agent (needs `speech`), not only answers to spoken messages."""
    concurrent_turns: int | None = Field(default=None, ge=0)
    """How many of its turns may run at once in one conversation (more messages wait their turn, in order);
    0: no bound but the session's; unset: the agent class's `concurrent_turns` (1 for most, no bound for
    `echo` and `operator`)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Plugin options, validated by the plugin's own `Options` model."""


def tool_matches(server: str, tool: str, patterns: Iterable[str]) -> bool:
    """Whether ``tool`` of ``server`` matches one of ``patterns`` (``allowed_tools``, ``require_approval``),
    written as the tool's own name or as its full name, ``server.tool``, as members and agents see it (a
    newcomer's find: ``require_approval = ["demo.delete_everything"]`` matched nothing, and it ran unasked)."""
    full = f"{server}.{tool}"
    # A full name only for a pattern with a dot: "read*" must not match every tool of a server named "reader"
    # (allowed_tools is an allow-list: a reviewer's find).
    return any(
        fnmatch.fnmatchcase(tool, pattern) or ("." in pattern and fnmatch.fnmatchcase(full, pattern))
        for pattern in patterns
    )


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
    """Glob patterns of tool names that are exposed (`add`, or `demo.add` with the server's name)."""
    require_approval: list[str] = Field(default_factory=list)
    """Glob patterns of tools that wait for a member's approval before they run (`delete_*`, or
    `demo.delete_*`). A pattern matching none of the server's tools is logged when it connects."""
    connect_timeout_seconds: float = Field(default=30, gt=0)
    """A server gets this long to start, finish the MCP handshake and list its tools; a turn that starts while
    it is making its first connection waits for it at most this long (then its tools are missing)."""
    timeout_seconds: float = Field(default=60, gt=0)
    """A call that takes longer ends with TOOL_DONE ERROR and is cancelled on the server."""
    approval_timeout_seconds: float = Field(default=120, gt=0)
    """How long an approval or elicitation waits for an answer; silence counts as a refusal."""
    max_result_bytes: int = Field(default=1024 * 1024, ge=16 * 1024)
    """A tool result larger than this as JSON reaches members and the model cut, with a note saying how
    much was cut, and is stored cut; the TOOL_DONE frame carrying it stays within this size."""
    protocol_mode: Literal["auto", "legacy", "modern"] = "auto"
    """MCP protocol era, passed to the MCP SDK's client (`auto` probes, then falls back). A `python` server
    speaks the 2026 protocol by direct dispatch unless `legacy`; only `legacy` lets its tools call `ctx.elicit`.
    MCP tasks are the 2025-11-25 protocol's: a server that also speaks 2026-07-28 needs `legacy` for them."""
    use_tasks: bool = False
    """Call tools whose task support is `optional` as MCP tasks too (tools that require tasks always are,
    on a 2025-11-25 connection: see `protocol_mode`)."""

    @field_validator("url")
    @classmethod
    def _url_usable(cls, url: str | None) -> str | None:
        if url is not None and (refused := endpoint_port_refused(url)):
            raise ValueError(refused)
        return url

    @model_validator(mode="after")
    def _transport_fields(self) -> McpServerConfig:
        if self.transport == "stdio" and not self.command:
            raise ValueError("transport 'stdio' needs 'command'")
        if self.transport == "http" and not self.url:
            raise ValueError("transport 'http' needs 'url'")
        if self.transport == "python" and not self.server:
            raise ValueError("transport 'python' needs 'server' (e.g. 'plugins/tools.py:server')")
        # A key of another transport has no effect: refused as an unknown key is (a newcomer's find: `server`
        # under a stdio server was accepted, and did nothing). Given its empty default, it says nothing: taken
        # (a whole config written back, as `check` prints it and the worker processes are sent it).
        own = self.transport
        stray = sorted(key for key, theirs in _KEY_TRANSPORT.items() if theirs != own and getattr(self, key))
        if stray:
            said = ", ".join(f"{key!r} (transport {_KEY_TRANSPORT[key]!r}'s)" for key in stray)
            raise ValueError(f"transport {own!r} takes no {said}")
        return self


#: The keys of one transport only: another's are refused.
_KEY_TRANSPORT = {
    "command": "stdio",
    "args": "stdio",
    "env": "stdio",
    "cwd": "stdio",
    "url": "http",
    "headers": "http",
    "server": "python",
}


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


class McpServerDoorConfig(Model):
    enabled: bool = False
    """Offer the agents as an MCP server (streamable HTTP): each agent a caller may start is a tool."""
    path: str = Field(default="/mcp", pattern=r"^/[A-Za-z0-9/_-]*[A-Za-z0-9_-]$")
    """Where it is served; the same bearer tokens and roles as HAIP."""
    task_ttl_seconds: float = Field(default=3600, gt=0)
    """The longest an agent run called as an MCP task is kept, from its creation (a client may ask for less):
    one still running then is cancelled, and its answer is forgotten."""
    max_tasks_per_user: int = Field(default=20, ge=1)
    """MCP tasks a user holds at once; a new one drops their oldest finished one, or is refused."""


class ObservabilityConfig(Model):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the runtime's loggers."""
    log_format: Literal["console", "json"] = "console"
    """`console` for people, `json` (one object per line) for log collectors."""
    access_log: bool = False
    """One INFO line per HTTP request (`uvicorn.access`: client, method, path, status), a `token` in the
    query shown as `<redacted>`. WebSocket handshakes are logged at INFO either way."""
    metrics: bool = True
    """Serve Prometheus metrics at `GET /metrics` (unauthenticated, like `/health`: bind it to a private
    interface or turn it off where the counts themselves are sensitive)."""
    tracing: Literal["off", "otlp"] = "off"
    """`otlp`: OpenTelemetry traces (one per run: model requests and tool calls) sent over OTLP/HTTP;
    needs the `otel` extra. `off` costs nothing."""
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    """Where traces are sent (an OTLP/HTTP collector's traces URL)."""
    service_name: str = "haip-runtime"
    """The `service.name` of the traces."""
    sampling_ratio: float = Field(default=1.0, ge=0, le=1)
    """The share of runs traced (a client's sampled `traceparent` is always followed)."""


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
    mcp_server: McpServerDoorConfig = Field(default_factory=McpServerDoorConfig)
    """haip-runtime's agents offered to MCP clients (`[mcp_server]`)."""
    llm: dict[str, LlmConfig] = Field(default_factory=dict)
    """LLM providers, by name; agents name theirs with `agents.<name>.llm`."""
    speech: dict[str, SpeechConfig] = Field(default_factory=dict)
    """Speech providers (speech to text, text to speech), by name; agents name theirs with `agents.<name>.speech`."""
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    cluster: ClusterConfig | None = None
    """Several runtime processes sharing conversations through Redis (`[cluster]`); none: one process."""
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    """(Not a key.) The config file's folder."""

    @model_validator(mode="after")
    def _cross_checks(self) -> HaipConfig:
        for name, agent in self.agents.items():
            if not AGENT_NAME.fullmatch(name):
                raise ValueError(
                    f"agents.{name!r}: an agent's name is 1 to 64 letters, digits, '_', '-' or '.', beginning with a"
                    " letter or digit (it is a HAIP toolName, an MCP tool name and a path segment of /ag-ui/<name>)"
                )
            for server in agent.mcp_servers:
                if server not in self.mcp.servers:
                    raise ValueError(f"agents.{name}.mcp_servers names unknown server {server!r}")
            if agent.llm is not None and agent.llm not in self.llm:
                raise ValueError(f"agents.{name}.llm names unknown provider {agent.llm!r} (no [llm.{agent.llm}])")
            if agent.speech is not None and agent.speech not in self.speech:
                raise ValueError(
                    f"agents.{name}.speech names unknown provider {agent.speech!r} (no [speech.{agent.speech}])"
                )
            if agent.reply_audio and agent.speech is None:
                raise ValueError(f"agents.{name}.reply_audio needs agents.{name}.speech")
        if self.cluster is not None and self.storage.backend != "postgres":
            raise ValueError(
                f"[cluster] needs [storage] backend = 'postgres', not {self.storage.backend!r}: every node "
                "reads and writes the one durable log of the conversations they share"
            )
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
