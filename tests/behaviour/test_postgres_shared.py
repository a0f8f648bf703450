"""Issue 20: runtimes that share one PostgreSQL database, and a database that goes away mid-conversation.

Two ``haip-runtime serve`` processes on one database, a member on each sending into one
transaction at the same time: every message stored once, ``tseq`` contiguous, the REST history of
either process shows all of it. And a runtime whose database restarts, or whose network to it is
cut, mid-conversation: ``/health`` degraded, the members told, nothing the runtime acknowledged
lost, and it all comes back without restarting the runtime.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import pytest

from haip_runtime.client import HaipClient
from tests.support.netcut import netcut
from tests.support.postgres import PostgresServer, with_port
from tests.support.serving import LiveServer, ServeProcess, live_server, make_config, serve_process

pytestmark = pytest.mark.anyio

MESSAGES = 30


@contextmanager
def runtime_process(url: str, folder: Path) -> Iterator[ServeProcess]:
    """``haip-runtime serve`` (dev mode, the echo agent) on the database at ``url``, as a process of its own."""
    folder.mkdir()
    config = folder / "haip.toml"
    config.write_text(
        '[server]\nport = 0\n[storage]\nbackend = "postgres"\n'
        f'url = "{url}"\nflush_interval_seconds = 0.005\n'
        "[limits]\nmessages_per_second = 1000\nuser_messages_per_second = 1000\n"
        '[agents.echo]\nplugin = "echo"\n'
    )
    with serve_process([sys.executable, "-m", "haip_runtime", "serve", "--config", str(config)], cwd=folder) as served:
        yield served


async def talk(client: HaipClient, transaction: str, tag: str) -> None:
    """``MESSAGES`` messages, each answered (its run finished) before the next; the other process
    talks into the same transaction meanwhile."""
    events = client.events()
    for n in range(MESSAGES):
        await client.send_text(transaction, f"{tag}-{n}")
        with anyio.fail_after(20):
            async for event in events:
                if event.type == "RUN_FINISHED" and event.transaction == transaction:
                    break


async def history(base: str, token: str, transaction: str) -> list[dict[str, Any]]:
    """Every event of ``transaction`` through REST, page by page."""
    events: list[dict[str, Any]] = []
    after: int | None = 0
    async with httpx2.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
        while after is not None:
            page = (
                await http.get(f"/haip/transactions/{transaction}/events", params={"after": after, "limit": 50})
            ).json()
            events += page["events"]
            after = page["next_after"]
    return events


def texts(events: list[dict[str, Any]], type: str) -> list[str]:
    found = []
    for event in events:
        if event["type"] == type:
            payload = event["payload"]
            found.append(payload if isinstance(payload, str) else payload.get("text", ""))
    return found


async def test_two_runtimes_on_one_database_keep_one_log_of_one_transaction(postgres_url: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        a = stack.enter_context(runtime_process(postgres_url, tmp_path / "a"))
        b = stack.enter_context(runtime_process(postgres_url, tmp_path / "b"))
        urls = {name: served.banner["WebSocket"].split()[0] for name, served in (("a", a), ("b", b))}
        tokens = {"a": a.banner["token"], "b": b.banner["token"]}
        async with HaipClient(urls["a"], token=tokens["a"]) as on_a, HaipClient(urls["b"], token=tokens["b"]) as on_b:
            transaction = await on_a.start_transaction("echo")
            await on_b.join(
                transaction
            )  # at once: b brings it back from the database, looking again if a has not written it yet
            async with anyio.create_task_group() as group:
                group.start_soon(talk, on_a, transaction, "a")
                group.start_soon(talk, on_b, transaction, "b")
        seen = {}
        for name, served in (("a", a), ("b", b)):
            base = served.banner["health"].removesuffix("/health")
            seen[name] = await history(base, tokens[name], transaction)
    assert seen["a"] == seen["b"]  # either process shows the whole log
    events = seen["a"]
    assert [e["tseq"] for e in events] == list(range(1, len(events) + 1))  # contiguous, none lost or repeated
    assert len({e["id"] for e in events}) == len(events)
    said = Counter(texts(events, "MESSAGE"))
    for tag in ("a", "b"):
        for n in range(MESSAGES):
            assert said[f"{tag}-{n}"] == 1, f"{tag}-{n} stored {said[f'{tag}-{n}']} times"
    order = texts(events, "MESSAGE")
    for tag in ("a", "b"):  # each process's own in the order it published them
        assert [t for t in order if t.startswith(f"{tag}-")] == [f"{tag}-{n}" for n in range(MESSAGES)]
    assert order.index("b-0") < order.index(f"a-{MESSAGES - 1}")  # and the two really wrote at once


def stored_config(url: str) -> Any:
    return make_config(
        {
            "storage": {
                "backend": "postgres",
                "url": url,
                "flush_interval_seconds": 0.01,
                "statement_timeout_seconds": 1,
                "connect_timeout_seconds": 1,
            }
        }
    )


async def converse_through_an_outage(live: LiveServer, outage: Any, recover: Any) -> None:
    """A member talks before, during and after ``outage()``: told when history stops being kept and
    when it is kept again; ``/health`` degraded meanwhile; afterwards the log holds every event."""
    async with (
        HaipClient(live.ws_url, token=live.token("ann")) as client,
        httpx2.AsyncClient(base_url=live.http_url, headers={"Authorization": f"Bearer {live.token('ann')}"}) as http,
    ):
        transaction = await client.start_transaction("echo")
        events = client.events()

        async def say(text: str) -> None:
            await client.send_text(transaction, text)
            with anyio.fail_after(20):
                async for event in events:
                    if event.type == "RUN_FINISHED":
                        return

        await say("before")
        await outage()
        await say("during")  # answered live: the conversation goes on
        told = await client.wait_for(
            lambda e: e.type == "ERROR" and e.payload.get("code") == "STORAGE_UNAVAILABLE", timeout=20
        )
        assert told.transaction == transaction
        health = (await http.get("/health")).json()
        assert health["status"] == "degraded" and health["storage"]["state"] == "unavailable"
        await say("still during")
        await recover()
        back = await client.wait_for(lambda e: e.type == "INFO" and e.payload.get("event") == "storage", timeout=30)
        assert back.payload == {"event": "storage", "state": "ok"}
        await say("after")
        assert (await http.get("/health")).json()["storage"]["state"] == "ok"
        live_tseqs = [e.tseq for e in client.received if e.transaction == transaction and e.tseq is not None]
        page = (await http.get(f"/haip/transactions/{transaction}/events", params={"limit": 500})).json()
    stored = page["events"]
    assert [e["tseq"] for e in stored] == list(range(1, len(stored) + 1))
    assert set(live_tseqs) <= {e["tseq"] for e in stored}  # everything a member saw is in the log
    assert texts(stored, "MESSAGE") == ["before", "during", "still during", "after"]
    assert live.runtime.store.health.writes_lost == 0 and live.runtime.store.health.writes_dropped == 0


async def test_a_database_restart_mid_conversation_is_waited_out(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async def outage() -> None:
        await anyio.to_thread.run_sync(postgres_server.stop)

    async def recover() -> None:
        await anyio.to_thread.run_sync(postgres_server.start)

    with live_server(stored_config(postgres_url)) as live:
        await converse_through_an_outage(live, outage, recover)


@pytest.mark.parametrize("mode", ["reset", "hang"])
async def test_a_network_cut_to_the_database_mid_conversation_is_waited_out(
    postgres_server: PostgresServer, postgres_url: str, mode: Literal["reset", "hang"]
) -> None:
    """``reset``: every connection refused; ``hang``: packets go nowhere (the driver's own timeout
    notices, since the database never sees the statement)."""
    with netcut(postgres_server.port) as line, live_server(stored_config(with_port(postgres_url, line.port))) as live:

        async def outage() -> None:
            await anyio.to_thread.run_sync(line.cut, mode)

        async def recover() -> None:
            await anyio.to_thread.run_sync(line.heal)

        await converse_through_an_outage(live, outage, recover)


async def test_a_start_while_the_database_is_away_is_refused_saying_so(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """An operator's find: the refusal read "the store could not read this", with no ``related_id``: nothing
    said that the start had failed, nor which envelope failed."""
    with netcut(postgres_server.port) as line, live_server(stored_config(with_port(postgres_url, line.port))) as live:
        async with HaipClient(live.ws_url, token=live.token("ann")) as client:
            await anyio.to_thread.run_sync(line.cut, "reset")
            sent = await client.send("TRANSACTION_START", {"toolName": "echo"}, transaction="mine")
            refused = await client.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == sent, timeout=30)
            await anyio.to_thread.run_sync(line.heal)
            started = await client.start_transaction("echo")  # and once it is back, a start starts
    assert refused.get("code") == "STORAGE_ERROR"
    assert refused.get("message").startswith("a new conversation cannot start now: your open ones are counted")
    assert started  # (an id: the transaction it made)


async def test_an_ag_ui_run_while_the_database_is_away_is_refused_saying_so(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """A re-tester's find: AG-UI's 503 said "the store could not read this", where HAIP and /mcp say why."""
    run = {"threadId": "t-away", "runId": "r1", "state": {}, "tools": [], "context": [], "forwardedProps": {},
           "messages": [{"id": "m1", "role": "user", "content": "hello"}]}  # fmt: skip
    with netcut(postgres_server.port) as line, live_server(stored_config(with_port(postgres_url, line.port))) as live:
        await anyio.to_thread.run_sync(line.cut, "reset")
        headers = {"authorization": f"Bearer {live.token('ann')}"}
        async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
            refused = await http.post("/ag-ui/echo", json=run, headers=headers)
        await anyio.to_thread.run_sync(line.heal)
    error = refused.json()["error"]
    assert refused.status_code == 503 and error["code"] == "STORAGE_ERROR"
    assert error["message"].startswith("thread 't-away' cannot be looked up now, so a run on it cannot start")
