"""Issue 21, the `/mcp` door in a cluster: a 2025-11-25 client's MCP session lives on the node that
answered its `initialize`; its later requests reach either node (the deployment guide's nginx, round
robin, no stickiness, in front of two runtimes on one real redis-server and one PostgreSQL) and are
served by the session's node: plain calls with progress, a cancel, a task whose question goes to the
client and whose status notes come on the session's GET stream. A session whose node is gone is the
SDK's own "Session not found" (404), after which a client starts a new one (the MCP spec)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from haip_runtime.client import HaipClient
from haip_runtime.config.models import HaipConfig
from haip_runtime.protocol.events import ALL_EVENTS
from tests.behaviour.test_cluster_sessions import FAST, SECRET
from tests.behaviour.test_mcp_door import cancel_a_story
from tests.behaviour.test_mcp_door_tasks import RELATED, StatusNotes, create, result, until_status
from tests.support.mcp_http import LEGACY, answer_of, echo_call, initialized, rpc
from tests.support.proxy import Balancer, balancer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


def node_config(redis_url: str, prefix: str, postgres_url: str) -> HaipConfig:
    return make_config(
        {
            "auth": {"mode": "jwt", "secret": SECRET},
            "cluster": {"redis_url": redis_url, "key_prefix": prefix, **FAST},
            "storage": {"backend": "postgres", "url": postgres_url, "flush_interval_seconds": 0.005},
            "mcp_server": {"enabled": True},
            "agents": {
                "storyteller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": 20},
                },
                "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
            },
            "mcp": {"servers": {"demo": DEMO}},
        }
    )


@contextmanager
def cluster(redis_url: str, prefix: str, postgres_url: str) -> Iterator[tuple[LiveServer, LiveServer, Balancer]]:
    config = node_config(redis_url, prefix, postgres_url)
    with live_server(config) as a, live_server(config) as b, balancer("nginx", [a.port, b.port]) as front:
        yield a, b, front


def node_of(live: LiveServer) -> str:
    assert live.runtime.fleet is not None and live.runtime.fleet.bus is not None
    return live.runtime.fleet.bus.node_id


@asynccontextmanager
async def legacy_client(url: str, token: str, **options: Any) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy", **options) as client,
    ):
        yield client


async def test_a_session_made_on_one_node_is_served_at_the_other(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    config = node_config(redis_url, prefix, postgres_url)
    with live_server(config) as a, live_server(config) as b:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {a.token('alice')}"}, timeout=30) as http:
            session = await initialized(http, a.http_url)
            there = await rpc(http, b.http_url, echo_call(2, "hello from b"), session)
            here = await rpc(http, a.http_url, echo_call(3, "hello from a"), session)
            unknown = await rpc(http, b.http_url, echo_call(4, "x"), session.replace(node_of(a), "no-such-node"))
            bob = {"Authorization": f"Bearer {a.token('bob')}"}
            taken = await rpc(http, b.http_url, echo_call(5, "x"), session, headers=bob)  # checked at a's node
    assert session.endswith(f"~{node_of(a)}")
    assert there.status_code == 200 and here.status_code == 200
    assert answer_of(there)["result"]["content"][0]["text"] == "you said: hello from b"
    assert answer_of(here)["result"]["content"][0]["text"] == "you said: hello from a"
    assert unknown.status_code == 404 and "Session not found" in unknown.text
    assert taken.status_code == 404 and "Session not found" in taken.text


async def test_a_legacy_client_behind_a_round_robin_balancer_calls_with_progress(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with cluster(redis_url, prefix, postgres_url) as (a, b, front):
        said: list[str] = []

        async def seen(progress: float, total: float | None, message: str | None) -> None:
            said.append(message or "")

        async with legacy_client(front.http_url, a.token("alice")) as client:
            tools = await client.list_tools()
            echoes = [await client.call_tool("echo", {"message": f"hello {n}"}) for n in range(6)]
            story = await client.call_tool("storyteller", {"message": "a fox"}, progress_callback=seen)
    assert {tool.name for tool in tools.tools} >= {"echo", "storyteller", "operator"}
    assert [block.content[0].text for block in echoes] == [f"you said: hello {n}" for n in range(6)]  # type: ignore[union-attr]
    assert story.structured_content is not None and story.structured_content["status"] == "OK"
    assert len(said) > 2 and "".join(said).startswith("Once")


async def test_a_cancel_that_reaches_the_other_node_cancels_the_run(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    with cluster(redis_url, prefix, postgres_url) as (a, b, front):
        async with (
            HaipClient(a.ws_url, token=a.token("alice"), accept_events=list(ALL_EVENTS)) as watcher,
            legacy_client(front.http_url, a.token("alice")) as client,
        ):
            conversation = await watcher.start_transaction("storyteller")
            await cancel_a_story(client, conversation)
            ended = await watcher.wait_for(lambda e: e.type == "RUN_FINISHED" and e.get("status") == "CANCELLED")
            after = [await client.call_tool("echo", {"message": f"still here {n}"}) for n in range(2)]
    assert ended.transaction == conversation
    assert [block.content[0].text for block in after] == ["you said: still here 0", "you said: still here 1"]  # type: ignore[union-attr]


async def test_a_tasks_question_and_its_status_notes_reach_a_client_on_either_node(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    asked: list[tuple[str, Any]] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append((params.message, (params.meta or {}).get(RELATED)))
        return types.ElicitResult(action="accept", content={"name": "Ada", "favourite_colour": "green"})

    notes = StatusNotes()
    with cluster(redis_url, prefix, postgres_url) as (a, b, front):
        async with legacy_client(
            front.http_url, a.token("alice"), elicitation_callback=elicit, extensions=[notes]
        ) as client:
            created = await create(client, "operator", {"message": "/call demo.ask_user"})
            waiting = await until_status(client.session, created.task_id, "input_required")
            answer = await result(client.session, created.task_id)
            with anyio.fail_after(10):
                while (created.task_id, "completed") not in notes.seen:
                    await notes.arrived.wait()
    question = "Who are you, and which colour do you like best?"
    assert waiting.status_message == question and asked == [(question, {"taskId": created.task_id})]
    calls = answer.structured_content["tool_calls"] if answer.structured_content else []
    assert calls[0]["status"] == "OK" and calls[0]["result"]["content"][0]["text"] == "Ada likes green"
    assert [status for task, status in notes.seen if task == created.task_id][-1] == "completed"


async def test_a_session_whose_node_stopped_is_not_found_and_a_new_one_is_served(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    config = node_config(redis_url, prefix, postgres_url)
    with live_server(config) as b:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {b.token('alice')}"}, timeout=30) as http:
            with ExitStack() as stack:
                a = stack.enter_context(live_server(config))
                session = await initialized(http, a.http_url)
            gone = await rpc(http, b.http_url, echo_call(2, "anyone?"), session)
            fresh = await initialized(http, b.http_url)
            served = await rpc(http, b.http_url, echo_call(3, "again"), fresh)
    assert gone.status_code == 404 and "Session not found" in gone.text
    assert fresh.endswith(f"~{node_of(b)}")
    assert answer_of(served)["result"]["content"][0]["text"] == "you said: again"


async def test_a_call_streaming_from_a_node_that_stops_ends_at_the_other_without_waiting(
    redis_url: str, prefix: str, postgres_url: str
) -> None:
    config = node_config(redis_url, prefix, postgres_url)
    params = {"name": "storyteller", "arguments": {"message": "a long tale"}, "_meta": {"progressToken": 1}}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": LEGACY}
    before: list[str] = []
    after: list[str] = []
    with live_server(config) as b:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {b.token('alice')}"}, timeout=30) as http:
            with ExitStack() as stack:
                a = stack.enter_context(live_server(config))
                session = await initialized(http, a.http_url)
                headers["Mcp-Session-Id"] = session
                async with http.stream("POST", f"{b.http_url}/mcp", json=call, headers=headers) as response:
                    lines = response.aiter_lines()
                    with anyio.fail_after(20):
                        async for line in lines:  # until the story streams (served by a, through b)
                            before.append(line)
                            if "notifications/progress" in line:
                                break
                    stack.close()  # node a stops: its runtime ends the run, its relay ends the response
                    with anyio.fail_after(10):  # not the 15 s of silence that means a node died
                        after = [line async for line in lines]
    assert response.status_code == 200 and any("notifications/progress" in line for line in before)
    # It ended (the run cancelled, or cut where it stood), in whole events: every data line is a message.
    assert all(json.loads(line[5:])["jsonrpc"] == "2.0" for line in after if line.startswith("data:"))
