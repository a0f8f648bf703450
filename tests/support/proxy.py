"""A real load balancer in front of runtimes: nginx (or HAProxy, Caddy) on a free 127.0.0.1 port.

The configuration it runs is the deployment guide's own (docs/deploy.md): the guide's fenced block
for the balancer (```` ```nginx ````, ```` ```haproxy ````, ```` ```caddy ````) is read from the file
and only its addresses are changed: the listening address becomes ``127.0.0.1:<free port>`` and
the example nodes' ``server`` lines become one line per upstream given, with the guide's
parameters (``max_fails``, ``check``...). So the guide cannot drift from what the tests run.

The balancer runs in a folder of its own under the test's temp folder (its pid file, logs and temp
bodies there, no system config read or written), as an unprivileged user when the tests run as
root (the account PostgreSQL's test cluster uses). ``with balancer("nginx", [port_a, port_b]) as
front:`` starts it and waits until it accepts connections; the block's end stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port
from tests.support.postgres import server_account
from tests.support.serving import ROOT

GUIDE = ROOT / "docs" / "deploy.md"
#: Seconds a balancer may take to accept connections, or to stop.
DEADLINE = 15.0
#: The addresses the guide's examples use for its nodes: each such line is rewritten per upstream.
EXAMPLE_NODES = ("10.0.0.11:8080", "10.0.0.12:8080")


def guide_block(fence: str, guide: Path = GUIDE) -> str:
    """The first fenced block of ``guide`` whose info string is ``fence`` (its text, without the fences)."""
    found = re.search(rf"^```{re.escape(fence)}\n(.*?)^```$", guide.read_text(encoding="utf-8"), re.M | re.S)
    if found is None:
        raise AssertionError(f"{guide} has no ```{fence} block")
    return found.group(1)


def _node_lines(block: str, upstreams: Sequence[int], line: re.Pattern[str], name: Callable[[int], str]) -> str:
    """``block`` with its example node lines (matched by ``line``, whose group ``addr`` is the address)
    replaced by one line per upstream port, keeping the first line's other words."""
    matches = list(line.finditer(block))
    if [m.group("addr") for m in matches] != list(EXAMPLE_NODES):
        raise AssertionError(f"the guide's block must list the example nodes {EXAMPLE_NODES}, one a line")
    first = matches[0]
    template = block[first.start() : first.end()]
    lines = [
        template.replace(first.group("addr"), f"127.0.0.1:{port}").replace(first.group("name") or "\0", name(index))
        for index, port in enumerate(upstreams, 1)
    ]
    return block[: first.start()] + "\n".join(lines) + block[matches[-1].end() :]


def _listen(block: str, pattern: str, replacement: str) -> str:
    changed, count = re.subn(pattern, replacement, block, count=1, flags=re.M)
    if count != 1:
        raise AssertionError(f"the guide's block has no line matching {pattern!r}")
    return changed


@dataclass(frozen=True)
class Kind:
    """One balancer: its program, how the guide's block becomes a runnable config, how to run it."""

    program: str
    fence: str
    file_name: str

    def render(self, port: int, upstreams: Sequence[int], folder: Path) -> str:
        block = guide_block(self.fence)
        if self.program == "nginx":
            block = _listen(block, r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{port};")
            nodes = re.compile(r"^ *server (?P<addr>\S+:\d+)(?P<name>)\b.*;$", re.M)
            block = _node_lines(block, upstreams, nodes, lambda index: "")
            return NGINX_MAIN.format(folder=folder, block=block)
        if self.program == "haproxy":
            block = _listen(block, r"^(\s*)bind :80$", rf"\1bind 127.0.0.1:{port}")
            checked = re.compile(r"^ *server (?P<name>\S+) (?P<addr>\S+:\d+) check\b.*$", re.M)
            block = _node_lines(block, upstreams, checked, lambda index: f"node{index}")
            backups = re.compile(r"^ *server (?P<name>\S+) (?P<addr>\S+:\d+) backup\b.*$", re.M)
            block = _node_lines(block, upstreams, backups, lambda index: f"node{index}-anyway")
            return block.replace("    pidfile /run/haproxy.pid\n", f"    pidfile {folder}/haproxy.pid\n")
        block = _listen(block, r"^haip\.example\.com \{$", f"http://127.0.0.1:{port} {{")
        addresses = " ".join(f"127.0.0.1:{upstream}" for upstream in upstreams)
        block = block.replace(" ".join(EXAMPLE_NODES), addresses, 1)
        return CADDY_GLOBAL + block

    def command(self, executable: str, config: Path, folder: Path) -> list[str]:
        if self.program == "nginx":
            return [executable, "-p", str(folder), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
        if self.program == "haproxy":
            return [executable, "-db", "-f", str(config)]
        return [executable, "run", "--config", str(config), "--adapter", "caddyfile"]


KINDS = {
    "nginx": Kind("nginx", "nginx", "nginx.conf"),
    "haproxy": Kind("haproxy", "haproxy", "haproxy.cfg"),
    "caddy": Kind("caddy", "caddy", "Caddyfile"),
}

#: What a system's nginx.conf holds around the guide's block (its ``http { include ...; }``): here a
#: process of the test's own, everything it writes in its folder, one worker, errors to stderr.
NGINX_MAIN = """\
worker_processes 1;
pid {folder}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 512; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{block}}}
"""

#: Caddy without its admin endpoint (a second port) or automatic HTTPS (the site is http:// here).
CADDY_GLOBAL = "{\n    admin off\n    auto_https off\n    grace_period 1s\n}\n"


@dataclass
class Balancer:
    """A running balancer: where it listens, its folder (config, logs) and its process."""

    kind: Kind
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/haip/websocket"

    @property
    def config(self) -> str:
        return (self.folder / self.kind.file_name).read_text(encoding="utf-8")


@contextmanager
def balancer(program: str, upstreams: Sequence[int]) -> Iterator[Balancer]:
    """``program`` (nginx, haproxy, caddy) round-robin over ``upstreams`` (127.0.0.1 ports) until the block ends."""
    kind = KINDS[program]
    executable = shutil.which(program) or str(Path("/usr/sbin", program))
    assert Path(executable).exists(), (
        f"{program} is missing: run scripts/setup as root (it installs Debian's {program})"
    )
    with tempfile.TemporaryDirectory(prefix=f"haip-{program}-") as directory:
        with _running(kind, executable, upstreams, Path(directory)) as front:
            yield front


@contextmanager
def _running(kind: Kind, executable: str, upstreams: Sequence[int], folder: Path) -> Iterator[Balancer]:
    port = free_port()
    config = folder / kind.file_name
    config.write_text(kind.render(port, upstreams, folder), encoding="utf-8")
    account = server_account()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(folder), "XDG_DATA_HOME": str(folder)}
    env["XDG_CONFIG_HOME"] = str(folder)
    if account is not None:  # root: the balancer runs as an ordinary user, owning only its folder (in /tmp)
        for path in [folder, config]:
            os.chown(path, account.pw_uid, account.pw_gid)
    with open(folder / "stdout.log", "wb") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(
            kind.command(executable, config, folder),
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            start_new_session=True,
        )
    try:
        _wait_listening(process, port, folder)
        yield Balancer(kind, port, folder, process)
    finally:
        _stop(process)


def _wait_listening(process: subprocess.Popen[bytes], port: int, folder: Path) -> None:
    """Until ``port`` accepts a connection, bounded: none of the three says "ready" on its own. Each round
    waits on the process itself for a moment (as tests/support/postgres.py does), so a balancer that
    exits is seen at once."""
    for _ in range(int(DEADLINE / 0.02)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        try:
            code = process.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the balancer exited with {code}:\n{_log(folder)}")
    raise AssertionError(f"the balancer did not listen on {port} within {DEADLINE} s:\n{_log(folder)}")


def _log(folder: Path) -> str:
    return (folder / "stdout.log").read_text(errors="replace")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (fast shutdown for each), SIGKILL if it lingers; the whole process group (nginx's worker too)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=DEADLINE)
