"""A real PostgreSQL for the tests: a throwaway cluster of our own, or one named by HAIP_TEST_POSTGRES_URL.

Our own cluster lives in a temp folder (``initdb`` there), listens on 127.0.0.1 on a free port with its
unix socket inside the folder, and runs as a non-root user when the tests run as root (the server
refuses to run as root). Its superuser has a password, so URLs look like production ones
(``postgresql://haip:secret@127.0.0.1:PORT/haip``).

It is tuned for tests: ``fsync=off`` and ``full_page_writes=off`` only matter when the machine itself
crashes, never when the server process does. ``synchronous_commit`` stays on: a crash (``crash()``,
as ``pg_ctl stop -m immediate``) must keep every commit the server acknowledged, as in production.
``PostgresServer(settings=...)`` overrides them for a cluster of one's own (bench/store.py measures one
with ``fsync=on`` beside the test one).

The postmaster is our child process: it is stopped when the session ends, at interpreter exit
(``atexit``) for whatever is left, and, when started from the main thread, by the kernel if the test
process itself dies (``PR_SET_PDEATHSIG``), so no server outlives the tests.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import ctypes.util
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from tests.support.ports import free_port

#: Names a PostgreSQL to use instead of starting one: a superuser's URL (it creates databases).
URL_VARIABLE = "HAIP_TEST_POSTGRES_URL"
#: The OS user our cluster runs as when the tests run as root (Debian's package creates it).
SYSTEM_USER = "postgres"
#: Made with ``useradd --system`` when the tests run as root and ``postgres`` does not exist.
FALLBACK_USER = "haip-postgres"
#: Seconds a start or a stop may take before the helper gives up (a cluster starts in about a second).
DEADLINE = 60.0
#: Settings for a test cluster; see the module docstring for why these and not ``synchronous_commit``.
TEST_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "logging_collector": "off",
}
_PR_SET_PDEATHSIG = 1
_names = itertools.count(1)
_T = TypeVar("_T")


class PostgresError(RuntimeError):
    """The test cluster could not be set up, started or stopped; the message carries its log's tail."""


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres``: PATH first, else Debian's /usr/lib/postgresql/<ver>/bin
    (its package does not put them on PATH), newest version first."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        folder = Path(on_path).resolve().parent
        if (folder / "postgres").exists():
            return folder
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for candidate in versions:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    raise PostgresError(
        "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): run scripts/setup"
    )


def _version(folder: str) -> tuple[int, ...]:
    name = Path(folder).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root, else a non-root system user."""
    if os.geteuid() != 0:
        return None
    for name in (SYSTEM_USER, FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(FALLBACK_USER)


def run_sql(url: str, *statements: str) -> None:
    """Run ``statements`` on ``url``, from sync code or inside a running event loop alike (a thread of its own)."""

    import asyncpg  # here, not at the top: the suite imports this module even without the postgres extra

    async def execute() -> None:
        connection = await asyncpg.connect(url, timeout=DEADLINE)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    _in_thread(execute)


def _in_thread(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine on a fresh event loop in a thread: the caller may be inside an event loop already."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(make()))
        except BaseException as error:  # handed to the caller below
            errors.append(error)

    thread = threading.Thread(target=target, name="postgres-sql", daemon=True)
    thread.start()
    thread.join(timeout=DEADLINE + 5)
    if thread.is_alive():
        raise PostgresError(f"SQL did not finish within {DEADLINE} s")
    if errors:
        raise errors[0]
    return results[0]


def with_database(url: str, database: str) -> str:
    """``url`` with its path naming ``database``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database), parts.query, parts.fragment))


def with_port(url: str, port: int) -> str:
    """``url`` pointing at ``port`` on 127.0.0.1 (for going through a proxy such as tests.support.netcut)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class _Cluster:
    """What our own cluster is made of: its folder, data dir, binaries and the account it runs as."""

    folder: Path
    binaries: Path
    account: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def sockets(self) -> Path:
        return self.folder / "sockets"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"


class PostgresServer:
    """A PostgreSQL for tests. ``PostgresServer.create()`` picks: the one in HAIP_TEST_POSTGRES_URL, else our own.

    ``url`` is the superuser's URL of the ``haip`` database; ``create_database()`` makes a fresh empty one.
    Our own cluster can be stopped, started again on the same port, restarted, and crashed (as
    ``pg_ctl stop -m immediate``); with an external server those calls skip the test, saying why.
    """

    def __init__(
        self,
        *,
        user: str = "haip",
        password: str = "secret",
        database: str = "haip",
        auth: Literal["scram-sha-256", "md5", "trust"] = "scram-sha-256",
        external_url: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.user = user
        self.password = password
        self.database = database
        self.auth = auth
        self.port = 0
        self._external_url = external_url
        #: Server settings over ``TEST_SETTINGS`` for our own cluster (bench/store.py runs one with
        #: ``fsync=on`` to compare with a production-like server); an external server keeps its own.
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self._cluster: _Cluster | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> PostgresServer:
        """The server named by HAIP_TEST_POSTGRES_URL (checked now), else our own cluster, started."""
        url = os.environ.get(URL_VARIABLE)
        if url:
            server = cls(external_url=url)
            server.port = urlsplit(url).port or 5432
            run_sql(url, "SELECT 1")
            return server
        server = cls()
        server.start()
        return server

    @property
    def owned(self) -> bool:
        """Whether this is our own cluster (which tests may stop, restart and crash)."""
        return self._external_url is None

    @property
    def running(self) -> bool:
        return not self.owned or (self._process is not None and self._process.poll() is None)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (our own running cluster only): bench/cluster.py counts its CPU."""
        return self._process.pid if self.owned and self.running and self._process is not None else None

    @property
    def url(self) -> str:
        """The superuser's URL of the default database (``postgresql://haip:secret@127.0.0.1:PORT/haip``)."""
        if self._external_url is not None:
            return self._external_url
        return f"postgresql://{quote(self.user)}:{quote(self.password)}@127.0.0.1:{self.port}/{quote(self.database)}"

    def url_for(self, database: str) -> str:
        return with_database(self.url, database)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from template0: nothing another test left in template1); returns its URL."""
        name = name or f"test_{os.getpid()}_{next(_names)}_{secrets.token_hex(3)}"
        run_sql(self.url, f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending its sessions first (a test may leave a pool open)."""
        run_sql(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_text(self) -> str:
        """The server's log so far (our own cluster only; empty for an external one)."""
        if self._cluster is None or not self._cluster.log.exists():
            return ""
        return self._cluster.log.read_text(errors="replace")

    # -- our own cluster --------------------------------------------------------------------------

    def _require_owned(self, what: str) -> None:
        if not self.owned:
            pytest.skip(f"{what} needs the tests' own PostgreSQL; {URL_VARIABLE} names an external one")

    def start(self) -> None:
        """Start the cluster (made on the first call, on a free port; later calls reuse its data and port)."""
        self._require_owned("starting PostgreSQL")
        with self._lock:
            if self.running and self._process is not None:
                return
            if self._cluster is None:
                self._cluster = self._make_cluster()
                self._start_on_a_free_port(self._cluster)
                run_sql(self.url_for("postgres"), f'CREATE DATABASE "{self.database}"')
            else:
                self._launch(self._cluster)
            _running.add(self)

    def stop(self, mode: Literal["fast", "immediate", "smart"] = "fast") -> None:
        """Stop as ``pg_ctl stop -m MODE`` does (the same signal to the postmaster) and wait until it has exited.

        ``immediate`` is a crash as far as the data is concerned: the next start runs recovery."""
        self._require_owned("stopping PostgreSQL")
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            process.send_signal({"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])
            try:
                process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=DEADLINE)
                raise PostgresError(f"PostgreSQL did not stop ({mode}) within {DEADLINE} s") from None
            finally:
                _running.discard(self)

    def crash(self) -> None:
        """Stop the way a crash does (``pg_ctl stop -m immediate``): no checkpoint, sessions cut at once."""
        self.stop("immediate")

    def restart(self, mode: Literal["fast", "immediate", "smart"] = "fast") -> None:
        """Stop (``mode``) and start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def ensure_running(self) -> None:
        """Start our cluster again if a test left it stopped; nothing for an external server."""
        if self.owned and not self.running:
            self.start()

    def close(self) -> None:
        """Stop for good and delete the cluster's folder (its data with it)."""
        if not self.owned:
            return
        self.stop("fast")
        with self._lock:
            if self._cluster is not None:
                shutil.rmtree(self._cluster.folder, ignore_errors=True)
                self._cluster = None

    def _make_cluster(self) -> _Cluster:
        account = server_account()
        folder = Path(tempfile.mkdtemp(prefix="haip-pg-"))
        cluster = _Cluster(folder, find_binaries(), account)
        cluster.sockets.mkdir()
        password_file = folder / "password"
        password_file.write_text(self.password + "\n")
        if account is not None:
            for path in (folder, cluster.sockets, password_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        command = [
            str(cluster.binaries / "initdb"),
            f"--pgdata={cluster.data}",
            f"--username={self.user}",
            f"--pwfile={password_file}",
            f"--auth-host={self.auth}",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        done = subprocess.run(command, capture_output=True, text=True, **self._as_account(account))
        password_file.unlink()
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise PostgresError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        return cluster

    def _start_on_a_free_port(self, cluster: _Cluster) -> None:
        """Start on a free port; another process may take it between our check and the bind, so try a few."""
        for attempt in range(3):
            self.port = free_port()
            try:
                self._launch(cluster)
                return
            except PostgresError:
                if attempt == 2 or "could not bind" not in self.log_text()[-2000:]:
                    raise

    def _launch(self, cluster: _Cluster) -> None:
        settings = {**self.settings, "port": str(self.port), "unix_socket_directories": str(cluster.sockets)}
        command = [str(cluster.binaries / "postgres"), "-D", str(cluster.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with open(cluster.log, "ab") as log:
            if cluster.account is not None:
                os.chown(cluster.log, cluster.account.pw_uid, cluster.account.pw_gid)
            watched = threading.current_thread() is threading.main_thread()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The kernel's parent is the thread that forks: only the main thread lives as long as we do.
                preexec_fn=_die_with_parent if watched else None,
                **self._as_account(cluster.account),
            )
        self._wait_ready(cluster, self._process)

    def _wait_ready(self, cluster: _Cluster, process: subprocess.Popen[bytes]) -> None:
        """Wait until the postmaster says "ready" in postmaster.pid (as ``pg_ctl start -w`` does), bounded.

        Each round waits on the process itself for a moment, so a server that dies is seen at once."""
        pid_file = cluster.data / "postmaster.pid"
        for _ in range(int(DEADLINE / 0.05)):
            try:
                code = process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if _says_ready(pid_file, process.pid):
                    return
                continue
            raise PostgresError(f"PostgreSQL exited ({code}) while starting:\n{self.log_text()[-2000:]}")
        process.kill()
        process.wait(timeout=DEADLINE)
        raise PostgresError(f"PostgreSQL was not ready within {DEADLINE} s:\n{self.log_text()[-2000:]}")

    @staticmethod
    def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
        """subprocess arguments that run a command as ``account`` (nothing when that is ourselves)."""
        if account is None:
            return {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": account.pw_dir, "LC_ALL": "C.UTF-8"}
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": env, "cwd": "/"}


def _says_ready(pid_file: Path, pid: int) -> bool:
    """Whether postmaster.pid is ``pid``'s and its status line (the 8th) says ready."""
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel to send SIGQUIT (an immediate shutdown) when we die."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)


_running: set[PostgresServer] = set()


@atexit.register
def _stop_all() -> None:
    """Whatever cluster is still running when the interpreter exits stops now, however the tests ended."""
    for server in list(_running):
        try:
            server.close()
        except Exception:  # exiting: stop the others still
            pass
