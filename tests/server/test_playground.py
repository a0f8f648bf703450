"""The browser playground, driven in Debian's Chromium (headless) against a real server and MCP server.

Each test clicks and types as a person would and waits on what the page shows. Screenshots go
to ``test-artifacts/`` (gitignored); ``docs/playground.png`` is one of them.
"""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Dialog, Locator, Page, WebSocketRoute, expect

from tests.support.serving import ROOT, LiveServer, live_server, make_config

ARTIFACTS = ROOT / "test-artifacts"
DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def playground_server() -> Iterator[LiveServer]:
    config = make_config(
        {
            "agents": {
                "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
                "beep": {"plugin": "tests.support.agents:BeepAgent"},
            },
            "mcp": {"servers": {"demo": {**DEMO, "require_approval": ["delete_everything"]}}},
            "roles": {"user": {"may_join_others": True}},  # a second person may join by id
        }
    )
    with live_server(config) as live:
        yield live


@pytest.fixture
def page(browser: Browser, playground_server: LiveServer, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh tab on the playground, logged in with a token in the URL; screenshot kept at the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{playground_server.http_url}/?token={playground_server.token('dev')}")
    ARTIFACTS.mkdir(exist_ok=True)
    expect(tab.locator("#connection")).to_have_attribute("data-state", "open")
    yield tab
    tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def start(page: Page, agent: str) -> None:
    page.click(f"li.agent[data-agent={agent}]")
    expect(page.locator("#transaction-id")).to_be_visible()
    if agent == "operator":
        expect(page.locator("li.tool[data-tool='demo.slow_count']")).to_be_visible()


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def card(page: Page, tool: str, index: int = 0) -> Locator:
    return page.locator(f".card[data-tool='{tool}']").nth(index)


#: Records every progress value a tool card shows, as the page shows it (not sampled by polling).
WATCH_PROGRESS = """() => {
  window.progressSeen = [];
  new MutationObserver((changes) => {
    for (const change of changes) window.progressSeen.push(change.target.dataset.progress);
  }).observe(document.getElementById("log"), {subtree: true, attributeFilter: ["data-progress"]});
}"""


def delivered(page: Page) -> list[int]:
    seqs: list[int] = page.evaluate("window.playground.delivered")
    return seqs


def test_the_page_is_served_at_root_with_its_modules(playground_server: LiveServer) -> None:
    with urllib.request.urlopen(f"{playground_server.http_url}/") as response:
        assert "<title>haip-runtime playground</title>" in response.read().decode()
    with urllib.request.urlopen(f"{playground_server.http_url}/playground/haip-client.js") as response:
        assert response.headers["content-type"].startswith("text/javascript")
        assert "export class HaipClient" in response.read().decode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{playground_server.http_url}/playground/__init__.py")
    assert refused.value.code == 404
    refused.value.close()


def test_typing_a_message_shows_the_streamed_answer_with_its_author(page: Page) -> None:
    expect(page.locator("li.agent")).to_have_count(
        4
    )  # echo, storyteller, operator, beep: TOOL_LIST outside a transaction
    start(page, "storyteller")
    say(page, "a dragon")
    expect(page.locator(".msg.mine")).to_have_text("dev" + "a dragon")
    answer = page.locator(".msg[data-author=storyteller]")
    expect(answer).to_contain_text("everyone who heard 'a dragon' smiled. The end.")
    expect(answer).not_to_have_class("streaming")
    expect(page.locator("#run")).to_be_hidden()


def test_a_message_over_the_servers_limit_is_refused_on_the_page_and_nothing_else_is_lost(page: Page) -> None:
    """A tester's find: 2,000,000 characters closed the socket (1009), and the page re-sent them at every
    resume, reconnecting for ever. The page now refuses them itself (the server's HAI says its limit)."""
    start(page, "storyteller")
    page.evaluate("document.getElementById('text').value = 'y'.repeat(2000000)")
    page.press("#text", "Enter")
    expect(page.locator(".note.error").last).to_contain_text("MESSAGE_TOO_LARGE: MESSAGE of 2000")
    assert page.eval_on_selector("#text", "t => t.value.length") == 2_000_000  # kept, to shorten
    expect(page.locator(".msg.mine")).to_have_count(0)
    say(page, "a dragon")
    expect(page.locator(".msg[data-author=storyteller]")).to_contain_text("everyone who heard 'a dragon' smiled")
    expect(page.locator("#connection-text")).to_have_text("connected as dev")  # one socket all along: no resume


def test_a_server_changing_its_tools_is_said_so_and_the_list_follows(page: Page) -> None:
    start(page, "operator")
    expect(page.locator("li.tool[data-tool='demo.add']")).to_be_visible()
    say(page, "/call demo.toggle_extra_tool")
    expect(page.locator("li.tool[data-tool='demo.extra']")).to_be_visible()
    expect(page.locator(".note", has_text="MCP server demo changed its tools")).to_have_count(1)
    say(page, "/call demo.toggle_extra_tool")  # and back, for the tests after this one
    expect(page.locator("li.tool[data-tool='demo.extra']")).to_have_count(0)
    expect(page.locator(".note", has_text="MCP server demo changed its tools")).to_have_count(2)


def test_the_slow_tool_shows_a_live_progress_bar_that_reaches_done(page: Page) -> None:
    start(page, "operator")
    page.evaluate(WATCH_PROGRESS)
    say(page, '/call demo.slow_count {"steps": 4, "delay": 0.25}')
    count = card(page, "demo.slow_count")
    expect(page.locator("#run")).to_be_visible()  # the run, with its stop button
    expect(count.locator(".progress-text")).to_have_text("step 4 of 4 · 4 of 4")
    expect(count).to_have_attribute("data-status", "OK")
    shown: list[str] = page.evaluate("window.progressSeen")
    fractions = [int(value.split("/")[0]) for value in shown]
    assert len(shown) >= 2 and shown[-1] == "4/4" and fractions == sorted(set(fractions)), shown  # live, in order
    expect(count.locator(".fill")).to_have_attribute("style", "width: 100%;")
    expect(count.locator(".result")).to_have_text("counted to 4")
    expect(page.locator(".msg[data-author=operator]")).to_contain_text("demo.slow_count returned: counted to 4")
    expect(page.locator("#run")).to_be_hidden()


def test_the_cancel_button_cancels_the_call_and_stop_ends_the_run(page: Page) -> None:
    start(page, "operator")
    say(page, '/call demo.sleep {"seconds": 30}')
    sleeping = card(page, "demo.sleep")
    expect(sleeping).to_have_attribute("data-status", "RUNNING")
    sleeping.locator("button.cancel").click()
    expect(sleeping).to_have_attribute("data-status", "CANCELLED")
    expect(sleeping.locator(".result")).to_contain_text("CANCELLED")
    say(page, '/call demo.sleep {"seconds": 30}')
    expect(card(page, "demo.sleep", 1)).to_have_attribute("data-status", "RUNNING")
    page.click("#stop")
    expect(card(page, "demo.sleep", 1)).to_have_attribute("data-status", "CANCELLED")
    expect(page.locator("#run")).to_be_hidden()


def test_stop_also_takes_out_the_messages_waiting_for_a_turn(page: Page) -> None:
    """A tester's find: six quick messages (four run, two wait under the run limit), Stop: the two waiting
    then ran to the end. The page now shows them waiting, and Stop takes them out of the queue too."""
    start(page, "operator")
    for _ in range(6):
        say(page, '/call demo.sleep {"seconds": 30}')
    expect(page.locator(".card[data-tool='demo.sleep'][data-status='RUNNING']")).to_have_count(4)
    expect(page.locator("#run-text")).to_have_text("operator is working… (2 messages waiting)")
    page.click("#stop")
    expect(page.locator(".card[data-tool='demo.sleep'][data-status='CANCELLED']")).to_have_count(4)
    expect(page.locator(".note.stopped", has_text="a message was not answered: cancelled by dev")).to_have_count(2)
    expect(page.locator("#run")).to_be_hidden()
    say(page, '/call demo.add {"a": 1, "b": 1}')  # the next message is answered at once: nothing was left waiting
    expect(card(page, "demo.add")).to_have_attribute("data-status", "OK")
    expect(page.locator(".card[data-tool='demo.sleep']")).to_have_count(4)


def test_one_call_approved_and_one_refused(page: Page) -> None:
    start(page, "operator")
    say(page, "/call demo.delete_everything")
    first = card(page, "demo.delete_everything")
    first.locator("button.approve").click()
    expect(first).to_have_attribute("data-status", "OK")
    expect(first.locator(".result")).to_have_text("pretended to delete everything")
    say(page, '/call demo.slow_count {"steps": 10, "delay": 0.15}')
    expect(card(page, "demo.slow_count")).to_have_attribute("data-status", "RUNNING")
    say(page, "/call demo.delete_everything")
    second = card(page, "demo.delete_everything", 1)
    second.locator("input.reason").fill("not today")
    expect(card(page, "demo.slow_count")).to_have_attribute("data-progress", re.compile("^[2-7]/10$"))
    page.screenshot(path=str(ARTIFACTS / "playground.png"))  # the one docs/playground.png comes from
    second.locator("button.reject").click()
    expect(second).to_have_attribute("data-status", "CANCELLED")
    expect(second.locator(".result")).to_contain_text("REJECTED")
    answers = page.locator(".msg[data-author=operator]")
    expect(answers.filter(has_text="delete_everything ended CANCELLED: rejected by dev: not today")).to_have_count(1)
    expect(card(page, "demo.slow_count")).to_have_attribute("data-status", "OK")


def test_an_input_request_is_a_form_made_from_its_schema(page: Page) -> None:
    start(page, "operator")
    say(page, "/call demo.ask_user")
    asking = card(page, "demo.ask_user")
    expect(asking).to_have_attribute("data-status", "INPUT_REQUIRED")
    expect(asking.locator(".question")).to_have_text("Who are you, and which colour do you like best?")
    asking.get_by_label("Name").fill("Ada")
    asking.get_by_label("Favourite Colour").fill("green")
    asking.get_by_role("button", name="Send").click()
    expect(asking).to_have_attribute("data-status", "OK")
    expect(asking.locator(".result")).to_have_text("Ada likes green")


def test_a_tool_is_called_directly_from_its_schema_form(page: Page) -> None:
    start(page, "operator")
    tool = page.locator("li.tool[data-tool='demo.add']")
    tool.locator("summary").click()
    expect(tool.locator("pre")).to_contain_text('"a"')  # TOOL_SCHEMA, fetched on demand
    tool.get_by_label("A").fill("2")
    tool.get_by_label("B").fill("3.5")
    tool.get_by_role("button", name="Call").click()
    added = card(page, "demo.add")
    expect(added).to_have_attribute("data-status", "OK")
    expect(added.locator(".caller")).to_have_text("called by dev")
    expect(added.locator(".result")).to_have_text("5.5")


def test_a_dropped_connection_resumes_with_nothing_missing_or_repeated(page: Page) -> None:
    start(page, "operator")
    say(page, '/call demo.slow_count {"steps": 6, "delay": 0.2}')
    counting = card(page, "demo.slow_count")
    expect(counting).to_have_attribute("data-progress", re.compile("^[1-4]/6$"))
    page.click("#drop")  # the socket closes as a network failure would; the call runs on
    say(page, "/help")  # sent while away: it waits and goes out after the resume
    expect(page.locator("#connection-text")).to_have_text("connected as dev (resumed)")
    expect(counting).to_have_attribute("data-status", "OK")
    expect(page.locator(".msg[data-author=operator]")).to_have_count(2)
    answers = page.locator(".msg[data-author=operator]")
    expect(answers.filter(has_text="returned: counted to 6")).to_have_count(1)
    expect(answers.filter(has_text="I run MCP tools for you")).to_have_count(1)  # answered while the call ran
    expect(page.locator(".card")).to_have_count(1)
    seqs = delivered(page)
    assert seqs == list(range(1, len(seqs) + 1))  # every envelope once, in order, across both sockets
    say(page, '/call demo.add {"a": 1, "b": 1}')
    expect(card(page, "demo.add")).to_have_attribute("data-status", "OK")


def test_a_server_restart_is_survived_by_rejoining_the_conversation(browser: Browser, tmp_path: Path) -> None:
    config = make_config({"storage": {"backend": "sqlite", "path": str(tmp_path / "haip.db")}})
    tab = browser.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    try:
        with live_server(config) as first:
            port, token = first.port, first.token("dev")  # the dev key is kept beside the database
            tab.goto(f"{first.http_url}/?token={token}")
            start(tab, "echo")
            say(tab, "before the restart")
            expect(tab.locator(".msg[data-author=echo]")).to_contain_text("before the restart")
        expect(tab.locator("#connection")).to_have_attribute("data-state", "reconnecting")
        say(tab, "while it was down")  # waits, and goes out in the new session after the rejoin
        with live_server(config, port=port):
            expect(tab.locator("#connection-text")).to_have_text("connected as dev (restarted)")
            rejoined = tab.locator(".note").filter(has_text="The server restarted: new session, conversation rejoined")
            expect(rejoined).to_have_count(1)
            expect(tab.locator(".msg[data-author=echo]").nth(1)).to_contain_text("while it was down")
            say(tab, "after the restart")
            expect(tab.locator(".msg[data-author=echo]").nth(2)).to_contain_text("after the restart")
            expect(tab.locator(".msg[data-author=echo]")).to_have_count(3)  # nothing repeated by the rejoin
            tab.screenshot(path=str(ARTIFACTS / "server-restart.png"))
    finally:
        tab.close()


def test_a_stalled_line_is_noticed_by_the_servers_heartbeat_and_the_page_resumes(browser: Browser) -> None:
    """A flaky-network tester's find: a line that stalls (a phone between cells: no FIN, no RST) closes
    nothing, and a browser's socket never says so; the page stayed "open" and what was typed went into the
    dead socket. The page now drops a line it has heard nothing on for twice the runtime's PING interval
    (its HAI says it) and 5 s, and resumes."""
    from tests.support.netcut import netcut

    quick = {"session": {"heartbeat_interval_seconds": 1, "heartbeat_timeout_seconds": 1}}
    config = make_config({**quick, "server": {"max_frame_bytes": 65536}})  # (the wait allows a frame at 32 KB/s)
    with live_server(config) as live, netcut(live.port) as line:
        tab = browser.new_page()
        tab.set_default_timeout(20_000)
        try:
            tab.goto(f"http://127.0.0.1:{line.port}/?token={live.token('dev')}")
            start(tab, "echo")
            line.cut("hang")
            say(tab, "typed on the stalled line")
            expect(tab.locator("#connection")).to_have_attribute("data-state", "reconnecting", timeout=20_000)
            line.heal()
            expect(tab.locator("#connection-text")).to_have_text("connected as dev (resumed)")
            expect(tab.locator(".msg[data-author=echo]")).to_contain_text("typed on the stalled line")
        finally:
            tab.close()


def test_a_socket_whose_handshake_never_comes_is_let_go_and_the_page_resumes(browser: Browser) -> None:
    """A re-tester's find: a reconnect whose socket opened on a line that then stalled (not a byte of the
    server's HAI) stayed "reconnecting" for good, what was typed never sent. A socket not ready in 15 s
    is let go now. Playwright stands between the page and the server: the second socket reaches nobody."""
    config = make_config({"session": {"heartbeat_interval_seconds": 1, "heartbeat_timeout_seconds": 1}})
    sockets: list[int] = []

    def route(ws: WebSocketRoute) -> None:
        sockets.append(len(sockets) + 1)
        if len(sockets) != 2:
            ws.connect_to_server()  # (the second: open, and silent)

    with live_server(config) as live:
        tab = browser.new_page()
        tab.set_default_timeout(30_000)
        try:
            tab.route_web_socket(re.compile(r".*/haip/websocket$"), route)
            tab.goto(f"{live.http_url}/?token={live.token('dev')}")
            start(tab, "echo")
            tab.click("#drop")
            say(tab, "typed while it reconnects")
            expect(tab.locator("#connection-text")).to_have_text("connected as dev (resumed)", timeout=30_000)
            expect(tab.locator(".msg[data-author=echo]")).to_contain_text("typed while it reconnects")
        finally:
            tab.close()
    assert len(sockets) == 3


def test_a_rejoin_that_skipped_events_marks_the_gap_in_an_answer_still_streaming(page: Page) -> None:
    """A flaky-network tester's find: away long enough for the rejoin to replay only the latest events (its
    TRANSACTION_JOIN says how many it left out: ``omitted``), the page showed an answer's start and end as
    one text, its middle missing without a word. The envelopes are given to the page as its client would."""
    start(page, "echo")
    page.evaluate(
        """() => {
          const state = window.playground;
          const give = (type, payload) => state.client.dispatchEvent(new CustomEvent("envelope",
            {detail: {type, payload, transaction: state.tx, channel: "AGENT", seq: "0"}}));
          give("MESSAGE_START", {message_id: "m-open", author: "storyteller"});
          give("MESSAGE_PART", {message_id: "m-open", text: "w0 w1"});
          give("TRANSACTION_JOIN", {members: ["dev"], agents: ["echo"], tseq: "900", omitted: 312});
          give("MESSAGE_PART", {message_id: "m-open", text: "w316 w317"});
          give("MESSAGE_END", {message_id: "m-open"});
        }"""
    )
    expect(page.locator(".note").filter(has_text="312 events were not replayed")).to_have_count(1)
    expect(page.locator(".msg[data-gap=true]")).to_contain_text("w0 w1 [… missed while away …] w316 w317")


def test_another_person_joins_and_speaks(browser: Browser, page: Page, playground_server: LiveServer) -> None:
    start(page, "echo")
    say(page, "first words")
    expect(page.locator(".msg[data-author=echo]")).to_contain_text("first words")
    transaction = page.locator("#transaction-id").inner_text()
    bob = browser.new_page()
    bob.set_default_timeout(TIMEOUT_MS)
    try:
        bob.goto(f"{playground_server.http_url}/?token={playground_server.token('bob')}")
        bob.fill("#join-id", transaction)
        bob.click("#join button")
        expect(bob.locator(".msg[data-author=echo]")).to_contain_text("first words")  # the history
        expect(page.locator(".note").filter(has_text="bob joined the conversation")).to_have_count(1)
        say(bob, "hello from bob")
        expect(page.locator(".msg[data-author=bob]")).to_have_text("bob" + "hello from bob")
        expect(page.locator(".msg[data-author=echo]").nth(1)).to_contain_text("hello from bob")
        expect(bob.locator(".msg[data-author=echo]").nth(1)).to_contain_text("hello from bob")
        page.screenshot(path=str(ARTIFACTS / "another-person-joins.png"))
    finally:
        bob.close()


def test_a_missing_token_asks_for_one(browser: Browser, playground_server: LiveServer) -> None:
    tab = browser.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    try:
        tab.goto(playground_server.http_url + "/")
        expect(tab.locator("#login")).to_be_visible()
        tab.fill("#token", "not-a-token")
        tab.click("#login button")
        expect(tab.locator(".note.error")).to_contain_text("AUTHENTICATION_FAILED")
        expect(tab.locator("#connection")).to_have_attribute("data-state", "closed")
    finally:
        tab.close()


def test_the_playground_is_off_when_configured_off() -> None:
    with live_server(make_config({"server": {"playground": False}})) as live:
        with urllib.request.urlopen(f"{live.http_url}/") as response:
            assert response.read().decode().startswith("haip-runtime: connect a HAIP client")


@contextmanager
def tab_for(browser: Browser, server: LiveServer, user: str, **context: Any) -> Iterator[Page]:
    """A tab of ``user`` (a fresh one per test: their conversation list is theirs alone), connected."""
    options: dict[str, Any] = {"viewport": {"width": 1280, "height": 860}, **context}
    browser_context = browser.new_context(**options)
    browser_context.set_default_timeout(TIMEOUT_MS)
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        tab.goto(f"{server.http_url}/?token={server.token(user)}")
        expect(tab.locator("#connection")).to_have_attribute("data-state", "open")
        yield tab
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / f"{user}.png"))
    finally:
        browser_context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_the_conversation_list_opens_yours_and_the_url_follows(browser: Browser, playground_server: LiveServer) -> None:
    with tab_for(browser, playground_server, "lisa") as tab:
        start(tab, "echo")
        say(tab, "the first talk")
        expect(tab.locator(".msg[data-author=echo]")).to_contain_text("the first talk")
        first = tab.locator("#transaction-id").inner_text()
        assert tab.evaluate("location.hash") == f"#/c/{first}"
        tab.click("#new-conversation")
        expect(tab.locator("#conversation-head")).to_have_text("Pick an agent to start a conversation.")
        start(tab, "storyteller")
        say(tab, "the second talk")
        expect(tab.locator(".msg[data-author=storyteller]")).to_contain_text("The end.")
        second = tab.locator("#transaction-id").inner_text()
        listed = tab.locator("#conversations li.conversation")
        expect(listed.locator(".title")).to_have_text(["the second talk", "the first talk"])  # newest first
        expect(listed.first.locator(".desc")).to_contain_text("storyteller")
        expect(listed.first).to_have_class(re.compile(r"\bactive\b"))
        listed.nth(1).click()
        expect(tab.locator("#transaction-id")).to_have_text(first)
        expect(tab.locator(".msg.mine")).to_contain_text("the first talk")  # yours, on your side, after the join
        assert tab.evaluate("location.hash") == f"#/c/{first}"
        tab.go_back()
        expect(tab.locator("#transaction-id")).to_have_text(second)
        expect(tab.locator(".msg.mine")).to_contain_text("the second talk")


def test_a_reload_or_a_shared_link_returns_to_the_open_conversation(
    browser: Browser, playground_server: LiveServer
) -> None:
    with tab_for(browser, playground_server, "rita") as tab:
        start(tab, "echo")
        say(tab, "remember this")
        expect(tab.locator(".msg[data-author=echo]")).to_contain_text("remember this")
        transaction = tab.locator("#transaction-id").inner_text()
        link = tab.url
        tab.reload()
        expect(tab.locator("#transaction-id")).to_have_text(transaction)
        expect(tab.locator(".msg.mine")).to_have_text("rita" + "remember this")
        expect(tab.locator(".msg[data-author=echo]")).to_have_count(1)  # the history, once
        say(tab, "and this")
        expect(tab.locator(".msg[data-author=echo]").nth(1)).to_contain_text("and this")
    with tab_for(browser, playground_server, "rita") as other:
        other.goto(link)
        expect(other.locator("#transaction-id")).to_have_text(transaction)
        expect(other.locator(".msg.mine")).to_have_count(2)


def test_on_a_phone_the_conversation_and_composer_come_first(browser: Browser, playground_server: LiveServer) -> None:
    with tab_for(browser, playground_server, "pavel", viewport={"width": 390, "height": 844}, is_mobile=True) as tab:
        expect(tab.locator("#sidebar")).to_be_hidden()
        expect(tab.locator("#composer")).to_be_in_viewport()
        tab.click("#menu")
        expect(tab.locator("#sidebar")).to_be_visible()
        start(tab, "echo")
        expect(tab.locator("#sidebar")).to_be_hidden()  # the conversation is what you see
        for part in ("#log", "#text", "#send", "#conversation-head"):
            expect(tab.locator(part)).to_be_in_viewport()
        say(tab, "hello from a phone " * 8)
        answer = tab.locator(".msg[data-author=echo]")
        expect(answer).to_contain_text("hello from a phone")
        box = answer.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        width = tab.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways: {width} px wide"
        tab.screenshot(path=str(ARTIFACTS / "phone.png"))


def test_markdown_is_rendered_and_html_in_a_message_is_only_text(
    browser: Browser, playground_server: LiveServer
) -> None:
    with tab_for(browser, playground_server, "mara") as tab:
        start(tab, "echo")
        tab.fill("#text", "**bold** and `code` <script>window.pwned = 1</script> <b>not bold</b>\n- one\n- two")
        tab.press("#text", "Enter")
        answer = tab.locator(".msg[data-author=echo] .text")
        expect(answer.locator("strong")).to_have_text("bold")
        expect(answer.locator("code")).to_have_text("code")
        expect(answer.locator("li")).to_have_text(["one", "two"])
        expect(answer).to_contain_text("<script>window.pwned = 1</script> <b>not bold</b>")
        assert tab.locator(".msg script, .msg b").count() == 0
        assert tab.evaluate("window.pwned") is None
        mine = tab.locator(".msg.mine .text")
        expect(mine.locator("strong")).to_have_text("bold")
        rendered = tab.evaluate(
            """() => { const box = document.createElement("div");
            import("/playground/markdown.js").then(({ renderMarkdown }) => {
              box.append(renderMarkdown("[x](javascript:alert(1)) [ok](https://example.org)\\n```\\n<i>raw</i>\\n```"));
              window.rendered = box.innerHTML;
            }); }"""
        )
        assert rendered is None
        tab.wait_for_function("window.rendered !== undefined")
        html = tab.evaluate("window.rendered")
        assert "[x](javascript:alert(1))" in html and 'href="https://example.org"' in html
        assert "<pre><code>&lt;i&gt;raw&lt;/i&gt;</code></pre>" in html


@pytest.mark.parametrize(("scheme", "background"), [("dark", "rgb(19, 22, 27)"), ("light", "rgb(246, 247, 249)")])
def test_the_colours_follow_the_system_setting(
    browser: Browser, playground_server: LiveServer, scheme: str, background: str
) -> None:
    with tab_for(browser, playground_server, f"{scheme}-user", color_scheme=scheme) as tab:
        assert tab.evaluate("getComputedStyle(document.body).backgroundColor") == background
        panel = tab.evaluate("getComputedStyle(document.querySelector('aside')).backgroundColor")
        assert panel == ("rgb(27, 31, 38)" if scheme == "dark" else "rgb(255, 255, 255)")


def test_leaving_a_tool_that_waits_for_you_asks_first_and_a_stop_leaves_a_note(
    browser: Browser, playground_server: LiveServer
) -> None:
    with tab_for(browser, playground_server, "ines") as tab:
        start(tab, "operator")
        say(tab, "/call demo.ask_user")
        expect(card(tab, "demo.ask_user")).to_have_attribute("data-status", "INPUT_REQUIRED")
        transaction = tab.locator("#transaction-id").inner_text()
        asked: list[str] = []

        def decline_to_leave(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.dismiss()

        tab.once("dialog", decline_to_leave)
        tab.click("#new-conversation")
        expect(tab.locator("#transaction-id")).to_have_text(transaction)  # stayed
        assert asked == ["demo.ask_user is waiting for your answer in this conversation. Leave it unanswered?"]
        card(tab, "demo.ask_user").locator("button.decline").click()
        expect(card(tab, "demo.ask_user")).to_have_attribute("data-status", re.compile("OK|ERROR|CANCELLED"))
        say(tab, '/call demo.sleep {"seconds": 30}')
        expect(card(tab, "demo.sleep")).to_have_attribute("data-status", "RUNNING")
        tab.click("#stop")
        expect(tab.locator(".note.stopped")).to_have_text("operator's turn was stopped")
        tab.click("#new-conversation")  # nothing waits for an answer now: no question
        expect(tab.locator("#conversation-head")).to_have_text("Pick an agent to start a conversation.")


def test_an_agent_s_audio_is_a_player(browser: Browser, playground_server: LiveServer) -> None:
    with tab_for(browser, playground_server, "olga") as tab:
        start(tab, "beep")
        say(tab, "beep please")
        clip = tab.locator(".msg.audio[data-author=beep]")
        expect(clip.locator("audio[controls]")).to_have_count(1)
        expect(clip).to_contain_text("0.3 s")
        assert clip.locator("audio").get_attribute("src").startswith("blob:")  # type: ignore[union-attr]
        expect(tab.locator("audio")).to_have_count(1)  # voice.js plays spoken answers only: no second player
        duration = tab.wait_for_function(
            "() => { const a = document.querySelector('.msg.audio audio'); return a.duration > 0 && a.duration; }"
        ).json_value()
        assert abs(float(duration) - 0.25) < 0.01  # the browser decoded the clip itself
