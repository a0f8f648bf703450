"""Issue 21, ``serve --workers N``: real ``serve`` processes, real uvicorn workers, a real redis-server
and PostgreSQL (the session's fixtures).

Two workers answer on one port as two nodes (two node ids in ``/health``) and accept the one dev token
the banner prints; members of one conversation on both workers see one ordered log; a worker killed
with SIGKILL is replaced and the port keeps serving; SIGTERM to the supervisor stops every worker
gracefully and leaves no process; a supervisor killed with SIGKILL leaves none either; a worker that
cannot start stops the serve; more than one worker without ``[cluster]`` is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, TextContent

from haip_runtime.client import HaipClient
from tests.behaviour.test_cluster_conversations import WHOLE, all_answered, answers, logged
from tests.behaviour.test_cluster_limits import until
from tests.support.redis import RedisServer
from tests.support.serving import ROOT

pytestmark = pytest.mark.anyio

FAST = "heartbeat_seconds = 0.1\nnode_ttl_seconds = 1\nconnect_timeout_seconds = 5\nslot_ttl_seconds = 1\n"
#: How long a worker process may take to start on a loaded two-core machine.
START_TIMEOUT = 60.0


def write_config(folder: Path, postgres_url: str, redis_url: str | None, prefix: str, agent: str = "echo") -> Path:
    """A dev-mode haip.toml on a free port, the PostgreSQL at ``postgres_url`` and, unless ``redis_url``
    is None, ``[cluster]`` on that Redis under ``prefix``."""
    folder.mkdir(exist_ok=True)
    cluster = f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{prefix}"\n{FAST}' if redis_url else ""
    config = folder / "haip.toml"
    config.write_text(
        f'[server]\nport = 0\n[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n'
        "flush_interval_seconds = 0.005\n"
        "[limits]\nmessages_per_second = 1000\nuser_messages_per_second = 1000\nsessions_per_user = 100\n"
        f'{cluster}[agents.echo]\nplugin = "{agent}"\n'
    )
    return config


class LineLog:
    """The lines of a process's stderr, read by a thread, to wait on."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def matching(self, pattern: str) -> list[re.Match[str]]:
        with self._changed:
            return [m for line in self.lines if (m := re.search(pattern, line))]

    def wait(self, pattern: str, count: int = 1, timeout: float = START_TIMEOUT) -> list[re.Match[str]]:
        """The first ``count`` lines matching ``pattern``, once there are that many."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.matching(pattern)) >= count, timeout):
                raise AssertionError(f"no {count} lines matching {pattern!r} within {timeout} s:\n" + self.text())
        return self.matching(pattern)[:count]

    def close(self, stream: Any) -> None:
        """After the processes writing to ``stream`` have ended: the last lines read, and ``stream`` closed."""
        self._thread.join(timeout=10)
        stream.close()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines[-60:])


@dataclass
class Served:
    process: subprocess.Popen[str]
    banner: dict[str, str]
    log: LineLog

    @property
    def port(self) -> int:
        return int(self.banner["health"].split(":")[2].split("/")[0])

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/haip/websocket"

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker now serving, by index, from the supervisor's log."""
        pids: dict[int, int] = {}
        for match in self.log.matching(r"worker (\d+) serving: pid (\d+)"):
            pids[int(match.group(1))] = int(match.group(2))
        return pids


#: The processes import this checkout's package, wherever they run.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def serve_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config), *extra]


@contextmanager
def serving(config: Path, workers: int = 2) -> Iterator[Served]:
    """``serve --workers`` until its banner, then yielded; stopped (SIGTERM) and checked for leftovers after."""
    process = subprocess.Popen(
        serve_command(config, "--workers", str(workers)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config.parent,
        env=ENV,
    )
    assert process.stdout is not None and process.stderr is not None
    log = LineLog(process.stderr)
    banner: dict[str, str] = {}
    pids: set[int] = set()
    try:
        for line in process.stdout:  # bounded: the banner is a dozen lines, then the loop breaks
            key, _, value = line.strip().partition(": ")
            banner[key.strip()] = value.strip()
            if key.strip() == "try":
                break
        else:
            raise AssertionError(f"serve ended before its banner:\n{log.text()}")
        served = Served(process, banner, log)
        log.wait(r"worker \d serving: pid", workers)  # logged before the banner, on the other stream
        pids = set(served.worker_pids().values())
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pids |= {int(m.group(1)) for m in log.matching(r"serving: pid (\d+)")}
        for pid in pids:  # nothing may outlive a test, whatever it asserted
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.stdout.close()
        log.close(process.stderr)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def until_gone(pids: set[int], timeout: float = 30) -> set[int]:
    """Poll until none of ``pids`` runs (they are not our children: no event tells us); those left."""
    with anyio.move_on_after(timeout):
        while True:
            if not any(alive(pid) for pid in pids):
                break
            await anyio.sleep(0.05)
    return {pid for pid in pids if alive(pid)}


def health(port: int) -> dict[str, Any]:
    """``/health`` over a new connection (each may land on either worker)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        result: dict[str, Any] = json.load(answer)
    return result


def nodes(port: int, expected: int = 2, tries: int = 200) -> dict[str, dict[str, Any]]:
    """The ``/health`` of each node behind ``port``, by node id, asking until ``expected`` answered
    (each new connection lands on a worker by a hash of its addresses: ``tries`` makes missing one
    practically impossible)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        answer = health(port)
        seen[answer["cluster"]["node"]] = answer
        if len(seen) >= expected:
            break
    return seen


async def echo(url: str, token: str, text: str) -> str:
    async with HaipClient(url, token=token, timeout=30) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, text)
        return str((await client.wait_for("MESSAGE_PART")).get("text"))


async def test_two_workers_serve_one_port_as_two_nodes_with_one_dev_token(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    with serving(write_config(tmp_path / "site", postgres_url, redis_url, prefix)) as served:
        token = served.banner["token"]
        workers_line = served.banner["workers"]
        answers: list[str] = []
        async with HaipClient(served.ws_url, token=token, timeout=30) as held:  # stays on its worker
            await held.start_transaction("echo")

            async def one(n: int) -> None:
                answers.append(await echo(served.ws_url, token, f"hello {n}"))

            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(one, n)
            seen = nodes(served.port)
            scrapes = await every_workers_metrics(served.port)
        tagged = {match.group(1) for match in served.log.wait(r"\[(w\d)\] .*Application startup complete", 2)}
    assert sorted(answers) == sorted(f"you said: hello {n}" for n in range(20))
    assert len(seen) == 2 and all(node.endswith(("-w1", "-w2")) for node in seen)
    assert workers_line == f"2 processes on this port, nodes {', '.join(sorted(seen))}"
    # Each worker checked the one dev token (20 connections spread by the kernel: both got some).
    assert all(answer["totalConnections"] >= 1 for answer in seen.values())
    assert sum(answer["totalConnections"] for answer in seen.values()) >= 21
    assert tagged == {"w1", "w2"}  # each worker's log lines say which worker wrote them
    # Whichever worker a scrape reaches, it has both workers' series (an operator's find: it had its own).
    for families in scrapes:
        accepted = families["haip_connections_accepted"]
        assert {sample.labels["worker"] for sample in accepted.samples} == {"w1", "w2"}


async def every_workers_metrics(port: int, scrapes: int = 6) -> list[dict[str, Any]]:
    """``scrapes`` answers of ``/metrics`` (each over a new connection: either worker), parsed, once a
    scrape has both workers' (each writes its own for the other every few seconds: the first may not yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return {family.name: family for family in text_string_to_metric_families(answer.read().decode())}

    async def both() -> bool:
        return {s.labels.get("worker") for s in scrape()["haip_connections_accepted"].samples} == {"w1", "w2"}

    await until(both, timeout=20)
    return [scrape() for _ in range(scrapes)]


def messages(client: HaipClient, tx: str) -> list[tuple[tuple[int, str], bool]]:
    """((tseq, id), whether the agent said it) of each MESSAGE of ``tx`` that ``client`` got, in order."""
    found = [e for e in client.received if e.transaction == tx and e.type == "MESSAGE"]
    return [((int(e.raw["tseq"]), str(e.raw["id"])), e.raw["channel"] == "AGENT") for e in found]


async def test_members_of_one_conversation_on_both_workers_see_one_ordered_log(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    with serving(write_config(tmp_path / "site", postgres_url, redis_url, prefix)) as served:
        token = served.banner["token"]
        async with contextlib.AsyncExitStack() as stack:
            members: list[HaipClient] = []

            async def member() -> HaipClient:
                client = HaipClient(served.ws_url, token=token, accept_events=WHOLE, timeout=30)
                members.append(await stack.enter_async_context(client))
                return client

            tx = await (await member()).start_transaction("echo")
            # Each new connection lands on a worker by the kernel's hash: join until both workers hold members.
            while len(members) < 30 and not all(n["activeConnections"] for n in nodes(served.port).values()):
                await (await member()).join(tx, since=0)
            spread = {node: answer["activeConnections"] for node, answer in nodes(served.port).items()}

            async def say(index: int, client: HaipClient) -> None:
                for n in range(3):
                    await client.send_text(tx, f"member {index} says {n}")

            async with anyio.create_task_group() as tg:
                for index, client in enumerate(members):
                    tg.start_soon(say, index, client)
            expected = {f"you said: member {i} says {n}" for i in range(len(members)) for n in range(3)}
            for client in members:
                await client.wait_for(all_answered(client, tx, len(expected)))
            logs = [logged(client, tx) for client in members]
            conversations = [messages(client, tx) for client in members]
            said = [sorted(answers(client, tx)) for client in members]
    assert len(spread) == 2 and all(spread.values())  # members on both workers
    assert all(answered == sorted(expected) for answered in said)  # every message answered once, seen by all
    for log in logs:
        assert [tseq for tseq, _ in log] == sorted({tseq for tseq, _ in log})  # in tseq order, no repeats
    # One log: the agent's answers under the same tseqs, in the same order, for every member, and every
    # other member's messages (what a member was told of joins differs with when it joined: the logs
    # are compared where they overlap).
    replies = [[message for message, agent in conversation if agent] for conversation in conversations]
    assert all(same == replies[0] for same in replies[1:]) and len(replies[0]) == len(expected)
    others = 3 * (len(members) - 1)  # a member is not sent its own messages back
    assert all(len(conversation) == len(expected) + others for conversation in conversations)
    first = dict(logs[0])
    assert all(first[tseq] == event for log in logs[1:] for tseq, event in log if tseq in first)


async def test_an_mcp_clients_session_is_served_by_whichever_worker_its_requests_reach(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "site", postgres_url, redis_url, prefix)
    config.write_text(config.read_text() + "[mcp_server]\nenabled = true\n")
    with serving(config) as served:
        headers = {"Authorization": f"Bearer {served.banner['token']}"}
        # A new connection per request, as through most balancers: the kernel spreads them over the workers.
        fresh, url = httpx2.Limits(max_keepalive_connections=0), f"http://127.0.0.1:{served.port}/mcp"
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30, limits=fresh) as http,
            Client(streamable_http_client(url, http_client=http), mode="legacy") as mcp,
        ):
            said = [await mcp.call_tool("echo", {"message": f"hello {n}"}) for n in range(10)]
    # 21 requests or more, each on a connection of its own: that all reached one worker is a chance of 2^-20.
    assert [text_of(answer) for answer in said] == [f"you said: hello {n}" for n in range(10)]


def text_of(answer: CallToolResult) -> str:
    return "".join(block.text for block in answer.content if isinstance(block, TextContent))


async def test_a_worker_killed_is_replaced_and_the_port_keeps_serving(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    with serving(write_config(tmp_path / "site", postgres_url, redis_url, prefix)) as served:
        victim = served.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        served.log.wait(rf"worker 1 \(pid {victim}\) was killed by SIGKILL; starting it again in")
        replaced = served.log.wait(r"worker 1 serving: pid (\d+), node (\S+)", 2)[1]
        answer = await echo(served.ws_url, served.banner["token"], "still here")
        seen = nodes(served.port)
    assert answer == "you said: still here"
    assert int(replaced.group(1)) != victim and replaced.group(2).endswith("-w1.2")  # a new node
    assert set(seen) == {replaced.group(2), next(node for node in seen if node.endswith("-w2"))}
    assert not alive(victim)


async def test_a_worker_killed_while_redis_is_down_comes_back_with_redis_and_the_other_serves_on(
    postgres_url: str, own_redis: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Found by a tester: a worker that died during a Redis outage failed to start three times (it
    cannot start without Redis), and the supervisor gave up and stopped the other worker too, which
    was serving, degraded; and connections the kernel queued at the starting worker's socket waited
    out its start-up, then were reset. Now it keeps trying while another serves, and listens only once
    it serves."""
    config = write_config(tmp_path / "site", postgres_url, own_redis.url, prefix)
    config.write_text(config.read_text().replace("connect_timeout_seconds = 5", "connect_timeout_seconds = 0.3"))
    with serving(config) as served:
        victim = served.worker_pids()[1]
        await anyio.to_thread.run_sync(own_redis.stop)
        os.kill(victim, signal.SIGKILL)
        served.log.wait(rf"worker 1 \(pid {victim}\) was killed by SIGKILL")  # (what it had queued is reset)
        failed_start = r"worker 1 \(pid \d+\) .* before it served; starting it again in"
        during: list[str] = []
        for _ in range(100_000):  # /health over new connections while worker 1 fails to start, and after
            if len(served.log.matching(failed_start)) >= 3:  # where the supervisor gave up
                break
            try:
                during.append(health(served.port)["status"])
            except OSError as error:  # reset: queued at the starting worker's socket, which then failed
                during.append(repr(error))
        served.log.wait(failed_start, 3)
        await anyio.to_thread.run_sync(own_redis.start)
        back = served.log.wait(r"worker 1 serving: pid (\d+)", 2)[1]
        answer = await echo(served.ws_url, served.banner["token"], "all back")
        running = served.process.poll()
    assert running is None and int(back.group(1)) != victim and answer == "you said: all back"
    assert during and set(during) == {"degraded"}


async def test_sigterm_stops_every_worker_gracefully_and_leaves_no_process(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    with serving(write_config(tmp_path / "site", postgres_url, redis_url, prefix)) as served:
        pids = set(served.worker_pids().values())
        assert await echo(served.ws_url, served.banner["token"], "bye") == "you said: bye"
        served.process.send_signal(signal.SIGTERM)
        code = served.process.wait(timeout=40)
        stopped = served.log.wait(r"\[(w\d)\] .*Application shutdown complete", 2)
        assert served.process.stderr is not None
        served.log.close(served.process.stderr)  # every line the workers wrote as they exited, read
    assert not served.log.matching("Fatal Python error")  # a clean stop looks clean in the operator's log
    assert code == 0
    assert {match.group(1) for match in stopped} == {"w1", "w2"}
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


async def test_workers_stop_by_themselves_when_their_supervisor_is_killed(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    with serving(write_config(tmp_path / "site", postgres_url, redis_url, prefix)) as served:
        pids = set(served.worker_pids().values())
        served.process.kill()
        served.process.wait(timeout=10)
        left = await until_gone(pids)
        orphaned = served.log.wait(r"\[w\d\] .*the supervisor is gone: stopping", 2)
    assert len(pids) == 2 and left == set()
    assert len(orphaned) == 2


def test_a_worker_that_cannot_start_stops_the_serve_with_the_reason(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "site", postgres_url, redis_url, prefix, agent="no_such_module_xyz:Agent")
    result = subprocess.run(
        serve_command(config, "--workers", "2"), capture_output=True, text=True, timeout=180, cwd=config.parent, env=ENV
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"haip-runtime: worker \d failed to start 3 times in a row: agents\.echo.*", last), last
    assert "no_such_module_xyz" in last and "Traceback" not in result.stderr
    assert "haip-runtime listening" not in result.stdout
    started = {int(pid) for pid in re.findall(r"\(pid (\d+)\)", result.stderr)}
    assert started and not any(alive(pid) for pid in started)


#: A plugin only one process of the machine may load at a time (it holds a lock beside it).
ONLY_ONE = """
import fcntl
from pathlib import Path

from haip_runtime.agents.echo import EchoAgent as Agent

_held = open(Path(__file__).with_suffix(".lock"), "w")
fcntl.flock(_held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second process: BlockingIOError, its start fails
"""


def test_a_worker_that_never_starts_while_the_other_serves_stops_the_serve_at_start_up(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Keeping on trying a worker while another serves is for one that served before (a reviewer: at
    start-up the serve retried for ever, never printing its banner nor saying why)."""
    config = write_config(tmp_path / "site", postgres_url, redis_url, prefix, agent="only_one:Agent")
    (config.parent / "only_one.py").write_text(ONLY_ONE)
    result = subprocess.run(
        serve_command(config, "--workers", "2"), capture_output=True, text=True, timeout=180, cwd=config.parent, env=ENV
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and re.fullmatch(
        r"haip-runtime: worker \d failed to start 3 times in a row: .*", last
    )
    assert "BlockingIOError" in last or "Resource temporarily unavailable" in last, last
    assert "haip-runtime listening" not in result.stdout


def test_more_than_one_worker_without_a_cluster_is_refused(postgres_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "site", postgres_url, None, "")
    result = subprocess.run(
        serve_command(config, "--workers", "2"), capture_output=True, text=True, timeout=60, env=ENV
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "haip-runtime: --workers 2 needs [cluster] (a Redis the workers share conversations through);"
        " without it each worker would keep conversations of its own: add [cluster] redis_url = ..."
        " (docs/cluster.md), or serve one process\n"
    )
    config.write_text(config.read_text().replace("port = 0\n", "port = 0\nworkers = 2\n"))
    serve = subprocess.run(serve_command(config), capture_output=True, text=True, timeout=60, env=ENV)
    assert serve.returncode == 2 and serve.stdout == ""
    assert serve.stderr.startswith(f"haip-runtime: {config}: server.workers = 2 needs [cluster]")
    check = [sys.executable, "-m", "haip_runtime", "check", "--config", str(config)]
    checked = subprocess.run(check, capture_output=True, text=True, timeout=60, env=ENV)
    assert checked.returncode == 1  # the config check says it too, with what to do
    assert (
        f"haip-runtime: {config}: server.workers = 2 needs [cluster] (a Redis the workers share conversations"
        " through): add [cluster] redis_url = 'redis://host:6379/0' and [storage] backend = 'postgres',"
        " or set server.workers = 1\n"
    ) in checked.stderr
    one = subprocess.Popen(  # the flag overrides the file: one process, no [cluster] needed
        serve_command(config, "--workers", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert one.stdout is not None
        banner = []
        for _, line in zip(range(40), one.stdout, strict=False):  # the banner is a dozen lines
            if "listening on" in line:
                banner.append(line)
                break
    finally:
        one.terminate()
        one.communicate(timeout=30)
    assert banner, "serve --workers 1 did not start on a file that says workers = 2"


def test_a_second_serve_with_workers_on_a_port_in_use_is_refused(
    postgres_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """An operator's find: with SO_REUSEPORT a second ``serve --workers 2`` bound the port too, and the two
    deploys shared its connections without a word."""
    config = write_config(tmp_path / "site", postgres_url, redis_url, prefix)
    with serving(config) as served:
        second = subprocess.run(
            serve_command(config, "--workers", "2", "--port", str(served.port)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=config.parent,
            env=ENV,
        )
        assert health(served.port)["status"] == "ok"  # the first serves on
    assert second.returncode == 1, second.stderr
    assert f"server: cannot listen on 127.0.0.1:{served.port}: Address already in use" in second.stderr
