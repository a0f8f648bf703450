"""A plain browser ``EventSource`` (Debian's Chromium, headless) on the SSE transport, across drops the server makes.

The page runs no HAIP client library: an ``EventSource`` made with ``/haip/sse?token=...`` and ``fetch``
POSTs, as a front-end developer would write them. The server drops the stream the way it drops any silent
peer (the page stops answering PINGs); the browser reconnects to the same URL by itself, sending
``Last-Event-ID``, and the session resumes (PROTOCOL.md sections 1 and 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from tests.support.serving import LiveServer, live_server, make_config

TIMEOUT_MS = 20_000

#: The page's whole client: an EventSource, POSTs for what it sends, PONG for every PING while ``answer``.
CLIENT = """(token) => {
  const h = window.h = {events: [], opens: [], errors: 0, answer: true, posts: [], session: null, seq: 0};
  h.post = async (type, payload, transaction = null, channel = "SYSTEM") => {
    h.seq += 1;
    const envelope = {id: crypto.randomUUID(), session: h.session, transaction, seq: String(h.seq),
                      ts: String(Date.now()), channel, type, payload};
    const readyState = h.source.readyState;
    const response = await fetch(`/haip/sse/${h.session}`, {method: "POST", body: JSON.stringify(envelope),
      headers: {"content-type": "application/json", authorization: `Bearer ${token}`}});
    h.posts.push({type, status: response.status, readyState});
  };
  h.source = new EventSource(`/haip/sse?token=${token}`);
  h.source.onopen = () => h.opens.push(h.events.length);
  h.source.onerror = () => {
    h.errors += 1;
    h.answer = true;  // the resumed stream is kept
    if (h.onDrop) { const dropped = h.onDrop; h.onDrop = null; dropped(); }
  };
  h.source.onmessage = (event) => {
    const envelope = JSON.parse(event.data);
    h.events.push({id: event.lastEventId, envelope});
    if (envelope.type === "HAI" && h.session === null) {
      h.session = envelope.session;
      h.post("HAI", {haip_version: "1.1.2", accept_major: [1], accept_events: envelope.payload.accept_events});
    }
    if (envelope.type === "PING" && h.answer) h.post("PONG", envelope.payload);
  };
}"""


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    config = make_config(
        {
            "agents": {
                "storyteller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": 5},
                }
            },
            "session": {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 1},
        }
    )
    with live_server(config) as live:
        yield live


@pytest.fixture
def page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    """A tab on the server's origin (its /health page), running ``CLIENT``, with the session ready."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    tab.goto(f"{server.http_url}/health")
    tab.evaluate(CLIENT, server.token("dev"))
    tab.wait_for_function("window.h.events.some((e) => e.envelope.payload.event === 'session.ready')")
    yield tab
    context.close()


def start(page: Page, agent: str) -> str:
    page.evaluate("(agent) => window.h.post('TRANSACTION_START', {toolName: agent}, 'ref')", agent)
    handle = page.wait_for_function(
        "window.h.events.find((e) => e.envelope.type === 'TRANSACTION_START')?.envelope.transaction"
    )
    transaction: str = handle.json_value()
    return transaction


def say(page: Page, transaction: str, text: str) -> None:
    page.evaluate("([tx, text]) => window.h.post('MESSAGE', text, tx, 'USER')", [transaction, text])


def events(page: Page) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = page.evaluate("window.h.events")
    return seen


def check_once_in_order(page: Page) -> list[dict[str, Any]]:
    """Every event arrived once, in order, in one session, each with the id ``<session>:<seq>``."""
    seen = events(page)
    session = page.evaluate("window.h.session")
    assert [e["envelope"]["session"] for e in seen] == [session] * len(seen)
    assert [int(e["envelope"]["seq"]) for e in seen] == list(range(1, len(seen) + 1))
    assert [e["id"] for e in seen] == [f"{session}:{e['envelope']['seq']}" for e in seen]
    return seen


def test_an_event_source_resumes_by_itself_across_a_server_side_drop(page: Page) -> None:
    transaction = start(page, "storyteller")
    say(page, transaction, "a dragon")
    page.wait_for_function("window.h.events.some((e) => e.envelope.type === 'MESSAGE_PART')")
    page.evaluate("window.h.answer = false")  # silent from now: the server drops the stream, the story goes on
    page.wait_for_function("window.h.opens.length === 2")
    page.wait_for_function("window.h.events.some((e) => e.envelope.type === 'RUN_FINISHED')")
    seen = check_once_in_order(page)
    second_stream = seen[page.evaluate("window.h.opens[1]") :]
    ready = next(e["envelope"] for e in second_stream if e["envelope"]["payload"].get("event") == "session.ready")
    backlog = [e["envelope"] for e in second_stream if int(e["envelope"]["seq"]) < int(ready["seq"])]
    assert ready["payload"]["resumed"] is True and page.evaluate("window.h.errors") == 1
    assert any(e["type"] == "MESSAGE_PART" for e in backlog)  # told while the stream was down, delivered after
    story = "".join(e["envelope"]["payload"]["text"] for e in seen if e["envelope"]["type"] == "MESSAGE_PART")
    assert story == (
        "Once upon a time, someone said 'a dragon'. The words travelled far, and everyone who heard 'a dragon' "
        "smiled. The end."
    )


def test_a_post_while_the_stream_is_down_is_accepted_and_answered_after_the_resume(page: Page) -> None:
    transaction = start(page, "echo")
    page.evaluate(
        "(tx) => { window.h.onDrop = () => window.h.post('MESSAGE', 'sent while away', tx, 'USER'); }", transaction
    )
    page.evaluate("window.h.answer = false")
    page.wait_for_function("window.h.opens.length === 2")
    page.wait_for_function("window.h.events.some((e) => e.envelope.payload.text === 'you said: sent while away')")
    seen = check_once_in_order(page)
    posts: list[dict[str, Any]] = page.evaluate("window.h.posts")
    while_away = [post for post in posts if post["type"] == "MESSAGE"]
    assert while_away == [{"type": "MESSAGE", "status": 202, "readyState": 0}]  # 0: CONNECTING, between streams
    answers = [e for e in seen if e["envelope"]["payload"].get("text") == "you said: sent while away"]
    assert len(answers) == 1 and answers[0]["envelope"]["transaction"] == transaction
