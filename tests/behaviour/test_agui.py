"""The AG-UI door, driven by the official ``@ag-ui/client`` (HttpAgent) under Node, against a live
runtime: conversations with ``echo`` and ``assistant`` (a local OpenAI-format model server making a
tool call), a tool's progress, an approval interrupt answered through ``resume``, a thread continued
in a later run; every event validated against the ``ag-ui-protocol`` models; and a HAIP member of
the same transaction seeing all of it.

The client is installed by scripts/setup (``npm ci`` in tests/support/agui-client); no download here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from ag_ui.core import Event as AguiEvent
from pydantic import TypeAdapter

from haip_runtime.client.haip_client import HaipClient, Received
from tests.support.serving import ROOT, LiveServer, live_server, make_config
from tests.support.vendor import Reply, VendorServer, openai_text, openai_tool_call, vendor_server

CLIENT = ROOT / "tests" / "support" / "agui-client"
DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
EVENTS: TypeAdapter[Any] = TypeAdapter(AguiEvent)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("node") is None or not (CLIENT / "node_modules" / "@ag-ui" / "client").is_dir(),
        reason="node and @ag-ui/client (scripts/setup runs npm ci in tests/support/agui-client)",
    ),
]


@pytest.fixture(scope="module")
def vendor() -> Iterator[VendorServer]:
    with vendor_server() as server:
        yield server


@pytest.fixture(scope="module")
def runtime(vendor: VendorServer) -> Iterator[LiveServer]:
    gpt = vendor.openai_llm()
    config = {
        "llm": {"gpt": gpt},
        "agents": {"assistant": {"plugin": "assistant", "llm": "gpt", "mcp_servers": ["demo"]}},
        "mcp": {"servers": {"demo": {**DEMO, "require_approval": ["slow_count"]}}},
        "roles": {"user": {}, "support": {"may_join_others": True}},
    }
    with live_server(make_config(config)) as live:
        yield live


async def tools_connected(live: LiveServer) -> None:
    """Until the demo MCP server is connected (its tools are in an assistant transaction's TOOL_LIST)."""
    async with HaipClient(live.ws_url, token=live.token("admin")) as client:
        await client.start_transaction("assistant")
        await client.wait_for(
            lambda e: e.type == "TOOL_LIST" and any(t["name"] == "demo.slow_count" for t in e.get("tools"))
        )


class Driver:
    """The Node process running HttpAgent on one thread; each step's events come back as JSON lines."""

    def __init__(self, live: LiveServer, agent: str, thread: str, user: str = "alice") -> None:
        url = f"{live.http_url}/ag-ui/{agent}"
        self.process = subprocess.Popen(
            ["node", str(CLIENT / "driver.mjs"), url, live.token(user), thread],
            cwd=CLIENT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def step(self, **step: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run one step; its events (each validated against the AG-UI models) and the run's result."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(step) + "\n")
        self.process.stdin.flush()
        events: list[dict[str, Any]] = []
        with anyio.fail_after(30):
            while True:
                line = await anyio.to_thread.run_sync(self.process.stdout.readline)
                assert line, "the AG-UI client exited"
                item = json.loads(line)
                if "failed" in item:
                    raise AssertionError(f"the AG-UI client failed: {item['failed']}")
                if "done" in item:
                    return events, item["done"]
                EVENTS.validate_python(item["event"])  # raises if it is not an AG-UI 1.0 event
                events.append(item["event"])

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)
        self.process.stdout.close()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(event["delta"] for event in events if event["type"] == "TEXT_MESSAGE_CONTENT")


def haip_text(client: HaipClient, tx: str) -> list[str]:
    """What a HAIP member saw said in ``tx``: users' MESSAGEs and the agents' assembled parts."""
    said: list[str] = []
    for event in client.received:
        if event.transaction != tx:
            continue
        if event.type == "MESSAGE":
            said.append(f"{event.get('author')}: {event.get('text')}")
        elif event.type == "MESSAGE_START":
            said.append(f"{event.get('author')}: ")
        elif event.type == "MESSAGE_PART":
            said[-1] += str(event.get("text"))
    return said


async def seen(client: HaipClient, tx: str, type: str, count: int = 1) -> Received:
    """The ``count``-th ``type`` event of ``tx`` (waiting for it)."""
    found: list[Received] = []

    def nth(event: Received) -> bool:
        if event.transaction == tx and event.type == type:
            found.append(event)
        return len(found) == count

    return await client.wait_for(nth)


async def test_an_ag_ui_client_talks_to_echo_and_a_haip_member_of_the_thread_sees_it(runtime: LiveServer) -> None:
    thread = f"thread-{uuid.uuid4()}"
    driver = Driver(runtime, "echo", thread)
    try:
        events, done = await driver.step(say="hello there")
        assert types(events) == [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_FINISHED",
        ]
        assert events[0]["threadId"] == thread and events[0]["protocolVersion"] == "1.0"
        assert text_of(events) == "you said: hello there"
        assert [m["content"] for m in done["newMessages"]] == ["you said: hello there"]

        async with HaipClient(runtime.ws_url, token=runtime.token("alice")) as member:
            await member.join(thread, since=0)  # the thread is the transaction: its log so far, then live
            await seen(member, thread, "MESSAGE_END")
            events, _ = await driver.step(say="and again")
            assert text_of(events) == "you said: and again"
            await seen(member, thread, "MESSAGE_END", 2)
            assert haip_text(member, thread) == [
                "alice: hello there",
                "echo: you said: hello there",
                "alice: and again",
                "echo: you said: and again",
            ]
    finally:
        driver.close()


async def test_an_ag_ui_client_approves_a_tool_call_sees_its_progress_and_continues_the_thread(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    vendor.script(
        Reply(openai_tool_call("demo_slow_count", '{"steps": 3, "delay": 0.05}', "call_7")),
        Reply(openai_text("Counted ", "to three.", usage=(40, 5))),
        Reply(openai_text("You are welcome.")),
    )
    await tools_connected(runtime)
    thread = f"thread-{uuid.uuid4()}"
    driver = Driver(runtime, "assistant", thread)
    try:
        # Run 1: the model calls a tool that needs approval; the AG-UI run ends with an interrupt.
        events, done = await driver.step(say="count to three")
        assert types(events)[:4] == ["RUN_STARTED", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"]
        call_id = events[1]["toolCallId"]
        assert events[1]["toolCallName"] == "demo.slow_count"
        assert json.loads(events[2]["delta"]) == {"steps": 3, "delay": 0.05}
        finished = events[-1]
        assert finished["type"] == "RUN_FINISHED" and finished["outcome"]["type"] == "interrupt"
        [interrupt] = finished["outcome"]["interrupts"]
        assert interrupt["toolCallId"] == call_id and interrupt["reason"] == "tool_approval"
        assert [i["id"] for i in done["pendingInterrupts"]] == [interrupt["id"]]

        async with HaipClient(runtime.ws_url, token=runtime.token("alice")) as member:
            await member.join(thread, since=0)
            await member.wait_for(lambda e: e.type == "TOOL_UPDATE" and e.get("status") == "AWAITING_APPROVAL")

            # A reason that is not text is refused, as over HAIP, saying where (a tester's finds).
            odd = {"approved": True, "reason": 5}
            bad = {"threadId": thread, "runId": "r-bad", "messages": [],
                   "resume": [{"interruptId": interrupt["id"], "status": "resolved", "payload": odd}]}  # fmt: skip
            async with httpx.AsyncClient(base_url=runtime.http_url, timeout=30) as http:
                headers = {"authorization": f"Bearer {runtime.token('alice')}"}
                refused = await http.post("/ag-ui/assistant", json=bad, headers=headers)
            assert refused.status_code == 400 and refused.json()["error"]["detail"] == {
                "where": "/resume/0/payload/reason"
            }
            assert "(at /resume/0/payload/reason)" in refused.json()["error"]["message"]

            # Run 2: resume with the approval; the tool runs (progress), the model answers.
            resume = [{"interruptId": interrupt["id"], "status": "resolved", "payload": {"approved": True}}]
            events, done = await driver.step(resume=resume)
            assert types(events)[0] == "RUN_STARTED" and types(events)[-1] == "RUN_FINISHED"
            assert "outcome" not in events[-1] or events[-1]["outcome"]["type"] == "success"
            progress = [e["content"] for e in events if e["type"] == "ACTIVITY_SNAPSHOT"]
            assert any("progress" in each for each in progress), progress
            [result] = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
            assert result["toolCallId"] == call_id and "3" in result["content"]
            assert text_of(events) == "Counted to three."
            # The answer's tokens, as its MESSAGE_END counts them: the tool-calling request's 9 and the answer's 5.
            assert events[-1]["usage"] == [{"outputTokens": 14}]
            assert done["pendingInterrupts"] == []

            # Run 3: the same thread goes on; the model is sent the whole conversation.
            events, _ = await driver.step(say="thanks")
            assert text_of(events) == "You are welcome."
            sent = vendor.requests[-1].body["messages"]
            assert [m["content"] for m in sent if m["role"] == "user"] == ["count to three", "thanks"]

            await seen(member, thread, "RUN_FINISHED", 2)
            assert haip_text(member, thread) == [
                "alice: count to three",
                "assistant: Counted to three.",
                "alice: thanks",
                "assistant: You are welcome.",
            ]
            kinds = [e.type for e in member.received if e.transaction == thread]
            assert {"TOOL_CALL", "TOOL_UPDATE", "TOOL_DONE"} <= set(kinds)
    finally:
        driver.close()


async def test_a_reconnecting_client_gets_what_it_missed_by_last_event_id(runtime: LiveServer) -> None:
    thread = f"thread-{uuid.uuid4()}"
    body = {
        "threadId": thread,
        "runId": "run-1",
        "messages": [{"id": "m1", "role": "user", "content": "hi"}],
        "tools": [],
        "context": [],
        "state": {},
        "forwardedProps": {},
    }
    headers = {"authorization": f"Bearer {runtime.token('alice')}"}
    async with httpx.AsyncClient(base_url=runtime.http_url, headers=headers) as http:
        first = await http.post("/ag-ui/echo", json=body)
        frames = [block for block in first.text.split("\n\n") if block]
        ids = [block.split("\n")[0].removeprefix("id: ") for block in frames]
        assert ids == [f"{thread}:{n}" for n in range(1, 6)]
        again = await http.post("/ag-ui/echo", json=body, headers={"last-event-id": ids[1]})
        assert [block for block in again.text.split("\n\n") if block] == frames[2:]
        stale = await http.post("/ag-ui/echo", json=body, headers={"last-event-id": f"{thread}:99"})
        assert stale.status_code == 404 and stale.json()["error"]["code"] == "RESUME_FAILED"


async def test_bad_requests_get_a_clear_error_and_change_nothing(runtime: LiveServer) -> None:
    headers = {"authorization": f"Bearer {runtime.token('alice')}"}
    async with httpx.AsyncClient(base_url=runtime.http_url) as http:
        unauthenticated = await http.post("/ag-ui/echo", json={})
        assert unauthenticated.status_code == 401
        wrong = await http.post("/ag-ui/echo", json={"threadId": "t"}, headers=headers)
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "INVALID_PAYLOAD"
        body = {"threadId": "t-none", "runId": "r", "messages": []}
        missing = await http.post("/ag-ui/nobody", json=body, headers=headers)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "AGENT_NOT_FOUND"
        foreign = await http.post("/ag-ui/echo", json=body, headers={**headers, "origin": "https://evil.example"})
        assert foreign.status_code == 403
        resume = {**body, "resume": [{"interruptId": "nothing", "status": "resolved"}]}
        stray = await http.post("/ag-ui/echo", json=resume, headers=headers)
        assert stray.status_code == 400 and "no open interrupt" in stray.json()["error"]["message"]
        assert stray.json()["error"]["detail"] == {"where": "/resume/0/interruptId"}
        history = await http.get("/haip/transactions/t-none/events", headers=headers)
        assert history.status_code == 404  # refused before anything was made
        mallory = {"authorization": f"Bearer {runtime.token('mallory')}"}
        hello = [{"id": "m1", "role": "user", "content": "hello"}]
        made = await http.post("/ag-ui/echo", json={**body, "threadId": "t-alice", "messages": hello}, headers=headers)
        assert made.status_code == 200
        taken = await http.post("/ag-ui/echo", json={**body, "threadId": "t-alice"}, headers=mallory)
        assert taken.status_code == 404 and taken.json()["error"]["code"] == "TRANSACTION_NOT_FOUND"


async def test_a_haip_member_approves_and_the_next_ag_ui_run_gets_what_happened_meanwhile(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    vendor.script(
        Reply(openai_tool_call("demo_slow_count", '{"steps": 2, "delay": 0.01}', "call_8")),
        Reply(openai_text("Done counting.")),
    )
    await tools_connected(runtime)
    thread = f"thread-{uuid.uuid4()}"
    driver = Driver(runtime, "assistant", thread)
    try:
        events, done = await driver.step(say="count to two")
        [interrupt] = events[-1]["outcome"]["interrupts"]
        async with HaipClient(runtime.ws_url, token=runtime.token("bob", roles=["support"])) as bob:
            await bob.join(thread, since=0)
            approve = {"call_id": interrupt["toolCallId"], "decision": "approve"}
            await bob.send("TOOL_UPDATE", approve, transaction=thread)
            await seen(bob, thread, "RUN_FINISHED")
        # The client must still address its pending interrupt; the run then hands over what it missed.
        resume = [{"interruptId": interrupt["id"], "status": "resolved", "payload": {"approved": True}}]
        events, done = await driver.step(resume=resume)
        kinds = types(events)
        assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED" and "outcome" not in events[-1]
        assert "TOOL_CALL_RESULT" in kinds and text_of(events) == "Done counting."
        assert done["pendingInterrupts"] == []
    finally:
        driver.close()


async def test_an_input_request_is_an_interrupt_answered_with_the_input(
    runtime: LiveServer, vendor: VendorServer
) -> None:
    vendor.script(Reply(openai_tool_call("demo_ask_user", "{}", "call_9")), Reply(openai_text("Nice colour.")))
    await tools_connected(runtime)
    thread = f"thread-{uuid.uuid4()}"
    driver = Driver(runtime, "assistant", thread)
    try:
        events, _ = await driver.step(say="ask me something")
        [interrupt] = events[-1]["outcome"]["interrupts"]
        assert interrupt["reason"] == "input_required" and "colour" in interrupt["message"]
        assert set(interrupt["responseSchema"]["properties"]) == {"name", "favourite_colour"}
        # An answer that does not fit is refused before anything (a prober's find: the stream hung, and
        # the interrupt, taken out, could not be answered again): the good one goes through after it.
        wrong = {"name": 123, "favourite_colour": "green"}
        bad = {"threadId": thread, "runId": "r-bad", "messages": [],
               "resume": [{"interruptId": interrupt["id"], "status": "resolved", "payload": wrong}]}  # fmt: skip
        async with httpx.AsyncClient(base_url=runtime.http_url, timeout=30) as http:
            headers = {"authorization": f"Bearer {runtime.token('alice')}"}
            refused = await http.post("/ag-ui/assistant", json=bad, headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["detail"] == {"where": "/resume/0/payload/name"}
        assert "at /resume/0/payload/name" in refused.json()["error"]["message"]  # (not HAIP's /payload/input)
        answer = {"name": "Ada", "favourite_colour": "green"}
        resume = [{"interruptId": interrupt["id"], "status": "resolved", "payload": answer}]
        events, _ = await driver.step(resume=resume)
        [result] = [e for e in events if e["type"] == "TOOL_CALL_RESULT"]
        assert result["content"] == "Ada likes green"
        assert text_of(events) == "Nice colour."
    finally:
        driver.close()


async def test_two_first_runs_of_one_thread_at_once_make_one_transaction(runtime: LiveServer) -> None:
    thread = f"thread-{uuid.uuid4()}"
    headers = {"authorization": f"Bearer {runtime.token('alice')}"}
    answers: list[tuple[int, str]] = []

    async def first_run(number: int) -> None:
        body = {
            "threadId": thread,
            "runId": f"r{number}",
            "messages": [{"id": f"m{number}", "role": "user", "content": "hi"}],
        }
        async with httpx.AsyncClient(base_url=runtime.http_url, headers=headers, timeout=30) as http:
            answer = await http.post("/ag-ui/echo", json=body)
            answers.append((answer.status_code, answer.text))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first_run, 1)
        tg.start_soon(first_run, 2)
    statuses = [status for status, _ in answers]
    assert 200 in statuses and set(statuses) <= {200, 429}  # the second waits its turn, or is told a run is open
    # Each run that went ahead was answered to its end (one that waited for the first once reached nobody).
    assert all('"type":"RUN_FINISHED"' in text for status, text in answers if status == 200)
    transaction = runtime.runtime.hub.transactions.live[thread]
    assert transaction.owner == "alice" and list(transaction.agents) == ["echo"]


async def test_a_new_thread_past_the_users_open_transactions_ends_the_least_recently_active_one() -> None:
    """AG-UI has no way to end a thread: each new ``threadId`` is a transaction, and past
    ``limits.transactions_per_user`` the oldest idle one ends to make room (it was refused for good)."""
    config = make_config({"limits": {"transactions_per_user": 2}})
    with live_server(config) as live:
        statuses = []
        async with httpx.AsyncClient(
            base_url=live.http_url, headers={"authorization": f"Bearer {live.token('ann')}"}
        ) as http:
            for number in range(3):
                body = {
                    "threadId": f"t{number}",
                    "runId": "r",
                    "messages": [{"id": "m", "role": "user", "content": "hi"}],
                }
                statuses.append((await http.post("/ag-ui/echo", json=body)).status_code)
            again = await http.post("/ag-ui/echo", json={**body, "threadId": "t0", "runId": "r2"})
    # (between runs the AG-UI user leaves the thread's transaction: t0 had nobody in it when t2 came)
    assert statuses == [200, 200, 200]
    assert again.status_code == 404 and again.json()["error"]["message"] == "thread 't0' has ended"


async def test_a_body_past_the_limit_is_refused_before_it_is_read_whole(runtime: LiveServer) -> None:
    headers = {"authorization": f"Bearer {runtime.token('alice')}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=runtime.http_url) as http:
        answer = await http.post("/ag-ui/echo", content=b"[" + b" " * (5 * 1024 * 1024) + b"]", headers=headers)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "MESSAGE_TOO_LARGE"
