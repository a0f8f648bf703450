"""`serve` with a `[cluster]` whose Redis does not answer: one line naming the URL (its password
masked) and exit 1, before it listens; not a failed start-up with a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.support.redis import RedisServer


def serve_refusal(tmp_path: Path, postgres_url: str, redis_url: str, connect_timeout: float = 30) -> list[str]:
    """``serve``'s lines on stderr (it must exit 1) with ``redis_url``, given ``connect_timeout`` s to reach Redis."""
    (tmp_path / "haip.toml").write_text(
        f'[server]\nport = 0\n[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nconnect_timeout_seconds = {connect_timeout}\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "haip_runtime", "serve", "--config", str(tmp_path / "haip.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr.strip().splitlines()


def test_serve_refuses_an_unreachable_redis_in_one_line(tmp_path: Path, postgres_url: str) -> None:
    with socket.socket() as unused:  # bound, never listening: connecting is refused at once
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        lines = serve_refusal(tmp_path, postgres_url, f"redis://:hunter2@127.0.0.1:{port}/0", connect_timeout=1)
    waiting, refused = lines  # (what it waits for, as it begins to: an operator's find, it said nothing)
    assert "cluster: redis does not answer yet" in waiting and waiting.endswith("trying for 1 s")
    assert refused.startswith(
        f"haip-runtime: cluster.redis_url: cannot reach Redis at redis://:**********@127.0.0.1:{port}/0"
    )
    assert "hunter2" not in "\n".join(lines)


def test_serve_refuses_a_redis_database_that_does_not_exist_at_once_saying_so(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """Redis answered (no such database): no retry will change that, so it is said at once, not
    after ``connect_timeout_seconds`` as 'did not answer' (found by a tester)."""
    lines = serve_refusal(tmp_path, postgres_url, redis_url.rsplit("/", 1)[0] + "/99")
    assert len(lines) == 1 and "redis has no such database" in lines[0] and "did not answer" not in lines[0]


def test_serve_refuses_a_wrong_redis_password_at_once_saying_so(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer
) -> None:
    with redis.Redis(port=own_redis.port) as admin:
        admin.config_set("requirepass", "right")
    lines = serve_refusal(tmp_path, postgres_url, f"redis://:hunter3@127.0.0.1:{own_redis.port}/0")
    assert len(lines) == 1 and "redis refused the password" in lines[0] and "hunter3" not in lines[0]
    # No password at all: said so (Redis's own words spoke of HELLO, which nobody wrote: a tester).
    missing = serve_refusal(tmp_path, postgres_url, f"redis://127.0.0.1:{own_redis.port}/0")
    assert len(missing) == 1 and "redis asks for a password and the URL has none" in missing[0]


@contextmanager
def beating(redis_url: str, prefix: str, node: str) -> Iterator[None]:
    """A live process as ``node`` as far as Redis can tell: its beat every 0.2 s, alive 1 s past each."""
    stop = threading.Event()

    def beat() -> None:
        with redis.Redis.from_url(redis_url) as client:
            while not stop.is_set():
                seconds, micros = client.time()
                client.zadd(f"{prefix}:nodes", {node: seconds * 1000 + micros // 1000 + 1000})
                stop.wait(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def serve_node(tmp_path: Path, postgres_url: str, redis_url: str, prefix: str, node: str) -> subprocess.Popen[str]:
    (tmp_path / "haip.toml").write_text(
        f'[server]\nport = 0\n[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nnode_id = "{node}"\n'
    )
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(tmp_path / "haip.toml")]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_refuses_a_node_id_a_live_process_has(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    """Two nodes with one id counted as one (the per-user limits divide by the live nodes) and shared
    one name in Redis, silently (found by a tester uncommenting node_id in the shared example file)."""
    with beating(redis_url, "twins", "twin"):
        process = serve_node(tmp_path, postgres_url, redis_url, "twins", "twin")
        try:
            _, err = process.communicate(timeout=60)
        finally:  # (one that serves instead of refusing is not left running)
            process.kill()
            process.communicate()
    lines = err.strip().splitlines()
    assert process.returncode == 1 and "another live process is node 'twin'" in lines[-1], err
    assert "Traceback" not in err


def test_serve_starts_as_a_node_id_whose_last_process_died_moments_ago(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """The same id as a process that crashed 0 s ago (its beat still counts for a second): waited out."""
    with redis.Redis.from_url(redis_url) as client:
        seconds, micros = client.time()
        client.zadd("crashed:nodes", {"phoenix": seconds * 1000 + micros // 1000 + 1000})
    process = serve_node(tmp_path, postgres_url, redis_url, "crashed", "phoenix")
    try:
        assert process.stdout is not None
        for line in process.stdout:  # (ends if it exits)
            if "listening on" in line:
                break
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    finally:
        process.terminate()
        process.communicate(timeout=30)  # (its pipes closed)


def test_check_connect_names_a_live_process_with_the_configured_node_id(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """`check --connect` said nothing of a live node with this config's node_id, which `serve` then refused
    after waiting (a tester). It says so now, as a note: it may be this node's own server, running."""
    (tmp_path / "haip.toml").write_text(
        f'[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\n'
        f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "twins2"\nnode_id = "twin"\n'
    )
    command = [sys.executable, "-m", "haip_runtime", "check", "--config", str(tmp_path / "haip.toml"), "--connect"]
    alone = subprocess.run(command, capture_output=True, text=True, timeout=60)
    with beating(redis_url, "twins2", "twin"):
        twinned = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and "a live process is node" not in alone.stderr, alone.stderr
    assert twinned.returncode == 0, twinned.stderr
    assert "; a live process is node 'twin' now: this node's own server, running?" in twinned.stderr
