"""What the benchmarks share: servers as pinned subprocesses, load processes, process gauges, statistics.

Each measurement runs a real `haip-runtime serve` (a generated config) or the bare Starlette app of
bench/baseline.py in a subprocess pinned to one core, and drives it from load processes
(bench/load.py) pinned to the other, all on 127.0.0.1. Only loopback is contacted, in bounded loops.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable

BASELINE_APP = """
import socket, uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.responses import PlainTextResponse
async def hi(request): return PlainTextResponse("hi")
class S(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print("listening", flush=True)
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(128)
S(uvicorn.Config(Starlette(routes=[Route("/", hi)]), log_level="warning")).run(sockets=[sock])
"""


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (what platform knows, elsewhere)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(packages: Iterable[str]) -> str:
    """One line for a results file: the cores, the processor, the kernel, Python and ``packages``' versions."""
    versions = ", ".join(f"{name} {version(name)}" for name in packages)
    return (
        f"{os.cpu_count()} × {cpu_model()}, Linux {platform.release()}, Python {platform.python_version()}; {versions}"
    )


def cores() -> tuple[set[int], set[int]]:
    """(server cores, load cores): one core each where the machine has two or more."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[0]}, {available[1]}


def pin(pid: int, where: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, where)
    except OSError:
        pass  # the process is already gone, or pinning is not allowed here: run unpinned


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's descriptor limit towards ``wanted`` (within the hard limit); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def time_until_ready(command: list[str], marker: str, env: dict[str, str] | None = None) -> float:
    """Seconds from spawning ``command`` until it prints ``marker``; then the process is stopped."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if marker in line:
                return time.perf_counter() - start
        raise RuntimeError(f"{command} exited before printing {marker!r}")
    finally:
        process.terminate()
        process.wait(timeout=15)
        process.stdout.close()


# -- servers -----------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server subprocess: its port, its dev token (haip-runtime) and its process."""

    process: subprocess.Popen[str]
    port: int
    token: str | None = None
    workdir: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def ws(self, path: str = "/haip/websocket") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_kb(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return proc_status(self.pid, "Threads")


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# Limits raised so that the benchmark measures the pipeline, not the per-user throttles it exists to
# enforce; everything else is the default.
BENCH_TOML = """
[server]
host = "127.0.0.1"
port = 0
ws_per_message_deflate = false

[auth]
mode = "dev"

[session]
heartbeat_interval_seconds = 600
heartbeat_timeout_seconds = 600
resume_timeout_seconds = {resume_timeout}

[limits]
messages_per_second = 1000000
message_burst = 1000000
user_messages_per_second = 1000000
user_message_burst = 1000000
sessions_per_user = 100000
transactions_per_user = 100000
members_per_transaction = 1000
tool_calls_per_session = 64

[observability]
log_level = "warning"

[agents.echo]
plugin = "echo"
options = {{ prefix = "" }}

[agents.stream]
plugin = "{streamer}:Streamer"
{mcp}
{extra}
"""

MCP_TOML = """
[agents.operator]
plugin = "operator"
mcp_servers = ["stdio", "http", "python"]

[mcp.servers.stdio]
transport = "stdio"
command = "{python}"
args = ["{demo}"]

[mcp.servers.http]
transport = "http"
url = "{url}"

[mcp.servers.python]
transport = "python"
server = "{demo}:server"
"""

#: BENCH_TOML's [limits], for the benches that serve in-process (``make_config``): they measure the
#: pipeline, not the throttles (past 100 messages a second a session's next is refused RATE_LIMITED).
RAISED_LIMITS = {
    "limits": {
        "messages_per_second": 1e6,
        "message_burst": 1_000_000,
        "user_messages_per_second": 1e6,
        "user_message_burst": 1_000_000,
    }
}

DEMO = ROOT / "haip_runtime" / "demo" / "mcp_server.py"


def bench_config(directory: Path, mcp_url: str | None = None, extra: str = "", resume_timeout: float = 120) -> Path:
    """A haip.toml in ``directory``: echo and the streaming agent, MCP servers if ``mcp_url``, ``extra`` TOML."""
    mcp = MCP_TOML.format(python=PYTHON, demo=DEMO, url=mcp_url) if mcp_url else ""
    text = BENCH_TOML.format(streamer=BENCH / "streamer.py", mcp=mcp, extra=extra, resume_timeout=resume_timeout)
    path = directory / "haip.toml"
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def haip_server(where: set[int], mcp_url: str | None = None, fd_limit: int = 0, **options: Any) -> Iterator[Server]:
    """`haip-runtime serve` on a generated config (``bench_config``), pinned to ``where``, until the block ends."""
    with tempfile.TemporaryDirectory(prefix="haip-bench-") as tmp:
        config = bench_config(Path(tmp), mcp_url, **options)
        command = [PYTHON, "-m", "haip_runtime", "serve", "--config", str(config)]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=open(Path(tmp) / "stderr.log", "w"),
            text=True,
            cwd=tmp,
            env=_env(),
            preexec_fn=lambda: raise_fd_limit(fd_limit),
        )
        pin(process.pid, where)
        try:
            port, token = _read_announcement(process)
            yield Server(process, port, token, Path(tmp))
        finally:
            stop(process)


@contextmanager
def baseline_server(where: set[int], fd_limit: int = 0) -> Iterator[Server]:
    """The bare Starlette app (bench/baseline.py) on uvicorn, pinned to ``where``."""
    command = [PYTHON, str(BENCH / "baseline.py")]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=_env(),
        preexec_fn=lambda: raise_fd_limit(fd_limit),
    )
    pin(process.pid, where)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("listening "):
                yield Server(process, int(line.split()[1]))
                return
        raise RuntimeError("the baseline app exited before listening")
    finally:
        stop(process)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HAIP_PYTHON": PYTHON}


def _read_announcement(process: subprocess.Popen[str]) -> tuple[int, str]:
    assert process.stdout is not None
    port = token = None
    for line in process.stdout:
        if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        if match := re.search(r"token:\s+(\S+)", line):
            token = match.group(1)
        if port is not None and token is not None:
            return port, token
    process.wait(timeout=10)
    raise RuntimeError("haip-runtime serve exited before announcing itself (see its stderr.log)")


def _stderr(process: subprocess.Popen[str]) -> str:
    process.wait(timeout=10)
    return process.stderr.read()[-2000:] if process.stderr else ""


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            stream.close()


# -- load processes ----------------------------------------------------------------------------------------


def load(where: set[int], spec: dict[str, Any], timeout: float = 600, script: str = "load.py") -> dict[str, Any]:
    """Run one bench/load.py process (or another ``script`` of bench/) with ``spec``, pinned to ``where``;
    its JSON result."""
    process = subprocess.Popen(
        [PYTHON, str(BENCH / script), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    pin(process.pid, where)
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"load {spec.get('mode')} failed ({process.returncode}): {err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@contextmanager
def held_load(where: set[int], spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A load process that opens connections, reports, and holds them until the block ends."""
    process = subprocess.Popen(
        [PYTHON, str(BENCH / "load.py"), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    pin(process.pid, where)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"load {spec.get('mode')} failed: {_stderr(process)}")
        yield json.loads(line)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        stop(process)


# -- statistics --------------------------------------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by nearest rank on sorted samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Rounds:
    """Alternating rounds (A, B, A, B...): each round's figure for haip-runtime and for the baseline."""

    ours: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)

    def add(self, ours: float, base: float) -> None:
        self.ours.append(ours)
        self.base.append(base)

    @property
    def ratios(self) -> list[float]:
        return [a / b if b else float("nan") for a, b in zip(self.ours, self.base, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def spread(self) -> str:
        ratios = self.ratios
        return f"{min(ratios):.2f}–{max(ratios):.2f}x over {len(ratios)} rounds"


# -- CPU time of other processes ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (the state is [0], the parent [1])."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def stores(port: int, processes: int = 1, timeout: float = 300) -> dict[str, dict[str, Any]]:
    """The ``storage`` section of ``/health`` of each process serving ``port`` (with ``serve --workers N``
    a worker answers at random: asked until every one has), by node (``single`` without ``[cluster]``)."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every process on port {port} answered /health")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            health = json.load(answer)
        seen[health.get("cluster", {}).get("node", "single")] = health["storage"]
    return seen


def writes_dropped(port: int, processes: int = 1) -> int:
    """Writes the stores of the processes on ``port`` dropped so far (``storage.max_pending_writes``)."""
    return sum(int(store["writes_dropped"]) for store in stores(port, processes).values())


def drain(
    port: int, processes: int = 1, watch: dict[str, list[Any]] | None = None, timeout: float = 300
) -> tuple[float, dict[str, float]]:
    """Wait until every store on ``port`` has written what it had waiting (a server's store writes behind
    its round trips, and under load falls behind: what it writes after a load is part of the load's
    cost); the seconds it took, and the CPU seconds each process in ``watch`` spent meanwhile."""
    watch = watch or {}
    before = {name: float(cpu_seconds(pid, children)) for name, (pid, children) in watch.items()}
    started = time.monotonic()
    while any(store["pending_writes"] for store in stores(port, processes).values()):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the stores on port {port} did not catch up in {timeout:g} s")
        time.sleep(0.05)  # between loads, polling /health: no event to wait on across processes
    spent = {name: float(cpu_seconds(pid, children)) - before[name] for name, (pid, children) in watch.items()}
    return time.monotonic() - started, spent


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User and system CPU seconds of ``pid`` so far, all its threads. With ``children``, its children's
    too: the live ones' and those it has reaped (PostgreSQL's backends are the postmaster's children)."""
    fields = _stat(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    child = _stat(int(entry))
                except OSError:
                    continue  # it ended between the listing and the read
                if child[1] == str(pid):
                    ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def waited_seconds(pid: int) -> float:
    """Seconds ``pid``'s main thread has spent runnable but waiting for a core (``/proc/<pid>/schedstat``):
    on a shared machine, the time the scheduler gave to other processes while this one had work."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


# -- results files shared by several benches ---------------------------------------------------------------


def write_section(path: Path, name: str, title: str, lines: list[str]) -> None:
    """Put ``lines`` in ``path`` between ``<!-- name -->`` and ``<!-- /name -->``, replacing what was there
    and keeping the other benches' parts (bench/CLUSTER-RESULTS.md is written by several benches)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n"
    part = "\n".join([start, *lines, end])
    if start in text and end in text:
        head, _, rest = text.partition(start)
        text = head + part + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + part + "\n"
    path.write_text(text, encoding="utf-8")
