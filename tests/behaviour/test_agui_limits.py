"""The AG-UI door under the same limits as the other doors: the user's message rate, and the run
queue (a message past the run limit waits and is answered, it is not refused)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx2
import pytest

from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio


def run_input(thread: str, text: str) -> dict[str, Any]:
    message = {"id": uuid.uuid4().hex, "role": "user", "content": text}
    return {"threadId": thread, "runId": uuid.uuid4().hex, "state": {}, "tools": [], "context": [],
            "forwardedProps": {}, "messages": [message]}  # fmt: skip


async def post(live: LiveServer, agent: str, body: dict[str, Any], token: str) -> tuple[int, str]:
    async with httpx2.AsyncClient(timeout=30) as client:
        headers = {"authorization": f"Bearer {token}"}
        async with client.stream("POST", f"{live.http_url}/ag-ui/{agent}", json=body, headers=headers) as response:
            return response.status_code, (await response.aread()).decode()


async def test_ag_ui_messages_count_against_the_users_message_rate() -> None:
    config = make_config({"limits": {"user_messages_per_second": 0.01, "user_message_burst": 2}})
    with live_server(config) as live:
        token, thread = live.token("alice"), "t-" + uuid.uuid4().hex
        answers = [await post(live, "echo", run_input(thread, f"hi {n}"), token) for n in range(3)]
    assert [status for status, _ in answers] == [200, 200, 429]
    assert '"code":"RATE_LIMITED"' in answers[2][1] and '"limit":"limits.user_messages_per_second"' in answers[2][1]


async def test_the_first_message_of_a_thread_waits_for_the_greeting_under_a_run_limit_of_one() -> None:
    """The agent greets (on_start) as the thread starts: the message waits in the queue, then is answered."""
    config = make_config(
        {"session": {"max_concurrent_runs": 1}, "agents": {"greeter": {"plugin": "tests.support.agents:GreeterAgent"}}}
    )
    with live_server(config) as live:
        status, stream = await post(live, "greeter", run_input("t-" + uuid.uuid4().hex, "hi"), live.token("alice"))
    assert status == 200 and "user:hi" in stream and '"type":"RUN_FINISHED"' in stream.replace(" ", "")


async def test_a_message_over_the_frame_limit_and_a_thread_id_with_a_line_break_are_refused() -> None:
    """A hostile probe's finds: AG-UI took messages HAIP refuses (server.max_frame_bytes), which members'
    clients then could not take; and a threadId with a line break wrote events of its creator's choosing
    into the SSE stream of everyone following the thread (it is each event's ``id:`` line)."""
    config = make_config({"server": {"max_frame_bytes": 65536}})
    with live_server(config) as live:
        token = live.token("alice")
        big = await post(live, "echo", run_input("t-" + uuid.uuid4().hex, "x" * 65536), token)
        forged = await post(live, "echo", run_input("t\r\nevent: forged\r\ndata: {}\r\n\r\nid: 9", "hi"), token)
        fine = await post(live, "echo", run_input("t-" + uuid.uuid4().hex, "x" * 60000), token)
        threads = list(live.runtime.hub.transactions.live)
    assert big[0] == 413 and '"code":"MESSAGE_TOO_LARGE"' in big[1]
    assert forged[0] == 400 and "printable" in forged[1] and not any("\n" in thread for thread in threads)
    assert fine[0] == 200 and '"type":"RUN_FINISHED"' in fine[1]
