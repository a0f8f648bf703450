"""redis-py's client made the way the bus needs it, and reaching Redis at start with backoff.

Commands get a short socket timeout and quick retries of a failed connection only, so a dead Redis
shows within seconds and the health follows. The hot path (appends, the feed's subscription) does
not use redis-py: see ``pipe``; its subscription waits as long as it must and never resends behind
the feed's back (redis-py's defaults would resend a blocking read for a minute, LIBRARY-NOTES "Redis").
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from haip_runtime.cluster.health import BusHealth
from haip_runtime.cluster.keyspace import Keyspace
from haip_runtime.cluster.presence import Presence
from haip_runtime.exceptions import ClusterError, ConfigError

logger = logging.getLogger("haip_runtime.cluster")

#: How long a command waits for Redis's answer. A Redis that hangs (or a network that drops packets)
#: is noticed this long after the first command it does not answer: it is not asked again (a timed-out
#: append may have run), and the bus's health says ``unavailable``.
COMMAND_SOCKET_TIMEOUT = 2.0
#: Connections a node's commands share (more commands at once wait for one).
COMMAND_CONNECTIONS = 32
CONNECT_TIMEOUT = 2.0
#: The first wait between PINGs of a node reaching Redis (doubled each time, to 1 s).
FIRST_DELAY = 0.05
#: Past a node's time to live, how much longer a starting node waits to see whether one of its id beats.
LIVE_CHECK_MARGIN = 1.5


def command_client(url: str) -> Redis:
    """For every command but blocking reads: reconnects by itself on the next command after a restart.

    At most ``COMMAND_CONNECTIONS`` connections; a command finding them all busy waits for one (up to
    the socket timeout). redis-py's default pool refuses at once past its limit ("Too many
    connections"): under load, with a transaction's appends, leases and windows in flight at
    once, that failed commands that only had to wait."""
    # Retried: a connection refused or lost (Redis restarting). Not a timeout: the command may have run
    # (an INCR twice), and a Redis that hangs was noticed only after three of them (6 s, not 2: a tester).
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.01), retries=2, supported_errors=(RedisConnectionError,))
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=COMMAND_CONNECTIONS,
            timeout=COMMAND_SOCKET_TIMEOUT,
            socket_timeout=COMMAND_SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=retry,
            retry_on_error=[RedisConnectionError],
        )
        pool.make_connection()  # type: ignore[no-untyped-call]  # (made, not connected: its options checked by it)
    except (TypeError, ValueError, RedisError) as exc:  # (nothing connects here: any error is the URL's)
        raise _bad_option(exc) from None
    _check_files(pool)
    if pool.connection_kwargs.get("decode_responses"):  # (a re-tester's find: serve failed at start, a traceback)
        raise ClusterError("the URL's option 'decode_responses' cannot be used: the cluster reads Redis's bytes")
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes the connections


def url_problem(url: str) -> str | None:
    """What is wrong with the options or TLS files ``url`` names, found without connecting (``check``);
    ``None`` if nothing is."""
    try:
        command_client(url)  # (nothing is connected: nothing to close)
    except ClusterError as exc:
        return exc.message
    return None


def _bad_option(exc: Exception) -> ClusterError:
    """A URL option its connection cannot take: said at once, not as a traceback at the first command (an
    operator's find: ``redis://...?ssl_ca_certs=``, TLS options on a plain URL)."""
    if isinstance(exc, TypeError):
        found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        option = found.group(1) if found else str(exc)
        tls = " (TLS options need rediss://)" if option.startswith("ssl") else ""
        return ClusterError(f"the URL's option {option!r} is not one redis-py takes here{tls}")
    return ClusterError(f"the URL's options: {exc}")


def _check_files(pool: BlockingConnectionPool) -> None:
    """``ClusterError`` for a TLS file the URL names that is not there (it was retried for
    ``connect_timeout_seconds`` as if Redis were away, then said as "Error 2 connecting")."""
    kwargs = pool.connection_kwargs
    for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = kwargs.get(option)
        if isinstance(path, str) and not os.path.isfile(path):
            raise ClusterError(f"the URL's {option} names no file: {path!r}")


async def reach(client: Redis, health: BusHealth, timeout: float) -> None:
    """PING until Redis answers, backing off from 50 ms to 1 s; ``ClusterError`` after ``timeout``."""
    delay = FIRST_DELAY
    with anyio.move_on_after(timeout):
        while True:
            try:
                await client.ping()
            except (RedisError, OSError) as exc:
                health.failed(exc)
                refusal = _refusal(exc, client.connection_pool.connection_kwargs.get("password") is not None)
                if refusal:  # Redis answered: no retry will change its answer
                    raise ClusterError(refusal) from exc
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # no retry will make the certificate trusted
                    unknown = any(why in str(exc) for why in ("self-signed", "self signed", "local issuer"))
                    hint = (
                        "; name the CA that signed it in the URL: rediss://host:6379/0?ssl_ca_certs=/path/to/ca.pem"
                        if unknown
                        else ""
                    )
                    raise ClusterError(f"redis's TLS certificate was refused ({exc}){hint}") from exc
                if delay == FIRST_DELAY:  # (an operator's find: a start waiting for Redis said nothing meanwhile)
                    logger.warning("cluster: redis does not answer yet (%s); trying for %g s", health.error, timeout)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
            else:
                health.succeeded()
                return
    raise ClusterError(f"redis did not answer within {timeout:g} s: {health.error}")


def _refusal(exc: BaseException, password: bool) -> str:
    """What Redis's answer means when it refused the connection for good (a password, a user's rights,
    a database number), else ''. Other errors (not reached, still loading its data) are waited out.
    ``password``: the URL has one."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)) or "NOAUTH" in str(exc):
        if not password:  # (Redis's own words then speak of HELLO, which nobody wrote)
            return (
                "redis asks for a password and the URL has none: redis://:PASSWORD@host:6379/0 "
                "(USER:PASSWORD@ for an ACL user)"
            )
        return f"redis refused the password (or user) in the URL: {exc}"
    if isinstance(exc, NoPermissionError):
        return f"redis's user in the URL may not run the commands the cluster needs: {exc}"
    if isinstance(exc, ResponseError) and "DB index is out of range" in str(exc):
        return f"redis has no such database (the number after the port in the URL): {exc}"
    return ""


async def preflight(url: str, masked: str, timeout: float, nodes: Sequence[str] = (), *, prefix: str = "") -> None:
    """Whether Redis answers at ``url`` within ``timeout``, met before a server starts (so the refusal
    is one line, not a failed start-up): ``ConfigError`` naming the URL without its password. Then
    that no live process beats as one of ``nodes`` (the ids a configured ``node_id`` gives), under
    the key ``prefix``."""
    try:
        client = command_client(url)
    except ClusterError as exc:
        raise ConfigError(f"cluster.redis_url: {exc}") from exc
    try:
        await reach(client, BusHealth(), timeout)
        for node in nodes:
            await _not_in_use(Presence(client, Keyspace(prefix), BusHealth(), node=node, ttl_seconds=1), node)
    except ClusterError as exc:
        raise ConfigError(f"cluster.redis_url: cannot reach Redis at {masked}: {exc}") from exc
    finally:
        await client.aclose()


async def live_as(url: str, timeout: float, node: str, *, prefix: str = "") -> bool:
    """Whether a live process beats as ``node`` in the Redis at ``url`` now (``check --connect``: its own
    server, running, or another process given the same ``node_id``, which ``serve`` would refuse)."""
    client = command_client(url)
    try:
        await reach(client, BusHealth(), timeout)
        until, now = await Presence(client, Keyspace(prefix), BusHealth(), node=node, ttl_seconds=1).alive_until(node)
        return bool(until > now)
    except ClusterError:  # (it answered a moment ago: this is a note, not the check's verdict)
        return False
    finally:
        await client.aclose()


async def _not_in_use(presence: Presence, node: str) -> None:
    """``ConfigError`` if a live process beats as ``node``. One that beat within its time to live may be
    this node before a crash: waited out (it beats no more), not refused."""
    until, now = await presence.alive_until(node)
    if until <= now:
        return
    logger.warning(
        "cluster: a node %s is alive in Redis for %.1f s more by its last beat (this one, before a crash?):"
        " waiting to see whether it still beats",
        node,
        (until - now) / 1000,
    )
    await anyio.sleep((until - now) / 1000 + LIVE_CHECK_MARGIN)
    again, _ = await presence.alive_until(node)
    if again > until:
        raise ConfigError(
            f"cluster.node_id: another live process is node {node!r} (it beats in this Redis): give each node"
            " its own node_id, or leave node_id out (each process then makes a unique one)"
        )
