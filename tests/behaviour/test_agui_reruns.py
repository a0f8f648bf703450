"""What an AG-UI front-end does between runs, against a live runtime: a run that sends its user message
again (a retry, or a run after a front-end tool's result: AG-UI clients send the whole conversation
each time), a run with no message at all, content that is not text, and a "stop" (the client aborts
its request) followed by a new message. Found by an AG-UI tester: the first two answered the old
message again, or opened a transaction for nothing; the last was refused for the rest of the run."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.client.haip_client import HaipClient
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    config = make_config(
        {
            "agents": {"patient": {"plugin": "tests.support.agents:PatientAgent"}},
            "roles": {"user": {}, "support": {"may_join_others": True}},
        }
    )
    with live_server(config) as server:
        yield server


def user(text: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "role": "user", "content": text}


def body(thread: str, *messages: dict[str, Any]) -> dict[str, Any]:
    return {"threadId": thread, "runId": uuid.uuid4().hex, "state": {}, "tools": [], "context": [],
            "forwardedProps": {}, "messages": list(messages)}  # fmt: skip


def events_of(stream: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]


async def post(live: LiveServer, agent: str, run: dict[str, Any]) -> httpx2.Response:
    headers = {"authorization": f"Bearer {live.token('alice')}"}
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
        return await http.post(f"/ag-ui/{agent}", json=run, headers=headers)


async def said(live: LiveServer, thread: str) -> list[str]:
    """What the thread's REST history holds, ``author: text`` each."""
    headers = {"authorization": f"Bearer {live.token('alice')}"}
    async with httpx2.AsyncClient(base_url=live.http_url) as http:
        answer = await http.get(f"/haip/transactions/{thread}/messages", headers=headers)
    return [f"{m['author']}: {m['text']}" for m in answer.json()["messages"]]


async def test_a_run_that_sends_its_user_message_again_is_refused_and_nothing_is_repeated(live: LiveServer) -> None:
    thread, first = "t-" + uuid.uuid4().hex, user("only once please")
    answered = await post(live, "echo", body(thread, first))
    assert answered.status_code == 200 and events_of(answered.text)[-1]["type"] == "RUN_FINISHED"
    reply = {"id": uuid.uuid4().hex, "role": "assistant", "content": "you said: only once please"}
    tool = {"id": uuid.uuid4().hex, "role": "tool", "toolCallId": "c1", "content": "42"}
    for again in (body(thread, first), body(thread, first, reply, tool)):
        refused = await post(live, "echo", again)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "INVALID_PAYLOAD"
        assert error["detail"] == {"where": "/messages/0/id"} and "Last-Event-ID" in error["message"]
    follow_up = await post(live, "echo", body(thread, first, reply, user("and this")))
    assert follow_up.status_code == 200
    assert await said(live, thread) == [
        "alice: only once please",
        "echo: you said: only once please",
        "alice: and this",
        "echo: you said: and this",
    ]


async def test_a_run_with_no_user_message_is_refused_before_anything_is_made(live: LiveServer) -> None:
    thread = "t-" + uuid.uuid4().hex
    assistant_only = {"id": "a1", "role": "assistant", "content": "hello"}
    for run in (body(thread), body(thread, assistant_only)):
        refused = await post(live, "echo", run)
        assert refused.status_code == 400 and refused.json()["error"]["detail"] == {"where": "/messages"}
    assert thread not in live.runtime.hub.transactions.live
    assert await live.runtime.hub.store.transaction(thread) is None  # (it counted against the user's quota)


async def test_content_other_than_text_is_refused_not_dropped(live: LiveServer) -> None:
    image = {"type": "image", "source": {"type": "data", "value": "aGk=", "mimeType": "image/png"}}
    message = {"id": "u1", "role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}
    refused = await post(live, "echo", body("t-" + uuid.uuid4().hex, message))
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["detail"] == {"where": "/messages/0/content/1"}


async def test_a_stopped_run_is_cancelled_when_its_client_sends_the_next_message(live: LiveServer) -> None:
    """The front-end's "stop" aborts its request; its next message cancels the run it left, where it was
    refused (RUN_LIMIT_EXCEEDED) until that run ended by itself. A run whose client still reads it is not."""
    thread, headers = "t-" + uuid.uuid4().hex, {"authorization": f"Bearer {live.token('alice')}"}
    async with HaipClient(live.ws_url, token=live.token("alice")) as watcher:
        async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
            async with http.stream("POST", "/ag-ui/patient", json=body(thread, user("wait")), headers=headers) as first:
                lines = first.aiter_lines()  # (kept: an iterator let go of closes the stream when collected)
                async for line in lines:
                    if line.startswith("data: ") and json.loads(line[6:]).get("delta") == "waiting":
                        break  # the run is under way, and this client still reads it
                await watcher.join(thread, since=0)
                busy = await post(live, "patient", body(thread, user("hello")))
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "RUN_LIMIT_EXCEEDED", busy.text
            # The stream is closed: the front-end stopped. Its next message goes through.
            with anyio.fail_after(20):
                answered = await post(live, "patient", body(thread, user("hello again")))
            events = events_of(answered.text)
            assert answered.status_code == 200 and events[-1]["type"] == "RUN_FINISHED"
            assert "you said: hello again" in "".join(e.get("delta", "") for e in events)
        cancelled = await watcher.wait_for(
            lambda e: e.transaction == thread and e.type == "RUN_FINISHED" and e.get("status") == "CANCELLED",
            timeout=10,
        )
    assert cancelled.get("status") == "CANCELLED"


async def test_a_run_refused_for_one_still_open_adds_no_agent_to_the_thread(live: LiveServer) -> None:
    """An integrator's find: a POST to another agent, refused while the thread's run was read, had added that
    agent, which then answered every later message of the thread."""
    thread, headers = "t-" + uuid.uuid4().hex, {"authorization": f"Bearer {live.token('alice')}"}
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
        async with http.stream("POST", "/ag-ui/patient", json=body(thread, user("wait")), headers=headers) as first:
            lines = first.aiter_lines()
            await until_waiting(lines)
            busy = await post(live, "echo", body(thread, user("hello")))
            agents = list(live.runtime.hub.transactions.live[thread].agents)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "RUN_LIMIT_EXCEEDED", busy.text
    assert agents == ["patient"]


async def until_waiting(lines: Any) -> None:
    """Read a patient run's stream until it says it waits (the iterator is kept by the caller: one let
    go of closes the stream when collected)."""
    with anyio.fail_after(10):
        async for line in lines:
            if line.startswith("data: ") and json.loads(line[6:]).get("delta") == "waiting":
                return


async def test_two_runs_posted_at_once_run_one_and_refuse_the_other(live: LiveServer) -> None:
    """A reviewer's find: between a run's opening and its client's first read, the run had no reader, so
    a second POST at once (two tabs, a double click) took it for stopped and cancelled it."""
    thread, headers = "t-" + uuid.uuid4().hex, {"authorization": f"Bearer {live.token('alice')}"}
    outcomes: list[tuple[int, str]] = []
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:

        async def one() -> None:
            async with http.stream("POST", "/ag-ui/patient", json=body(thread, user("wait")), headers=headers) as run:
                if run.status_code != 200:
                    outcomes.append((run.status_code, json.loads(await run.aread())["error"]["code"]))
                    return
                lines = run.aiter_lines()
                await until_waiting(lines)
                outcomes.append((200, "waiting"))
                with anyio.move_on_after(1.5):  # (the other is refused within ABANDON_WAIT: still reading)
                    async for line in lines:
                        if '"RUN_FINISHED"' in line:
                            outcomes.append((200, "finished"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    assert sorted(outcomes) == [(200, "waiting"), (429, "RUN_LIMIT_EXCEEDED")]


async def test_a_run_refused_or_without_a_message_leaves_the_stopped_run_alone() -> None:
    """A reviewer's finds: a new run refused (its message past the user's rate), or with no user message,
    had already cancelled the run its client had stopped reading; the latter then failed in a 200."""
    config = make_config(
        {
            "agents": {"patient": {"plugin": "tests.support.agents:PatientAgent"}},
            "limits": {"user_messages_per_second": 0.01, "user_message_burst": 1},
        }
    )
    with live_server(config) as server:
        thread, headers = "t-" + uuid.uuid4().hex, {"authorization": f"Bearer {server.token('alice')}"}
        wait = user("wait")
        async with httpx2.AsyncClient(base_url=server.http_url, timeout=30) as http:
            async with http.stream("POST", "/ag-ui/patient", json=body(thread, wait), headers=headers) as first:
                lines = first.aiter_lines()
                await until_waiting(lines)
            transaction = server.runtime.hub.transactions.live[thread]
            assistant = {"id": uuid.uuid4().hex, "role": "assistant", "content": "waiting"}
            empty = await http.post("/ag-ui/patient", json=body(thread, wait, assistant), headers=headers)
            refused = await http.post("/ag-ui/patient", json=body(thread, wait, user("hello")), headers=headers)
            running = list(transaction.runs)
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "INVALID_PAYLOAD"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMITED"
    assert len(running) == 1  # the stopped run goes on: nothing was done


async def test_another_members_message_is_not_sent_again_as_the_ag_ui_users(live: LiveServer) -> None:
    """A reviewer's find: bob's message, shown to alice's AG-UI client as a user message, was the newest
    user message of her next run with nothing new of hers, and was sent again, as hers."""
    thread, headers = "t-" + uuid.uuid4().hex, {"authorization": f"Bearer {live.token('alice')}"}
    mine, bobs = user("wait"), {"id": "bob-1", "role": "user", "content": "bob was here"}
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
        async with http.stream("POST", "/ag-ui/patient", json=body(thread, mine), headers=headers) as first:
            lines = first.aiter_lines()
            await until_waiting(lines)
            async with HaipClient(live.ws_url, token=live.token("bob", roles=["support"])) as bob:
                await bob.join(thread, since=0)
                await bob.send_text(thread, "bob was here", message_id="bob-1")
                await bob.wait_for(lambda e: e.type == "MESSAGE_END" and e.transaction == thread, timeout=10)
        again = await http.post("/ag-ui/patient", json=body(thread, mine, bobs), headers=headers)
    error = again.json()["error"]
    assert again.status_code == 400 and error["detail"] == {"where": "/messages/1/id"}
    assert "not new: 'bob' sent it" in error["message"]
    assert "alice: bob was here" not in await said(live, thread)


async def test_a_hostile_body_is_refused_and_changes_nothing(live: LiveServer) -> None:
    """A prober's finds: a message id of 3,000,000 characters was taken into the log (and killed, at every
    join and resume, members whose clients hold the HAI's frame limit); a body 1,000 deep was a 500 with a
    traceback; Last-Event-ID on a new thread made the thread and a stream that sent nothing."""
    thread = "t-" + uuid.uuid4().hex
    long_id = {"id": "x" * 3000, "role": "user", "content": "hi"}
    deep = json.dumps({**body(thread, user("hi")), "forwardedProps": None}).replace(
        '"forwardedProps": null', '"forwardedProps": ' + "[" * 1000 + "]" * 1000
    )
    headers = {"authorization": f"Bearer {live.token('alice')}"}
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
        ids = await http.post("/ag-ui/echo", json=body(thread, long_id), headers=headers)
        nested = await http.post("/ag-ui/echo", content=deep, headers={**headers, "content-type": "application/json"})
        following = await http.post(
            "/ag-ui/echo", json=body(thread, user("hi")), headers={**headers, "last-event-id": f"{thread}:0"}
        )
    assert ids.status_code == 400 and ids.json()["error"]["detail"] == {"where": "/messages/0/id"}
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "INVALID_PAYLOAD"
    assert following.status_code == 404 and following.json()["error"]["code"] == "RESUME_FAILED"
    assert thread not in live.runtime.hub.transactions.live  # none of them made the thread


async def test_a_last_event_id_of_thousands_of_digits_is_refused_not_a_500(live: LiveServer) -> None:
    """A prober's find: 5,000 nines passed ``isdecimal()``, then ``int()`` refused them (Python's
    4,300-digit limit): a 500 with a traceback."""
    thread, first = "t-" + uuid.uuid4().hex, user("hi")
    assert (await post(live, "echo", body(thread, first))).status_code == 200
    headers = {"authorization": f"Bearer {live.token('alice')}", "last-event-id": f"{thread}:{'9' * 5000}"}
    async with httpx2.AsyncClient(base_url=live.http_url, timeout=30) as http:
        following = await http.post("/ag-ui/echo", json=body(thread, first), headers=headers)
    assert following.status_code == 404 and following.json()["error"]["code"] == "RESUME_FAILED"
    assert len(following.json()["error"]["message"]) < 400


async def test_an_older_messages_long_id_from_a_haip_member_locks_nobody_out(live: LiveServer) -> None:
    """A reviewer's find: the id bound was applied to every message of the body, and an AG-UI client
    sends its whole history, which holds the messages other members sent over HAIP, ids as they gave
    them: one of 200 characters locked the client out of the thread for good."""
    thread, first = "t-" + uuid.uuid4().hex, user("hi")
    assert (await post(live, "echo", body(thread, first))).status_code == 200
    theirs = {"id": "h" * 200, "role": "user", "content": "from the other tab"}
    answered = await post(live, "echo", body(thread, first, theirs, user("and now")))
    assert answered.status_code == 200 and "you said: and now" in answered.text


async def test_a_run_refused_for_the_runs_its_agent_would_need_adds_nothing_and_blocks_nothing() -> None:
    """A reviewer's find: with one run a session, a run naming a second agent was refused (it needs two),
    after that agent had joined the thread and its refused run had been opened: every later run of the
    user was refused as "already open"."""
    with live_server(make_config({"session": {"max_concurrent_runs": 1}})) as server:
        thread = "t-" + uuid.uuid4().hex
        first = await post(server, "echo", body(thread, user("one")))
        refused = await post(server, "storyteller", body(thread, user("two")))
        agents = list(server.runtime.hub.transactions.live[thread].agents)
        again = await post(server, "echo", body(thread, user("three")))
    assert first.status_code == 200 and refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "RUN_LIMIT_EXCEEDED" and agents == ["echo"]
    assert again.status_code == 200 and events_of(again.text)[-1]["type"] == "RUN_FINISHED", again.text
