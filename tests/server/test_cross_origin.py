"""A page on another origin (a front end on its dev server) using the runtime's HTTP doors from a real
browser (Debian's Chromium, headless): CORS for the origins in ``server.allowed_origins``.

A front-end tester found that such a page could open the WebSocket and nothing else: an ``EventSource``
on ``/haip/sse`` could not be read, a POST with ``Authorization`` failed its preflight (405), and the
REST history was unreadable. Here the page runs the SSE transport (the stream, and POSTs with a bearer
token), reads ``/haip/transactions``, and a page of an origin not on the list is refused.
"""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, Page

from tests.support.serving import LiveServer, live_server, make_config

TIMEOUT_MS = 20_000


@contextmanager
def page_origin() -> Iterator[str]:
    """A static server on 127.0.0.1 for the page: another port is another origin."""

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>front end</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Blank) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    with page_origin() as listed, page_origin() as other:
        yield listed, other


@pytest.fixture(scope="module")
def server(origins: tuple[str, str]) -> Iterator[LiveServer]:
    with live_server(make_config({"server": {"allowed_origins": [origins[0] + "/"]}})) as live:
        yield live


def tab(browser: Browser, origin: str) -> Page:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(origin)
    return page


#: The page's client: an EventSource on the runtime's origin, POSTs with a bearer token, one echo.
TALK = """async ([api, token]) => {
  const seen = [];
  let session = null, seq = 0;
  const post = async (type, payload, transaction = null, channel = "SYSTEM") => {
    seq += 1;
    const envelope = {id: crypto.randomUUID(), session, transaction, seq: String(seq), ts: String(Date.now()),
                      channel, type, payload};
    const response = await fetch(`${api}/haip/sse/${session}`, {method: "POST", body: JSON.stringify(envelope),
      headers: {"content-type": "application/json", authorization: `Bearer ${token}`}});
    return response.status;
  };
  const answered = new Promise((resolve, reject) => {
    const source = new EventSource(`${api}/haip/sse?token=${token}`);
    source.onerror = () => reject(new Error("the stream failed"));
    source.onmessage = async (event) => {
      const envelope = JSON.parse(event.data);
      seen.push(envelope.type);
      if (envelope.type === "HAI" && session === null) {
        session = envelope.session;
        await post("HAI", {haip_version: "1.1.2", accept_major: [1], accept_events: envelope.payload.accept_events});
      } else if (envelope.payload?.event === "session.ready") {
        await post("TRANSACTION_START", {toolName: "echo"}, "ref");
      } else if (envelope.type === "TRANSACTION_START") {
        await post("MESSAGE", "hello from another origin", envelope.transaction, "USER");
      } else if (envelope.type === "MESSAGE_PART" || (envelope.type === "MESSAGE" && envelope.channel === "AGENT")) {
        source.close();
        resolve(envelope.payload.text ?? envelope.payload);
      }
    };
  });
  const text = await answered;
  const listed = await fetch(`${api}/haip/transactions`, {headers: {authorization: `Bearer ${token}`}});
  return {text, history: listed.status, conversations: (await listed.json()).transactions.length};
}"""

#: An AG-UI run from the page, as ``@ag-ui/client``'s HttpAgent posts it: the events' types, in order.
AGUI = """async ([api, token]) => {
  const body = {threadId: crypto.randomUUID(), runId: "r1", state: {}, tools: [], context: [], forwardedProps: {},
                messages: [{id: "m1", role: "user", content: "hello over ag-ui"}]};
  const response = await fetch(`${api}/ag-ui/echo`, {method: "POST", body: JSON.stringify(body),
    headers: {"content-type": "application/json", accept: "text/event-stream", authorization: `Bearer ${token}`}});
  const text = await response.text();
  return text.split("\\n").filter((line) => line.startsWith("data: ")).map((line) => JSON.parse(line.slice(6)).type);
}"""

#: A read of the REST history from the page: its status, or the browser's refusal.
READ = """async ([api, token]) => {
  try {
    const response = await fetch(`${api}/haip/transactions`, {headers: {authorization: `Bearer ${token}`}});
    return String(response.status);
  } catch (error) {
    return `refused: ${error.name}`;
  }
}"""


def test_a_page_of_a_listed_origin_talks_over_sse_and_reads_the_history(
    browser: Browser, server: LiveServer, origins: tuple[str, str]
) -> None:
    page = tab(browser, origins[0])
    result = page.evaluate(TALK, [server.http_url, server.token("dev")])
    assert result == {"text": "you said: hello from another origin", "history": 200, "conversations": 1}


def test_a_page_of_a_listed_origin_runs_an_agent_over_ag_ui(
    browser: Browser, server: LiveServer, origins: tuple[str, str]
) -> None:
    page = tab(browser, origins[0])
    types = page.evaluate(AGUI, [server.http_url, server.token("dev")])
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED" and "TEXT_MESSAGE_CONTENT" in types, types


def test_a_page_of_another_origin_is_refused_by_the_browser_and_the_runtime(
    browser: Browser, server: LiveServer, origins: tuple[str, str]
) -> None:
    page = tab(browser, origins[1])
    assert page.evaluate(READ, [server.http_url, server.token("dev")]) == "refused: TypeError"
