"""``haip-runtime``: serve, check a config, issue a token, write the config schema, start a project.

Every failure the operator can fix is one line on stderr and exit code 1; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from haip_runtime.config import HaipConfig, json_schema, load_config, masked_dump, secret_values
from haip_runtime.exceptions import ConfigError, PluginError

DEFAULT_CONFIG = "haip.toml"
DESCRIPTION = (
    "Host LLM agent plugins, bridge them to MCP servers and show people what they do, over HAIP. "
    "Without --config, each command reads ./haip.toml, or the embedded defaults when there is none."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:  # one line per problem (the schema's), then how many
        _say_problems(exc.problems)
        return 1
    except PluginError as exc:  # naming the file, as a config error does
        source = getattr(args, "config", None)
        _say_problems([f"{source}: {problem}" if source else problem for problem in exc.problems])
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _say_problems(problems: list[str]) -> None:
    """One line per problem on stderr, then how many when there are several."""
    for problem in problems:
        print(f"haip-runtime: {problem}", file=sys.stderr)
    if len(problems) > 1:
        print(f"haip-runtime: {len(problems)} problem(s)", file=sys.stderr)


def _version() -> str:
    try:
        return version("haip-runtime")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haip-runtime", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"haip-runtime {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    serve = command("serve", "run the server: the WebSocket, SSE and stream doors, REST history and the playground")
    _config_arg(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0 picks a free port)")
    serve.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="override server.workers: N processes on the port, each a node of the cluster (N > 1 needs [cluster])",
    )
    serve.set_defaults(func=_serve)

    init = command("init", "write a starter project: haip.toml, an agent, a tool module, their tests, .gitignore")
    init.add_argument("folder", nargs="?", default=".", type=Path, help="where to write it (default: here)")
    init.set_defaults(func=_init)

    check = command(
        "check",
        "validate a config, load its plugins, look for commands, model and key files that are missing,"
        " and print it with secrets masked",
    )
    _config_arg(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach what the config names (MCP servers, LLMs, the store, Redis, the JWKS), a line each",
    )
    check.add_argument("--timeout", type=float, default=30, help="seconds to wait with --connect (default: 30)")
    check.set_defaults(func=_check)

    migrate = command("migrate", "bring a PostgreSQL store's schema up to date, and exit (serve does it too, first)")
    _config_arg(migrate)
    migrate.set_defaults(func=_migrate)

    token = command(
        "token", "issue a token signed with auth.secret, or in dev mode with this runtime's dev key (any user, roles)"
    )
    _config_arg(token)
    token.add_argument("--user", default="operator", help="the token's subject (default: operator)")
    token.add_argument("--ttl", type=float, default=12 * 3600, help="lifetime in seconds")
    token.add_argument("--roles", help="comma-separated roles, put in the auth.roles_claim claim (e.g. user,admin)")
    token.set_defaults(func=_token)

    tools = command("tools", "connect every MCP server of a config and list its state and tools")
    _config_arg(tools)
    tools.add_argument("--timeout", type=float, default=30, help="seconds to wait for the servers (default: 30)")
    tools.set_defaults(func=_tools)

    chat = command("chat", "talk to an agent of a running server from this terminal")
    chat.add_argument("url", help="e.g. ws://127.0.0.1:8080/haip/websocket")
    chat.add_argument("--token", help="bearer token (printed by `serve` in dev mode)")
    chat.add_argument("--agent", help="agent to talk to (default: echo, or the server's first agent)")
    chat.add_argument("--join", metavar="ID", help="join this conversation (see /history) instead of starting one")
    chat.add_argument(
        "--reconnect", type=float, default=60, help="seconds to keep trying to resume a dropped link (default: 60)"
    )
    chat.set_defaults(func=_chat)

    schema = command("schema", "print (or write) the JSON Schema of haip.toml")
    schema.add_argument("--output", type=Path, help="write it to this file")
    schema.set_defaults(func=_schema)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers from 1 to 64")
    return value


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="path to haip.toml (default: ./haip.toml, else the embedded defaults)")


def _load(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> HaipConfig:
    """The config named by --config, else ./haip.toml, else the embedded defaults (said on stderr);
    ``only``: the sections of a file to read (``load_config``)."""
    config, note = _resolve(args, only)
    if note:
        print(note, file=sys.stderr)
    return config


def _resolve(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> tuple[HaipConfig, str]:
    """The config and, for the embedded defaults, the line that says so; sets ``args.config`` for messages."""
    if args.config is not None or Path(DEFAULT_CONFIG).exists():
        args.config = args.config or DEFAULT_CONFIG
        return load_config(args.config, only=only), ""
    from haip_runtime.starter import EMBEDDED, embedded_config

    config, dropped = embedded_config(Path.cwd())
    args.config = EMBEDDED
    return config, (
        f"haip-runtime: no {DEFAULT_CONFIG} here: running the embedded defaults{dropped}"
        f" (haip-runtime init writes a {DEFAULT_CONFIG} to edit)"
    )


def _init(args: argparse.Namespace) -> int:
    from haip_runtime.starter import init

    folder: Path = args.folder
    written = init(folder)
    for path in written:
        print(f"  wrote {path}")
    where = "" if folder.resolve() == Path.cwd() else f"cd {folder} && "
    # (pytest comes with no extra of ours: a newcomer's find, "No module named pytest" in a fresh venv)
    print(f"next: {where}haip-runtime serve   (and: python -m pip install pytest && python -m pytest plugins)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from haip_runtime.agents.registry import load_agents

    config = _load(args)
    agents = load_agents(config)
    if any(server.transport == "python" for server in config.mcp.servers.values()):
        from haip_runtime.bridge.inprocess import load_servers

        load_servers(config)
    from haip_runtime.preflight import notes, problems

    found = [f"haip-runtime: {args.config}: {line}" for line in problems(config)]
    print(json.dumps(masked_dump(config), indent=2))
    for line in found:
        print(line, file=sys.stderr)
    for line in notes(config):
        print(f"haip-runtime: {args.config}: note: {line}", file=sys.stderr)
    if args.connect:
        found += _connect(config, args.timeout)
    if found:
        print(f"haip-runtime: {args.config}: {len(found)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"ok: {args.config} is valid ({len(agents)} agent(s), {len(config.mcp.servers)} MCP server(s))", file=sys.stderr
    )
    return 0


def _connect(config: HaipConfig, timeout: float) -> list[str]:
    """``check --connect``: each MCP server and LLM endpoint reached, one line each; the failed ones."""
    import logging

    import anyio

    from haip_runtime.preflight import connect

    logging.disable(logging.CRITICAL)  # the lines say it all (in-process servers and HTTP clients log too)
    failed = []
    results = anyio.run(connect, config, timeout)  # (the stdio servers' stderr: only a failed one's last lines)
    for ok, line in results:
        print(f"{'note' if ok is None else 'reached' if ok else 'failed'}: {line}", file=sys.stderr)
        if ok is False:
            failed.append(line)
    return failed


def _migrate(args: argparse.Namespace) -> int:
    """For operators who migrate with an owner role and serve with a least-privilege one (docs/postgres.md)."""
    import anyio

    from haip_runtime.config.base import masked_url
    from haip_runtime.store import postgres
    from haip_runtime.store.migrations import LATEST

    storage = _load(args).storage
    if storage.backend != "postgres" or storage.url is None:
        raise ConfigError(
            f"{args.config}: storage.backend is {storage.backend!r}: only a PostgreSQL store is migrated"
            " (a SQLite file gets its schema when it is opened)"
        )
    before = anyio.run(functools.partial(postgres.preflight, storage, claim=False))
    where = masked_url(storage.url.get_secret_value())
    change = "already current" if before == LATEST else f"migrated from {before}"
    print(f"haip-runtime: {where}: schema version {LATEST} ({change})")
    return 0


def _token(args: argparse.Namespace) -> int:
    from haip_runtime.auth.tokens import Authenticator
    from haip_runtime.server.app import dev_key

    # What signing needs, not the rest: a node's config reads ${HAIP_REDIS_URL} and the like (a tester).
    config = _load(args, only=("auth", "roles"))
    if config.auth.mode == "dev" and Path(args.config).is_file():  # its key is kept beside the store
        config, _ = _resolve(args, only=("auth", "roles", "storage"))
    key = None
    if config.auth.mode == "dev":
        if config.storage.backend == "memory":
            raise ConfigError(
                f"{args.config}: storage.backend: dev mode keeps its key beside a durable store; with"
                " backend = 'memory' each start makes a new key: use the token `serve` prints"
            )
        key = dev_key(config.storage)
    claims: dict[str, list[str]] = {}
    if args.roles is not None:
        roles = [role.strip() for role in args.roles.split(",") if role.strip()]
        unknown = [role for role in roles if config.roles and role not in config.roles]
        if unknown:
            raise ConfigError(f"{args.config}: roles: no [roles.{unknown[0]}] in this config")
        claims[config.auth.roles_claim] = roles
    print(Authenticator(config.auth, dev_key=key).issue(args.user, ttl_seconds=args.ttl, **claims))
    if key is not None:
        print(
            "haip-runtime: a dev-mode token: it works only with this runtime's dev key"
            f" ({config.storage.path}.dev-key), on loopback",
            file=sys.stderr,
        )
    return 0


def _tools(args: argparse.Namespace) -> int:
    config = _load(args)
    if not config.mcp.servers:
        print(f"{args.config} declares no MCP servers ([mcp.servers.<name>])", file=sys.stderr)
        return 0
    import logging

    import anyio

    logging.getLogger("haip_runtime").setLevel(logging.CRITICAL)  # the table says it all (and the servers'
    logging.basicConfig(handlers=[logging.NullHandler()])  # stderr: only a failed one's last lines), nor may
    return anyio.run(_list_tools, config, args.timeout)  # in-process servers' own logging


async def _list_tools(config: HaipConfig, timeout: float) -> int:
    import anyio.to_thread

    from haip_runtime.bridge import McpBridge, ServerState

    async with McpBridge(config.mcp.servers, config.mcp.stdio, base_dir=config.base_dir) as bridge:
        await bridge.wait_settled(timeout)
        statuses = bridge.status()
    rows = [("SERVER", "TRANSPORT", "STATE", "TOOLS", "ERROR")]
    for name, status in statuses.items():
        transport = config.mcp.servers[name].transport
        error = "" if status.state is ServerState.CONNECTED else await anyio.to_thread.run_sync(bridge.failure, status)
        rows.append((name, transport, status.state.value, str(len(status.tools)), error))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4]).rstrip())
    for status in statuses.values():
        if status.tools:
            print(f"\n{status.name}:")
            width = max(len(tool.full_name) for tool in status.tools)
            for tool in status.tools:
                summary = (tool.description or "").splitlines()[0] if tool.description else ""
                task = _task_mark(tool.task_support, config.mcp.servers[status.name].use_tasks)
                print(f"  {tool.full_name.ljust(width)}  {task}{summary}")
    failed = [s.name for s in statuses.values() if s.state is not ServerState.CONNECTED]
    if failed:
        print(f"\nhaip-runtime: not connected: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _task_mark(support: str, use_tasks: bool) -> str:
    """``[task]`` before a tool called as an MCP task (it requires tasks, or allows them and ``use_tasks``)."""
    if support == "required" or (support == "optional" and use_tasks):
        return "[task] "
    return "[task optional] " if support == "optional" else ""


def _chat(args: argparse.Namespace) -> int:
    import anyio

    from haip_runtime.exceptions import ClientError

    try:
        from haip_runtime.client.chat import chat
    except ModuleNotFoundError as exc:  # prompt-toolkit or rich: the `chat` extra
        needs = f"chat needs the chat extra ({exc.name} is missing): pip install 'haip-runtime[chat]'"
        print(f"haip-runtime: {needs}", file=sys.stderr)
        return 2

    try:
        anyio.run(chat, args.url, args.token, args.agent, args.reconnect, args.join)
    except ClientError as exc:
        # (a newcomer's find: "no credentials" said nothing of where a token comes from)
        tokenless = exc.code == "AUTHENTICATION_FAILED" and not args.token and "token=" not in args.url
        hint = "; pass one with --token (serve prints one in dev mode)" if tokenless else ""
        print(f"haip-runtime: {exc}" + (f" ({exc.code})" if exc.code else "") + hint, file=sys.stderr)
        return 1
    return 0


def _schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config, note = _resolve(args)
    if note:  # the first line of the banner: what is running is not a file the user can see
        print(note, flush=True)
    overrides: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        data = config.model_dump()
        data["server"].update(overrides)
        from haip_runtime.config import validate_config

        config = validate_config(data, base_dir=config.base_dir, source=args.config)
    workers = args.workers or config.server.workers
    refusal = _workers_refusal(config, workers, "--workers" if args.workers else f"{args.config}: server.workers =")
    if refusal:
        print(f"haip-runtime: {refusal}", file=sys.stderr)
        return 2
    return serve(config, workers)


def _workers_refusal(config: HaipConfig, workers: int, named: str) -> str:
    """Why ``workers`` processes cannot serve ``config``: each would hold conversations of its own."""
    if workers == 1:
        return ""
    if config.cluster is None:  # ([cluster] itself needs the PostgreSQL store: the config check says so)
        return (
            f"{named} {workers} needs [cluster] (a Redis the workers share conversations through);"
            " without it each worker would keep conversations of its own: add [cluster] redis_url = ..."
            " (docs/cluster.md), or serve one process"
        )
    return ""


def serve(config: HaipConfig, workers: int = 1) -> int:
    """Check once what every process needs (the store, Redis), then serve in this process or in ``workers``."""
    from haip_runtime.observability.logs import configure_logging
    from haip_runtime.server import node

    configure_logging(config.observability, secrets=secret_values(config))
    from haip_runtime.preflight import notes

    for line in notes(config):
        logging.getLogger("haip_runtime").warning("%s", line)
    _preflight(config, workers)
    port, lock = config.server.port, None
    if workers > 1:
        port, lock = node.unshared(config.server.host, config.server.port)
    sock = node.bind(config.server.host, port, share_port=workers > 1, listen=workers == 1)
    host, port = sock.getsockname()[:2]
    if workers > 1:
        with sock, lock or contextlib.nullcontext():  # reserved, never listening: the workers listen on their own
            return _supervise(config, workers, host, port)

    def ready(runtime: Any) -> None:
        bus = runtime.fleet.bus if runtime.fleet is not None else None
        node_id = bus.node_id if bus is not None else None
        _announce(runtime.config, list(runtime.agents), runtime.authenticator, host, port, node_id=node_id)

    node.run(config, sock, ready)
    return 0


def _preflight(config: HaipConfig, workers: int = 1) -> None:
    """Redis and the store reached, once, before anything serves: one line, exit 1, if not."""
    if config.cluster is not None:  # first: it changes nothing, where the database's preflight may migrate
        import anyio

        from haip_runtime.cluster.dialing import preflight as reach_redis
        from haip_runtime.server.workers import node_id as worker_node

        cluster = config.cluster
        # A configured node_id must not be a live process's (each worker's id is made from it).
        given, nodes = cluster.node_id, []
        if given:
            nodes = [given] if workers == 1 else [worker_node(given, k, 1) for k in range(1, workers + 1)]
        timeout = cluster.connect_timeout_seconds
        anyio.run(
            functools.partial(reach_redis, prefix=cluster.key_prefix),
            cluster.redis_url,
            cluster.masked_url,
            timeout,
            nodes,
        )
    if config.storage.backend == "sqlite":
        from haip_runtime.store.guard import preflight

        preflight(config.storage.path)  # another runtime on the file, or damage: one line, exit 1
    elif config.storage.backend == "postgres":
        import anyio

        from haip_runtime.store import postgres

        prefix = config.cluster.numbering if config.cluster is not None else None
        anyio.run(postgres.preflight, config.storage, prefix)  # unreachable, a newer schema...: one line, exit 1


def _supervise(config: HaipConfig, workers: int, host: str, port: int) -> int:
    """``serve --workers N``: the banner once every worker serves; non-zero if the supervisor gave up."""
    import anyio

    from haip_runtime.auth.tokens import Authenticator
    from haip_runtime.cluster import make_node_id
    from haip_runtime.server.app import dev_key
    from haip_runtime.server.workers import Ready, Supervisor

    # The dev key is made here, once, before any worker reads it: one token for every worker.
    authenticator = Authenticator(config.auth, config.roles, dev_key=dev_key(config.storage, config.auth))
    base = config.cluster.node_id if config.cluster is not None and config.cluster.node_id else make_node_id()

    def ready(workers: list[Ready]) -> None:
        nodes = [worker.node or f"pid {worker.pid}" for worker in workers]
        _announce(config, workers[0].agents, authenticator, host, port, nodes)

    supervisor = Supervisor(config, workers, base, ready)
    anyio.run(supervisor.run, port)
    if supervisor.failure:
        print(f"haip-runtime: {supervisor.failure}", file=sys.stderr)
        return 1
    return 1 if supervisor.forced else 0


def _storage(storage: Any) -> str:
    if storage.backend == "sqlite":
        return f"kept in {storage.path}"
    if storage.backend == "postgres":
        from haip_runtime.config.masking import masked_url

        return f"kept in PostgreSQL at {masked_url(storage.url.get_secret_value())}"
    return "in memory: lost when the runtime stops; set [storage] backend = 'sqlite' to keep it"


def _announce(
    config: HaipConfig,
    agents: list[str],
    authenticator: Any,
    host: str,
    port: int,
    nodes: list[str] | None = None,
    *,
    node_id: str | None = None,
) -> None:
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"haip-runtime listening on http://{shown}:{port}",
        f"  WebSocket: ws://{shown}:{port}/haip/websocket  (also ws://{shown}:{port}/)",
        f"  health:    http://{shown}:{port}/health",
        f"  agents:    {', '.join(agents) or '(none configured)'}",
        f"  history:   http://{shown}:{port}/haip/transactions  ({_storage(config.storage)})",
        f"  AG-UI:     http://{shown}:{port}/ag-ui/<agent>",
    ]
    if config.mcp_server.enabled:
        mcp = f"http://{shown}:{port}{config.mcp_server.path}"
        lines.append(f"  MCP:       {mcp}  (each agent a tool; streamable HTTP)")
    if nodes:
        lines.append(f"  workers:   {len(nodes)} processes on this port, nodes {', '.join(nodes)}")
    elif node_id is not None and config.cluster is not None:  # (a tester could not tell which node answered)
        cluster = config.cluster
        lines.append(f"  cluster:   node {node_id}, Redis {cluster.masked_url} (key_prefix {cluster.key_prefix!r})")
    token = authenticator.issue("dev") if config.auth.mode == "dev" else None
    if config.server.serves_playground:
        # Ready to open: in dev mode the page takes its token from the URL.
        query = f"?token={token}" if token else "  (add ?token=<jwt>)"
        lines.insert(1, f"  playground: http://{shown}:{port}/{query}")
    if token is not None:
        lines += ["  auth:      dev mode (loopback only); a ready token for user 'dev':", f"  token:     {token}"]
        if agents:  # (no agent, nothing to try: a newcomer's find, the line named an echo that was not there)
            agent = "operator" if "operator" in agents else next(iter(agents))
            lines.append(
                f"  try:       {sys.executable} -m haip_runtime chat ws://{shown}:{port}/haip/websocket"
                f" --agent {agent} --token {token}"
            )
    print("\n".join(lines), flush=True)
