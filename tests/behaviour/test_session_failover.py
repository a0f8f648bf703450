"""Issue 21: a client resumes on another node after its node is killed (SIGKILL), with nothing lost or repeated.

Two ``haip-runtime serve`` processes on one real redis-server and one PostgreSQL. A client talks to an
echo agent through node A; A is killed; meanwhile another session of the same user, on node B, goes
on talking in the same transaction; the client's reconnect then lands on B (as a load balancer would
send it): it is told the session resumed (same epoch), gets every envelope A sent it that it had not
read, then every event of the transaction published while it was away, each once, in order, with
its seqs contiguous, and goes on talking through B.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.client import HaipClient
from haip_runtime.client.haip_client import Received
from tests.behaviour.test_cluster_limits import until
from tests.support.serving import ROOT, ServeProcess, serve_process

pytestmark = pytest.mark.anyio


@contextmanager
def node_process(folder: Path, shared: Path, redis_url: str, prefix: str, postgres_url: str) -> Iterator[ServeProcess]:
    """``haip-runtime serve`` as a node of the cluster; every node signs dev tokens with one key (``shared``)."""
    folder.mkdir()
    config = folder / "haip.toml"
    config.write_text(
        "[server]\nport = 0\n"
        f'[storage]\nbackend = "postgres"\nurl = "{postgres_url}"\npath = "{shared}"\nflush_interval_seconds = 0.005\n'
        f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{prefix}"\nheartbeat_seconds = 0.1\nlease_seconds = 1.5\n'
        "[limits]\nmessages_per_second = 1000\nuser_messages_per_second = 1000\n"
        '[agents.echo]\nplugin = "echo"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's haip_runtime, whatever is installed
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config)]
    with serve_process(command, cwd=folder, env=env) as served:
        yield served


async def talk(client: HaipClient, transaction: str, text: str) -> None:
    """Say ``text`` and wait for the echo, and the end of its run."""
    await client.send_text(transaction, text)
    part = await client.wait_for(lambda e: e.type == "MESSAGE_PART" and said(e) == f"you said: {text}", timeout=20)
    await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.seq > part.seq, timeout=20)


async def history(base: str, token: str, transaction: str, *, stored_yet: bool = True) -> list[dict[str, Any]]:
    """The transaction's log as ``base`` serves it. ``stored_yet`` false: a transaction the node cannot
    find yet (its record is still on its way to PostgreSQL: 404) is an empty log, not a failure."""
    async with httpx2.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
        answer = await http.get(f"/haip/transactions/{transaction}/events", params={"limit": 1000})
    if answer.status_code == 404 and not stored_yet:
        return []
    assert answer.status_code == 200, answer.text
    return list(answer.json()["events"])


def said(event: dict[str, Any] | Received) -> str:
    payload = event["payload"] if isinstance(event, dict) else event.payload
    return payload if isinstance(payload, str) else str(payload.get("text", ""))


async def test_a_client_resumes_on_another_node_after_its_node_is_killed_with_nothing_lost_or_repeated(
    redis_url: str, prefix: str, postgres_url: str, tmp_path: Path
) -> None:
    shared = tmp_path / "cluster"
    states: list[str] = []
    back = anyio.Event()

    def connection(state: str) -> None:
        states.append(state)
        if state in ("resumed", "restarted"):
            back.set()

    with ExitStack() as stack:
        a = stack.enter_context(node_process(tmp_path / "a", shared, redis_url, prefix, postgres_url))
        b = stack.enter_context(node_process(tmp_path / "b", shared, redis_url, prefix, postgres_url))
        url_a, url_b = (served.banner["WebSocket"].split()[0] for served in (a, b))
        base_b = b.banner["health"].removesuffix("/health")
        token = a.banner["token"]  # good on B too: one signing key
        async with HaipClient(url_a, token=token, on_connection=connection) as client:
            transaction = await client.start_transaction("echo")
            for n in range(3):
                await talk(client, transaction, f"before-{n}")
            epoch = client.epoch

            async def stored() -> bool:  # A's events are in PostgreSQL: B can bring the transaction back
                events = await history(base_b, token, transaction, stored_yet=False)
                return any(said(e) == "you said: before-2" for e in events)

            await until(stored)
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(timeout=10)
            async with HaipClient(url_b, token=token) as other:  # the conversation goes on without the client
                await other.join(transaction)
                for n in range(3):
                    await talk(other, transaction, f"while-away-{n}")
            client.url = url_b  # where the load balancer sends the reconnect now
            with anyio.fail_after(30):
                await back.wait()
            await talk(client, transaction, "after")
            received = list(client.received)
            resumed_epoch = client.epoch
        events = await history(base_b, token, transaction)
    assert "resumed" in states and "restarted" not in states, [e.raw["payload"] for e in received if e.type == "ERROR"]
    assert resumed_epoch == epoch  # one epoch over the cluster: the client sees a resume, not a restart
    assert [event.seq for event in received] == list(range(received[0].seq, received[-1].seq + 1))
    mine = [event for event in received if event.transaction == transaction and event.tseq is not None]
    tseqs = [event.tseq or 0 for event in mine]
    assert len(tseqs) == len(set(tseqs)) and tseqs == sorted(tseqs)  # each event once, in order
    own = {f"before-{n}" for n in range(3)} | {"after"}
    expected = [e["tseq"] for e in events if not (e["type"] == "MESSAGE" and said(e) in own)]
    assert [str(tseq) for tseq in tseqs] == [str(tseq) for tseq in expected]  # nothing lost
    texts = Counter(said(event) for event in mine if event.type in ("MESSAGE", "MESSAGE_PART"))
    for n in range(3):
        assert texts[f"while-away-{n}"] == 1 and texts[f"you said: while-away-{n}"] == 1
