"""The bus's hot path to Redis: one raw connection, commands written together, replies read in bulk.

redis-py costs the server about 100 µs per command on this path (a pooled connection, a retry
wrapper, an ``asyncio.timeout`` per read, one ``send`` and one ``recv`` each): more than the rest of
a clustered echo round trip. Appends and the feed's subscription are two commands and one message
per round trip, so they go through this instead (bench/CLUSTER-RESULTS.md has the profile):

- ``Pipe`` is a pipelined command connection with one write in flight at a time (group commit):
  commands issued while Redis has not answered the last write wait, and all of them leave in the
  next ``write`` once it has (at once when nothing is in flight: idle, a command costs one round
  trip; under load, the commands of a round trip's time share one write and their replies one
  read). Redis answers in order on the connection, and every reply in a read is matched to its
  caller at once (hiredis parses). One timer watches the oldest command in flight
  instead of one per command: a command unanswered for ``timeout`` seconds closes the connection,
  failing everything in flight (a timed-out append may have run: never resent behind the caller's
  back). The next command reconnects.
- ``Subscriber`` is a pub/sub connection: (un)subscriptions are written, never awaited; messages and
  confirmations come out of ``messages()`` as lists, all that one read held.

Both raise redis-py's own exceptions (``ConnectionError``, ``TimeoutError``, ``ResponseError``), so
``health.translating`` treats them as every other bus command. The leases' renewals go through the
``Pipe`` too (one write renews every lease a node holds). Everything else (acquiring and releasing
leases, windows, quotas, reads) stays on redis-py: rare commands, where its conveniences cost
nothing that matters.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: A command's arguments as Redis takes them.
Arg = bytes | str | int | float

logger = logging.getLogger("haip_runtime.cluster")


class _Endpoint:
    """Where and how to connect, from a ``redis://``, ``rediss://`` or ``unix://`` URL (redis-py's parser)."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        options: dict[str, Any] = dict(parse_url(url))
        self.host: str = options.get("host", "localhost")
        self.port: int = int(options.get("port", 6379))
        self.path: str | None = options.get("path")
        self.connect_timeout = connect_timeout
        self.ssl: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:  # the context redis-py makes of the same URL
            redis_py = SSLConnection(**{k: v for k, v in options.items() if k != "connection_class"})
            self.ssl = redis_py.ssl_context.get()
        #: Sent first on every connection: who we are, and which database.
        self.hello: list[tuple[Arg, ...]] = []
        self._said_no_password = False
        if options.get("password") is not None:
            user = options.get("username")
            self.hello.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db", 0) or 0):
            self.hello.append(("SELECT", int(options["db"])))
        if options.get("client_name"):
            self.hello.append(("CLIENT", "SETNAME", options["client_name"]))

    def password_ignored(self) -> None:
        """Redis has no password, and the URL one: said once (``no_password_set``)."""
        if not self._said_no_password:
            self._said_no_password = True
            logger.warning("cluster: redis has no password; the one in cluster.redis_url is not needed (ignored)")

    async def connect(self, protocol: _Protocol) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path is not None:
                    transport, _ = await loop.create_unix_connection(lambda: protocol, self.path)
                else:
                    transport, _ = await loop.create_connection(lambda: protocol, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to redis timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
        return transport  # (under uvloop, not an asyncio.Transport subclass: its methods only)


class _Protocol(asyncio.Protocol):
    """Bytes in, parsed replies out to ``received``; a lost connection to ``lost``."""

    def __init__(self, owner: Pipe | Subscriber) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        replies = []
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        if replies:
            self._owner.received(self, replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.lost(self, exc)


class Pipe:
    """A pipelined command connection (see the module): ``await pipe.call(...)`` or ``pipe.script(...)``."""

    def __init__(self, url: str, *, timeout: float, connect_timeout: float) -> None:
        self._endpoint = _Endpoint(url, connect_timeout)
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        #: Connected, and the connection's ``AUTH``/``SELECT`` answered: commands may go.
        self._usable = False
        #: Commands written (or about to be) and not answered: their futures and when they were sent.
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        #: Commands written and not answered yet: while there are any, new ones wait in ``_out``.
        self._in_flight = 0
        self._flush_soon = False
        self._watch: asyncio.TimerHandle | None = None
        self._closed = False
        #: Scripts Redis is known to have (by SHA1): the others go with their source once.
        self._loaded: set[str] = set()
        #: Commands written so far (the benchmarks read it).
        self.commands = 0
        #: Writes so far: commands issued together share one.
        self.writes = 0

    async def call(self, *args: Arg) -> Any:
        """One command's reply; ``ResponseError`` for an error reply, ``ConnectionError`` or
        ``TimeoutError`` if the connection failed before it came (the command may have run)."""
        if not self._usable:
            await self._connect()
        return await self._issue(_pack(args))

    async def calls(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """Commands written together (one write: Redis runs them in this order), their replies in order.
        The first error reply or failure is raised (after every reply came: none is left unread)."""
        if not self._usable:
            await self._connect()
        return _raised(await _settled([self._issue(_pack(command)) for command in commands]))

    async def script(self, source: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run a Lua script by its SHA1; its source is sent only when Redis does not have it yet."""
        return (await self.scripts(source, [(keys, args)]))[0]

    async def scripts(
        self, source: str, calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]], *, settle: bool = False
    ) -> list[Any]:
        """Run a Lua script once per ``(keys, args)``, all written together; the replies in order.
        The first error reply is raised (after every reply came: none is left unread); with ``settle``,
        each error reply comes back in its place as a ``ResponseError``, so one bad run spoils none of
        the others (a failed connection is still raised)."""
        replies = await self.script_replies(source, calls)
        _raised([reply for reply in replies if not isinstance(reply, ResponseError)] if settle else replies)
        return replies

    async def script_replies(self, source: str, calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]]) -> list[Any]:
        """``scripts``, each reply in its place whatever it is: a value, a ``ResponseError`` (Redis refused
        that run), or the ``RedisError`` of a connection lost before that run's answer came (it may or
        may not have run); those answered before the loss are values. Raised only when no connection
        can be made."""
        sha = _sha1(source)
        if not self._usable:
            await self._connect()
        verb, head = ("EVALSHA", sha) if sha in self._loaded else ("EVAL", source)
        futures = [self._issue(_pack((verb, head, len(keys), *keys, *args))) for keys, args in calls]
        replies = await _settled(futures)
        missing = [i for i, reply in enumerate(replies) if _noscript(reply)]
        if missing:  # Redis restarted, or SCRIPT FLUSH: these again, with the source
            again = [
                self._issue(_pack(("EVAL", source, len(calls[i][0]), *calls[i][0], *calls[i][1]))) for i in missing
            ]
            for i, reply in zip(missing, await _settled(again), strict=True):
                replies[i] = reply
        if any(not isinstance(reply, BaseException) for reply in replies):
            self._loaded.add(sha)
        return replies

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.close()
        self._fail(RedisConnectionError("the bus is closing"))

    # --- the connection -----------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Until connected (``AUTH``, ``SELECT`` answered): the first caller starts the connect in a
        task of the pipe's own, so a caller cancelled meanwhile never fails the others waiting on it."""
        if self._closed:
            raise RedisConnectionError("the bus is closed")
        if self._connecting is None:
            # Owned by the pipe, not by one caller (aclose cancels it): callers wait on it shielded.
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(_retrieved)
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            if connecting.cancelled() and self._closed:  # aclose() stopped it: not this caller's cancel
                raise RedisConnectionError("the bus is closed") from None
            raise

    async def _open(self) -> None:
        try:
            protocol = _Protocol(self)
            transport = await self._endpoint.connect(protocol)
            if self._closed:
                transport.abort()
                raise RedisConnectionError("the bus is closed")
            self._transport, self._protocol = transport, protocol
            try:
                async with asyncio.timeout(self._endpoint.connect_timeout):
                    for command in self._endpoint.hello:
                        try:
                            await self._issue(_pack(command))
                        except ResponseError as refused:
                            if not no_password_set(command, refused):
                                raise
                            self._endpoint.password_ignored()
            except (RedisError, TimeoutError) as exc:
                transport.abort()
                self._fail(exc if isinstance(exc, RedisError) else RedisTimeoutError("redis did not answer AUTH"))
                raise
            self._usable = True
        finally:
            self._connecting = None

    def _issue(self, packed: bytes) -> asyncio.Future[Any]:
        if self._transport is None:
            raise RedisConnectionError("not connected to redis")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((future, time.monotonic()))
        self._out.append(packed)
        self.commands += 1
        if not self._in_flight and not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        if self._watch is None:
            self._watch = loop.call_later(self._timeout, self._check)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._in_flight += len(self._out)
            self.writes += 1
        self._out.clear()

    def _check(self) -> None:
        """The watch: the oldest command unanswered for ``timeout`` seconds takes the connection down."""
        self._watch = None
        if not self._pending:
            return
        waited = time.monotonic() - self._pending[0][1]
        if waited >= self._timeout:
            error = RedisTimeoutError(f"redis did not answer within {self._timeout:g} s")
            if self._transport is not None:
                self._transport.abort()
            self._fail(error)
        else:
            self._watch = asyncio.get_running_loop().call_later(self._timeout - waited, self._check)

    def received(self, protocol: _Protocol, replies: list[Any]) -> None:
        if protocol is not self._protocol:
            return
        pending = self._pending
        for reply in replies:
            if not pending:
                break  # nothing asked for it (cannot happen with a well-behaved Redis)
            self._in_flight -= 1
            future, _ = pending.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)
        if not self._in_flight and not self._flush_soon:
            # Everything written is answered: send what waited, after the callers just answered ran
            # (what they issue next goes in the same write).
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._fail(RedisConnectionError(f"lost the connection to redis: {exc or 'closed by the server'}"))

    def _fail(self, error: Exception) -> None:
        """The connection is gone: everything in flight fails with ``error``; the next call reconnects."""
        self._transport = self._protocol = None
        self._usable = False
        self._out.clear()
        self._in_flight = 0
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        pending, self._pending = self._pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(error)
                future.exception()  # a cancelled caller's future is not retrieved by anyone


class Subscriber:
    """A pub/sub connection (see the module). ``connect`` first; after a loss, make a new one."""

    def __init__(self, url: str, *, connect_timeout: float, name: str | None = None) -> None:
        """``name``: the connection's name in Redis's ``CLIENT LIST`` (in place of the URL's ``client_name``;
        a Redis whose ACL refuses ``CLIENT SETNAME`` leaves it unnamed)."""
        self._endpoint = _Endpoint(url, connect_timeout)
        self._named = name is not None
        if name is not None:
            hello = [command for command in self._endpoint.hello if command[:2] != ("CLIENT", "SETNAME")]
            self._endpoint.hello = [*hello, ("CLIENT", "SETNAME", name)]
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._inbox: list[list[Any]] = []
        self._ready: asyncio.Event = asyncio.Event()
        self._error: Exception | None = None
        self._hellos = 0
        self._woken = False

    async def connect(self) -> None:
        protocol = _Protocol(self)
        self._transport = await self._endpoint.connect(protocol)
        self._protocol = protocol
        self._hellos = len(self._endpoint.hello)
        self._write([_pack(command) for command in self._endpoint.hello])

    def subscribe(self, *channels: str | bytes) -> None:
        if channels:
            self._write([_pack(("SUBSCRIBE", *channels))])

    def unsubscribe(self, *channels: str | bytes) -> None:
        if channels:
            self._write([_pack(("UNSUBSCRIBE", *channels))])

    async def messages(self, timeout: float) -> list[list[Any]]:
        """What came since the last call (``[kind, channel, data-or-count]`` each, kinds as bytes), waiting
        up to ``timeout`` for something (``[]`` if nothing came, or ``wake`` was called); once the
        connection is lost, or Redis refused its ``AUTH``/``SELECT``, the ``ConnectionError`` or
        ``ResponseError`` saying why."""
        try:
            async with asyncio.timeout(timeout):
                while not self._inbox and self._error is None and not self._woken:
                    self._ready.clear()
                    await self._ready.wait()
        except TimeoutError:
            pass
        self._woken = False
        if self._inbox:
            inbox, self._inbox = self._inbox, []
            return inbox
        if self._error is not None:
            raise self._error
        return []

    def wake(self) -> None:
        """End the wait of ``messages`` under way (or the next one) at once, with whatever came."""
        self._woken = True
        self._ready.set()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = self._protocol = None

    def _write(self, packed: list[bytes]) -> None:
        if self._transport is None:
            raise RedisConnectionError("the subscription is not connected")
        self._transport.write(b"".join(packed))

    def received(self, protocol: _Protocol, replies: list[Any]) -> None:
        if protocol is not self._protocol:
            return
        for reply in replies:
            if self._hellos:  # AUTH's, SELECT's or (last) CLIENT SETNAME's answer
                self._hellos -= 1
                naming = self._named and not self._hellos  # (a refused name is no reason to fail)
                command = self._endpoint.hello[len(self._endpoint.hello) - self._hellos - 1]
                if isinstance(reply, hiredis.ReplyError) and no_password_set(command, reply):
                    self._endpoint.password_ignored()
                elif isinstance(reply, hiredis.ReplyError) and not naming:
                    self._lose(ResponseError(str(reply)))
                    return
            elif isinstance(reply, hiredis.ReplyError):
                self._lose(ResponseError(str(reply)))
                return
            else:
                self._inbox.append(reply)
        if self._inbox:
            self._ready.set()

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._transport = self._protocol = None
        self._error = self._error or RedisConnectionError(f"lost the subscription: {exc or 'closed by the server'}")
        self._ready.set()

    def _lose(self, error: Exception) -> None:
        self._error = error
        if self._transport is not None:
            self._transport.abort()
        self._ready.set()


def _retrieved(task: asyncio.Task[None]) -> None:
    """Its failure was raised to every caller waiting; none left waiting must not make it a warning."""
    if not task.cancelled():
        task.exception()


async def _settled(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Each future's result or exception, in order (replies come in order: waiting on each in turn
    costs no more than a gather). Cancelled meanwhile: the rest are cancelled, so no error goes unread."""
    out: list[Any] = []
    try:
        for future in futures:
            try:
                out.append(await future)
            except (RedisError, OSError) as exc:
                out.append(exc)
    finally:
        for future in futures:
            future.cancel()
    return out


def _raised(replies: list[Any]) -> list[Any]:
    """``replies``, unless one is an error: then the first is raised."""
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


def _noscript(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")


#: What Redis answers ``AUTH`` when it has no password (>= 6, and before): nothing to authenticate.
_NO_PASSWORD_SET = ("called without any password configured", "no password is set")


def no_password_set(command: tuple[Arg, ...], refused: object) -> bool:
    """Whether ``refused`` is Redis saying it has no password, to an ``AUTH``: then the URL's password is
    not needed, and ignored (as redis-py's ``HELLO 3 AUTH`` ignores it: a tester's ``check --connect``
    said Redis answered, and ``serve`` then failed to start)."""
    return command[:1] == ("AUTH",) and any(words in str(refused) for words in _NO_PASSWORD_SET)


def _pack(args: tuple[Arg, ...]) -> bytes:
    """A command in Redis's protocol (hiredis packs in C; its stub types the tuple as one element)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


@functools.cache
def _sha1(source: str) -> str:
    """A script's SHA1 (scripts are a handful of constants: hashed once each, not at every run)."""
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
