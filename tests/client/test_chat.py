"""``haip-runtime chat`` as a person uses it: a real process in a pseudo-terminal, a real server and MCP server.

The terminal side is pexpect; the screen is read with ANSI escapes stripped, and the chat's
cursor-position requests are answered as a real terminal would (prompt_toolkit draws the live
area under the prompt only once it knows where the cursor is).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pexpect
import pytest

from haip_runtime.client import ClientError
from haip_runtime.client.chat import field_value, signature, websocket_url
from haip_runtime.client.view import readable_error
from tests.support import serving
from tests.support.serving import ROOT, LiveServer, live_server, make_config

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
CURSOR_REQUEST = "\x1b[6n"


def chat_config() -> dict[str, object]:
    return {
        "agents": {
            "operator": {"plugin": "operator", "mcp_servers": ["demo"]},
            # slow enough to see the answer stream in the live area before its line is printed
            "storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 20}},
            # slow enough for another chat to join while it streams (about 9 s a story)
            "slowteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 2}},
            "poet": {"plugin": "tests.support.agents:ParagraphsAgent"},
            "failing": {"plugin": "tests.support.agents:FailingAgent"},
            "stranded": {"plugin": "operator", "mcp_servers": ["ghost"]},
        },
        "mcp": {
            "servers": {
                "demo": {**DEMO, "require_approval": ["delete_everything"]},
                "ghost": {"transport": "stdio", "command": "/nonexistent/mcp-server"},
            }
        },
    }


@pytest.fixture(scope="module")
def chat_server() -> Iterator[LiveServer]:
    with live_server(make_config(chat_config())) as live:
        yield live


class Screen:
    """What the chat printed, escapes stripped; ``expect`` waits (bounded) for a pattern after the last match."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.raw = ""
        self.text = ""
        self.position = 0

    def expect(self, pattern: str, timeout: float = 10) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.text, self.position)
            if found:
                self.position = found.end()
                return found.group(0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not on screen within {timeout} s; screen ends:\n{self.text[-1500:]}")
            self._read(min(left, 0.5))

    def _read(self, timeout: float) -> None:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return
        self.raw += chunk
        if CURSOR_REQUEST in chunk:
            self.child.send("\x1b[40;1R")  # row 40, column 1: as a real terminal answers
        self.text = ANSI.sub("", self.raw)

    def wait_exit(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.child.isalive() and time.monotonic() < deadline:
            try:
                self._read(0.5)
            except pexpect.EOF:
                break
        self.child.close()
        assert self.child.exitstatus is not None, "the chat did not exit"
        return int(self.child.exitstatus)


def spawn_chat(*args: str) -> Screen:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "PROMPT_TOOLKIT_NO_CPR")}
    env["TERM"] = "xterm"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "haip_runtime", "chat", *args],
        env=env,
        dimensions=(40, 160),
        encoding="utf-8",
        cwd=str(ROOT),
    )
    return Screen(child)


def test_a_conversation_with_progress_an_approval_an_input_form_and_ctrl_c(chat_server: LiveServer) -> None:
    screen = spawn_chat(f"{chat_server.http_url}/?token={chat_server.token('ann')}", "--agent", "operator")
    try:
        screen.expect("talking to operator")
        screen.expect(r"[1-9]\d* tools available")
        screen.child.sendline("/tools")
        screen.expect(re.escape("demo.slow_count(steps: integer = 5, delay: number = 0.2)"))

        screen.child.sendline('/call demo.slow_count {"steps": 4, "delay": 0.25}')
        screen.expect(r"demo\.slow_count [█░]{20}")  # the live bar under the prompt
        screen.expect(r"1/4 running\s+step 1 of 4")
        screen.expect(re.escape('✓ demo.slow_count("steps": 4, "delay": 0.25) → counted to 4'))
        screen.expect("operator › demo.slow_count returned: counted to 4")

        screen.child.sendline("/call demo.delete_everything")
        screen.expect(re.escape("demo.delete_everything needs your approval: approve? [y/n, n <reason>]"))
        screen.child.sendline("maybe")
        screen.expect("answer y to approve")
        screen.child.sendline("y")
        screen.expect("✓ demo.delete_everything.* → pretended to delete everything")

        screen.child.sendline("/call demo.delete_everything")
        screen.expect("approve\\?")
        screen.child.sendline("n not today")
        screen.expect("⊘ demo.delete_everything.* CANCELLED: rejected by ann: not today")

        screen.child.sendline("/call demo.ask_user")
        screen.expect("asks: Who are you, and which colour do you like best?")
        screen.expect(re.escape("Name (string, required):"))
        screen.child.sendline("")
        screen.expect("this field is required")
        screen.child.sendline("Ada")
        screen.expect(re.escape("Favourite Colour (string, required):"))
        screen.child.sendline("green")
        screen.expect("✓ demo.ask_user.* → Ada likes green")

        screen.child.sendline('/call demo.sleep {"seconds": 30}')
        screen.expect(r"demo\.sleep [█░]{20} running")
        screen.child.sendintr()  # Ctrl-C: cancel the running turn
        screen.expect("cancelling")
        screen.expect("⊘ demo.sleep.* CANCELLED")
        screen.child.sendline("/agents")
        screen.expect(r"\* operator")
        screen.child.sendline("/agents storyteller")
        screen.expect("talking to storyteller")
        screen.child.sendline("a dragon")
        screen.expect("\n storyteller › Once")  # streaming, in the live area under the prompt ...
        assert "The end." not in screen.text[: screen.position]  # ... before the story is finished
        screen.expect("storyteller › Once upon a time, someone said 'a dragon'. .* smiled. The end.")
        screen.child.sendintr()
        screen.expect("nothing to cancel")
        screen.child.sendintr()  # a second Ctrl-C quits
        assert screen.wait_exit() == 0
        assert "Traceback" not in screen.text
    finally:
        screen.child.terminate(force=True)


def test_the_chat_survives_a_server_restart(tmp_path: Path) -> None:
    config = make_config({"storage": {"backend": "sqlite", "path": str(tmp_path / "haip.db")}})
    with live_server(config) as first:
        port, token = first.port, first.token("ann")  # signed with the dev key kept beside the database
        screen = spawn_chat(first.http_url, "--agent", "echo", "--token", token)
        try:
            screen.expect("talking to echo")
            screen.child.sendline("before the restart")
            screen.expect("echo › .*before the restart")
        except BaseException:
            screen.child.terminate(force=True)
            raise
    try:
        screen.expect("the connection dropped; reconnecting")
        with live_server(config, port=port):
            screen.expect("reconnected: the server had restarted; the conversation was rejoined")
            screen.child.sendline("after the restart")
            screen.expect("echo › .*after the restart")
            screen.child.sendline("/quit")
            assert screen.wait_exit() == 0
        assert "Traceback" not in screen.text
        assert "RESUME_FAILED" not in screen.text  # expected after a restart: said once, in words
    finally:
        screen.child.terminate(force=True)


def test_a_server_that_stays_away_is_one_line_not_a_traceback() -> None:
    with live_server(make_config()) as live:
        screen = spawn_chat(live.ws_url, "--agent", "echo", "--token", live.token("ann"), "--reconnect", "1")
        try:
            screen.expect("talking to echo")
            screen.child.sendline("hello")
            screen.expect("echo › .*hello")
        except BaseException:
            screen.child.terminate(force=True)
            raise
    try:
        screen.expect("haip-runtime: the connection to the server was lost")
        assert screen.wait_exit() == 1
        assert "Traceback" not in screen.text
    finally:
        screen.child.terminate(force=True)


#: An agent whose turn says one thing and then goes on until cancelled (a long tool call, a slow LLM).
ENDLESS = """
import anyio
from haip_runtime import Agent, Turn


class Endless(Agent):
    name = "endless"

    async def on_message(self, turn: Turn) -> None:
        await turn.say("still thinking")
        await anyio.sleep_forever()
"""


def test_piped_input_waiting_for_a_turn_ends_when_the_server_stays_away(tmp_path: Path) -> None:
    """Piped, the chat waits for each turn to end before reading the next line; a server killed mid-turn
    (no close frame) left it waiting past ``--reconnect`` until the next line came (found by a tester):
    it ends then, exit 1."""
    (tmp_path / "endless.py").write_text(ENDLESS)  # (``python -m`` puts the server's cwd on its path)
    config = tmp_path / "haip.toml"
    config.write_text('[server]\nport = 0\n[agents.slow]\nplugin = "endless:Endless"\n')
    command = [sys.executable, "-m", "haip_runtime", "serve", "--config", str(config)]
    with serving.serve_process(command, cwd=tmp_path) as served:
        url, token = served.banner["WebSocket"].split()[0], served.banner["token"]
        command = [sys.executable, "-m", "haip_runtime", "chat", url, "--agent", "slow", "--token", token]
        chat = subprocess.Popen(
            [*command, "--reconnect", "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write("a long story\n")  # a turn that never ends; stdin stays open
        chat.stdin.flush()
        for line in chat.stdout:  # its first message: the turn runs on, and the chat waits for its end
            if "slow ›" in line:
                break
        served.process.kill()  # gone without a word, as a crashed host
    try:
        chat.wait(timeout=60)  # stdin stays open: it ends by itself, or not at all
        assert chat.stderr is not None
        err = chat.stderr.read()
    finally:
        chat.kill()
        chat.communicate()  # (its pipes closed)
    assert chat.returncode == 1 and "the connection to the server was lost" in err and "Traceback" not in err


def test_bad_urls_and_tokens_are_one_line(chat_server: LiveServer) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "haip_runtime", "chat", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    refused = run(chat_server.ws_url, "--token", "not-a-token")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "haip-runtime: handshake refused: authentication failed: invalid token (AUTHENTICATION_FAILED)"
    ]
    tokenless = run(chat_server.ws_url)  # (a newcomer's find: nothing said where a token comes from)
    assert tokenless.returncode == 1 and tokenless.stderr.strip().splitlines() == [
        "haip-runtime: handshake refused: authentication failed: no credentials (AUTHENTICATION_FAILED);"
        " pass one with --token (serve prints one in dev mode)"
    ]
    unknown = run(chat_server.http_url, "--agent", "nobody", "--token", chat_server.token("ann"))
    assert unknown.returncode == 1 and unknown.stderr.strip().endswith("no agent named 'nobody' (AGENT_NOT_FOUND)")
    assert len(unknown.stderr.strip().splitlines()) == 1
    wrong = run("ftp://example.invalid/")
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        "haip-runtime: 'ftp://example.invalid/' is not an http(s):// or ws(s):// URL"
    )


def test_piped_input_talks_and_answers_without_a_terminal(chat_server: LiveServer) -> None:
    lines = "/call demo.delete_everything\ny\n/quit\n"
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--agent", "operator"]
    command += ["--token", chat_server.token("ann")]
    done = subprocess.run(command, input=lines, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "needs your approval" in done.stdout
    assert "operator › demo.delete_everything returned: pretended to delete everything" in done.stdout


def test_tools_as_the_first_piped_line_lists_the_tools(chat_server: LiveServer) -> None:
    """An author's find: ``/tools`` read before the conversation's TOOL_LIST came said there were none."""
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--agent", "operator"]
    command += ["--token", chat_server.token("ann")]
    done = subprocess.run(command, input="/tools\n/quit\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "no tools" not in done.stdout and "demo.delete_everything(" in done.stdout


def test_piped_input_ending_with_an_approval_unanswered_exits_non_zero(chat_server: LiveServer) -> None:
    """An author's find: the chat printed the approval's question, reached the end of its input and exited 0,
    and the turn waited on the server until the approval's timeout: a script took that for success."""
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--agent", "operator"]
    command += ["--token", chat_server.token("ann")]
    done = subprocess.run(command, input="/call demo.delete_everything\n", capture_output=True, text=True, timeout=30)
    assert "needs your approval" in done.stdout
    assert done.returncode == 1 and done.stderr.strip() == "haip-runtime: a turn failed: UNANSWERED", done.stderr
    assert "input ended with a question unanswered: demo.delete_everything needs your approval" in done.stdout


def test_a_piped_line_over_the_servers_limit_is_refused_and_the_next_one_is_answered(chat_server: LiveServer) -> None:
    """A tester's find: a 2,000,000-character line closed the socket (1009) and the chat gave up, losing the
    lines after it. The client now refuses it before sending (the server's HAI says its limit)."""
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--agent", "echo"]
    command += ["--token", chat_server.token("ann")]
    lines = "z" * 2_000_000 + "\nafter the big one\n"
    done = subprocess.run(command, input=lines, capture_output=True, text=True, timeout=60)
    assert "✗ MESSAGE of 2000" in done.stdout and "over the server's limit of 1048576; not sent" in done.stdout
    assert "echo › you said: after the big one" in done.stdout, done.stdout[-500:]
    assert done.returncode == 1  # a script must see that a line was refused
    assert done.stderr.strip().splitlines() == ["haip-runtime: a turn failed: MESSAGE_TOO_LARGE"]


def test_urls_map_to_the_websocket_path() -> None:
    assert websocket_url("http://127.0.0.1:8080") == ("ws://127.0.0.1:8080/haip/websocket", None)
    assert websocket_url("https://h.example/?token=abc") == ("wss://h.example/haip/websocket", "abc")
    assert websocket_url("ws://h:1/") == ("ws://h:1/haip/websocket", None)
    assert websocket_url("wss://h/custom/path") == ("wss://h/custom/path", None)
    assert websocket_url("127.0.0.1:8080") == ("ws://127.0.0.1:8080/haip/websocket", None)
    for bad in ("file:///tmp/x", "http://", "mailto://someone"):
        with pytest.raises(ClientError):
            websocket_url(bad)


def test_input_fields_are_typed_from_their_schema() -> None:
    assert field_value({"type": "integer"}, "42", True) == 42
    assert field_value({"type": "number"}, "2.5", True) == 2.5
    assert field_value({"type": "boolean"}, "y", True) is True
    assert field_value({"type": "string"}, "", False) is None
    assert field_value({"enum": ["red", "green"]}, "green", True) == "green"
    for schema, text in (({"type": "integer"}, "x"), ({"enum": ["a"]}, "b"), ({"type": "boolean"}, "maybe")):
        with pytest.raises(ValueError):
            field_value(schema, text, True)
    with pytest.raises(ValueError, match="required"):
        field_value({"type": "string"}, "", True)
    with pytest.raises(ValueError, match="^an integer please$"):
        field_value({"type": "integer"}, "x", True)
    with pytest.raises(ValueError, match="^a number please$"):
        field_value({"type": "number"}, "x", True)


def test_tool_signatures_and_errors_read_as_one_line() -> None:
    schema = {
        "properties": {"a": {"type": "number"}, "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 1}},
        "required": ["a"],
    }
    assert signature(schema) == "a: number, n: integer/null = 1"
    pydantic_dump = (
        "Error executing tool add: 1 validation error for addArguments\na\n"
        "  Input should be a valid number [type=float_parsing, input_value='x', input_type=str]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/float_parsing"
    )
    assert readable_error(pydantic_dump) == (
        "Error executing tool add: 1 validation error for addArguments; a; Input should be a valid number"
    )


def test_history_join_and_join_on_the_command_line_show_the_conversation_so_far(chat_server: LiveServer) -> None:
    token = chat_server.token("joe")
    screen = spawn_chat(chat_server.http_url, "--agent", "storyteller", "--token", token)
    try:
        first = screen.expect(r"talking to storyteller \(conversation [0-9a-f-]{36}\)")[-37:-1]
        screen.child.sendline("a lighthouse")
        screen.expect("storyteller › Once upon a time, someone said 'a lighthouse'.* The end.")
        screen.child.sendline("/agents operator")
        screen.expect("talking to operator")
        screen.child.sendline("/history")
        screen.expect(rf"  {first}  \d{{4}}-\d\d-\d\d \d\d:\d\d  storyteller  a lighthouse")
        screen.expect(r"/join <id>")
        screen.child.sendline(f"/join {first[:8]}")
        screen.expect(rf"joined storyteller \(conversation {first}\)")
        screen.expect("joe › a lighthouse")
        screen.expect("storyteller › Once upon a time, someone said 'a lighthouse'.* The end.")
        screen.expect("in this conversation: storyteller")
        screen.child.sendline("a bell")  # the conversation goes on where it was
        screen.expect("storyteller › Once upon a time, someone said 'a bell'.* The end.")
        screen.child.sendline("/join nope")
        screen.expect("✗ .*TRANSACTION_NOT_FOUND")
        screen.child.sendline("/quit")
        assert screen.wait_exit() == 0
    finally:
        screen.child.terminate(force=True)
    again = spawn_chat(chat_server.http_url, "--join", first[:8], "--token", token)  # the start of its id
    try:
        again.expect(rf"joined storyteller \(conversation {first}\)")
        again.expect("joe › a lighthouse")
        again.expect("joe › a bell")
        again.expect("storyteller › Once upon a time, someone said 'a bell'.* The end.")
        again.expect("in this conversation: storyteller")
        again.child.sendline("/quit")
        assert again.wait_exit() == 0
        assert "Traceback" not in screen.text + again.text
        # once each: the stream replayed the history too, and it showed twice (found by a tester)
        assert again.text.count("someone said 'a lighthouse'") == 1 and again.text.count("joe › a bell") == 1
        assert again.text.count("in this conversation:") == 1  # not also the join's answer, with joe in it
    finally:
        again.child.terminate(force=True)


def test_a_chat_joining_while_an_answer_streams_shows_all_of_it(chat_server: LiveServer) -> None:
    """A tester's find: joined mid-stream, the chat printed what the history had of the answer, then
    dropped its live parts (their MESSAGE_START came before the join): the story stopped mid-sentence."""
    token = chat_server.token("joe")
    teller = spawn_chat(chat_server.http_url, "--agent", "slowteller", "--token", token)
    joined: Screen | None = None
    try:
        conversation = teller.expect(r"talking to slowteller \(conversation [0-9a-f-]{36}\)")[-37:-1]
        teller.child.sendline("a lighthouse")
        teller.expect(r"slowteller › Once")  # (the live area: it streams now)
        joined = spawn_chat(chat_server.http_url, "--agent", "poet", "--token", token)  # (then /join: events
        joined.expect("talking to poet")  # come in while the join reads the history: a reviewer's find)
        joined.child.sendline(f"/join {conversation[:8]}")
        joined.expect(rf"joined slowteller \(conversation {conversation}\)")
        joined.expect("joe › a lighthouse")
        story = "Once upon a time, someone said 'a lighthouse'. The words travelled far, and everyone who heard"
        joined.expect(re.escape(f"slowteller › {story} 'a lighthouse' smiled. The end."), timeout=20)  # once each
        joined.child.sendline("/quit")
        assert joined.wait_exit() == 0
        assert "Traceback" not in joined.text
    finally:
        teller.child.terminate(force=True)
        if joined is not None:
            joined.child.terminate(force=True)


def test_streamed_events_that_come_while_a_join_reads_the_history_follow_it() -> None:
    """Typed /join while an answer streams: its parts (and its end) came while the join read the history,
    before the message was taken up, and were dropped; the message never ended (a reviewer)."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)))

    def event(kind: str, tseq: int, **payload: object) -> Received:
        return Received({"type": kind, "tseq": str(tseq), "payload": {"message_id": "m1", **payload}})

    view.hold()
    for each in (event("MESSAGE_PART", 5, text=" upon"), event("MESSAGE_PART", 6, text=" a time")):
        view.on_event(each)
    view.on_event(event("MESSAGE_END", 7))
    assert shown == []
    view.resume_stream("m1", "teller", "Once upon")  # the history, up to the join's tseq 5
    view.release(5)
    assert shown == ["teller › Once upon a time"] and not view.streams


def test_a_turn_that_did_not_end_ok_says_so_and_why() -> None:
    """A tester's find: a turn cancelled by a restart (RUN_FINISHED CANCELLED, its reason) left a story cut
    mid-sentence in the chat, and nothing said it had been stopped."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)))
    reason = "the runtime is shutting down; ask again to go on"
    for run_id, status, extra in (("r1", "CANCELLED", {"reason": reason}), ("r2", "OK", {}), ("r3", "ERROR", {})):
        view.on_event(Received({"type": "RUN_STARTED", "payload": {"run_id": run_id, "agent": "teller"}}))
        view.on_event(Received({"type": "RUN_FINISHED", "payload": {"run_id": run_id, "status": status, **extra}}))
    assert shown == [f"⊘ teller's turn ended CANCELLED: {reason}", "⊘ teller's turn ended ERROR"]
    assert not view.runs


POEM = ["poet › Roses are red,", "       violets are blue.", "", "       A new paragraph", "       ends here."]


def test_lines_of_a_streamed_answer_carry_no_stray_marks_in_a_terminal(chat_server: LiveServer) -> None:
    screen = spawn_chat(chat_server.http_url, "--agent", "poet", "--token", chat_server.token("ann"))
    try:
        screen.expect("talking to poet")
        screen.child.sendline("a poem please")
        screen.expect("ends here.")
        tail = screen.text[screen.text.rindex("poet › Roses") :]
        shown = [line.replace(" \b", "").replace("\b", "") for line in tail.splitlines()]  # cursor moves
        # the prompt is redrawn between printed lines: what was printed is each of the poem's lines
        # as it was written, and no line that only carries a "›" (at a paragraph break, or the last)
        for line in POEM[1:]:
            if line:
                assert line in [printed.rstrip() for printed in shown], line
        assert not [line for line in shown if re.match(r"^\s*›", line)], shown
        screen.child.sendline("/quit")
        assert screen.wait_exit() == 0
    finally:
        screen.child.terminate(force=True)


def test_piped_lines_carry_no_stray_marks_and_a_failed_turn_exits_non_zero(chat_server: LiveServer) -> None:
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--token", chat_server.token("ann")]
    poem = subprocess.run([*command, "--agent", "poet"], input="a poem\n", capture_output=True, text=True, timeout=30)
    assert poem.returncode == 0, poem.stderr
    lines = [line.rstrip() for line in poem.stdout.splitlines()]
    start = lines.index(POEM[0])
    assert lines[start : start + 5] == POEM and "›" not in "".join(lines[start + 1 :])
    failed = subprocess.run([*command, "--agent", "failing"], input="hi\n", capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == ["haip-runtime: a turn failed: INTERNAL_ERROR"]


def test_each_mcp_server_that_failed_is_named_in_one_line(chat_server: LiveServer) -> None:
    command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--token", chat_server.token("ann")]
    done = subprocess.run(
        [*command, "--agent", "stranded"], input="/tools\n", capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "MCP server ghost failed: cannot start '/nonexistent/mcp-server': command not found" in done.stdout
    assert done.stdout.count("MCP server ghost failed") == 1  # (said by /health and by INFO: once, a newcomer)
    assert "no tools in this conversation (yet) (MCP servers not connected: ghost)" in done.stdout


def test_the_chat_says_when_the_clusters_redis_answers_again() -> None:
    """The server tells members when Redis stops answering (an ERROR) and when it answers again (INFO
    cluster ok): the chat showed the first and never the second (found by a tester)."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)))
    view.on_event(Received({"type": "INFO", "payload": {"event": "cluster", "state": "ok"}}))
    assert shown == ["the cluster's Redis answers again (cluster ok): what waited goes on"]


def test_the_chat_says_a_connected_server_changed_its_tools_rather_than_that_it_connected() -> None:
    """A server's tool-list change was shown as its state: the chat said "MCP server demo connected"
    in the middle of a conversation (seen trying it)."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)))
    for extra in ({}, {"tools_changed": True}):  # it connects during the conversation, then changes its tools
        payload = {"event": "mcp.server", "server": "demo", "state": "connected", "error": None, **extra}
        view.on_event(Received({"type": "INFO", "payload": payload}))
    assert shown == ["MCP server demo connected", "MCP server demo changed its tools"]
    payload = {"event": "mcp.server", "server": "demo", "state": "connecting", "error": None}
    for _ in range(2):  # (after a restart the runtime said "connecting" twice: the chat says it once)
        view.on_event(Received({"type": "INFO", "payload": payload}))
    assert shown[2:] == ["MCP server demo connecting"]


def test_a_rejoin_that_skipped_events_marks_the_gap_in_an_answer_still_streaming() -> None:
    """A flaky-network tester's find: away long enough for the rejoin to replay only the latest events, the
    chat printed an answer's start and end as one text, its middle missing without a word."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)), live=lambda *a: None)
    for kind, payload in [
        ("MESSAGE_START", {"message_id": "a", "author": "storyteller"}),
        ("MESSAGE_PART", {"message_id": "a", "text": "w0 w1"}),
        ("TRANSACTION_JOIN", {"members": ["ann"], "agents": ["storyteller"], "tseq": "900", "omitted": 312}),
        ("MESSAGE_PART", {"message_id": "a", "text": "w316 w317"}),
        ("MESSAGE_END", {"message_id": "a"}),
    ]:
        view.on_event(Received({"type": kind, "transaction": "t", "payload": payload}))
    assert "312 events were not replayed on rejoining: /history shows them" in shown
    assert any("w0 w1 [… missed while away …] w316 w317" in line for line in shown), shown


def test_a_message_not_answered_is_said_and_settles_a_piped_line() -> None:
    """``INFO run.unqueued`` (a full queue, a cancel, or the node running the turns lacking the agent) was
    shown by nothing, and a piped chat waited for a turn that never came."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.chat import _Turn
    from haip_runtime.client.view import ChatView

    view, shown = ChatView(), []
    view.terminal = SimpleNamespace(print=lambda text: shown.append(str(text)))
    reason = "agent 'patient' is not configured on the node running this conversation's turns now"
    unqueued = Received({"type": "INFO", "payload": {"event": "run.unqueued", "message_id": "m1", "reason": reason}})
    turn = _Turn(started=False, line="m1")
    view.on_event(unqueued)
    turn.see(unqueued, view)
    assert shown == [f"✗ a message was not answered: {reason}"] and turn.settled.is_set()
    waiting = _Turn(started=False, line="m2")  # this line waits: another member's message was given up
    waiting.see(unqueued, view)
    assert not waiting.settled.is_set()


def test_a_message_not_answered_after_a_line_settled_does_not_fail_the_chat() -> None:
    """A piped chat counted every run.unqueued after its first line (another member's full queue, say) as
    its own, and exited 1 (a reviewer)."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.chat import Chat, _Turn

    chat = Chat(SimpleNamespace())  # type: ignore[arg-type]
    chat.view.terminal = SimpleNamespace(print=lambda text: None)
    unqueued = Received({"type": "INFO", "payload": {"event": "run.unqueued", "message_id": "m9", "reason": "full"}})
    events = [unqueued]

    async def received() -> AsyncIterator[Any]:
        for event in events:
            yield event

    chat.client = SimpleNamespace(events=received, close_code=1000)  # type: ignore[assignment]
    chat._turn = _Turn(started=False, line="m8")
    chat.mine.messages.add("m8")  # this chat's line waits; another member's message is given up
    anyio.run(chat.watch)
    assert chat.failed == []
    chat._turn = _Turn(started=False, line="m9")
    chat.mine.messages.add("m9")  # this chat's own line, given up
    anyio.run(chat.watch)
    assert chat.failed == ["NOT_ANSWERED"]


def test_a_piped_chat_in_a_shared_conversation_fails_only_for_its_own_turns(chat_server: LiveServer) -> None:
    """A piped chat counted every member's failed turn as its own (it exited 1 for another's), and took
    another member's RUN_STARTED for its own line's. Its lines now carry their message ids: the runs
    that answer them name them."""
    from haip_runtime.client import HaipClient

    token = chat_server.token("joe")

    async def scenario() -> tuple[int, str, str]:
        async with HaipClient(chat_server.ws_url, token=token) as other:
            conversation = await other.start_transaction("failing")
            command = [sys.executable, "-m", "haip_runtime", "chat", chat_server.bare_url, "--token", token]
            async with await anyio.open_process([*command, "--join", conversation], cwd=str(ROOT)) as chat:
                assert chat.stdin is not None and chat.stdout is not None and chat.stderr is not None
                out = ""
                with anyio.fail_after(20):
                    while "joined failing" not in out:
                        out += (await chat.stdout.receive()).decode()
                    await other.send_text(conversation, "boom")  # another member's turn fails
                    while "✗ INTERNAL_ERROR" not in out:  # (the chat shows it)
                        out += (await chat.stdout.receive()).decode()
                    await chat.stdin.send(b"fine\nboom\n")  # this chat's: one answered, one failed
                    await chat.stdin.aclose()
                    async for chunk in chat.stdout:
                        out += chunk.decode()
                    errors = b"".join([chunk async for chunk in chat.stderr]).decode()
                    return await chat.wait(), out, errors

    code, out, errors = anyio.run(scenario)
    assert "failing › all good" in out and out.count("✗ INTERNAL_ERROR") == 2, out  # its own failure waited for
    assert code == 1 and errors.strip().splitlines() == ["haip-runtime: a turn failed: INTERNAL_ERROR"], errors


def test_a_piped_line_is_started_by_its_own_run_not_by_another_members() -> None:
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.chat import _Turn
    from haip_runtime.client.view import ChatView

    view = ChatView()
    view.terminal = SimpleNamespace(print=lambda text: None)
    turn = _Turn(started=False, line="mine")
    for event in (
        {"type": "RUN_STARTED", "run_id": "r1", "payload": {"run_id": "r1", "agent": "a", "message_id": "theirs"}},
        {"type": "RUN_FINISHED", "run_id": "r1", "payload": {"run_id": "r1", "status": "OK"}},
    ):
        view.on_event(Received(event))
        turn.see(Received(event), view)
    assert not turn.started and not turn.settled.is_set()  # another member's turn came and went: still waiting
    for event in (
        {"type": "RUN_STARTED", "run_id": "r2", "payload": {"run_id": "r2", "agent": "a", "message_id": "mine"}},
        {"type": "RUN_FINISHED", "run_id": "r2", "payload": {"run_id": "r2", "status": "OK"}},
    ):
        view.on_event(Received(event))
        turn.see(Received(event), view)
    assert turn.started and turn.settled.is_set()


def test_piped_lines_reach_an_agent_with_an_input_schema_and_one_that_hears_recordings(tmp_path: Path) -> None:
    """A reviewer's finds in the first version of the above: a piped line named by its id (an object
    payload) was checked against the agent's input schema, which a plain string never was, and refused;
    and a recording heard by an agent's ``on_audio`` (its run names the recording, there is no transcript)
    never settled, so the chat hung."""
    from tests.support.speech import espeak

    clip = tmp_path / "q.wav"
    clip.write_bytes(espeak("hello"))
    agents = {
        "order": {"plugin": "tests.support.agents:OrderAgent"},
        "listener": {"plugin": "tests.support.agents:ListenerAgent"},
    }
    with live_server(make_config({"agents": agents})) as live:
        command = [sys.executable, "-m", "haip_runtime", "chat", live.bare_url, "--token", live.token("ann")]
        order = subprocess.run(
            [*command, "--agent", "order"], input="pizza\n", capture_output=True, text=True, timeout=30
        )
        heard = subprocess.run(
            [*command, "--agent", "listener"], input=f"/say {clip}\nnext\n", capture_output=True, text=True, timeout=30
        )
    assert order.returncode == 0 and "order › ordered 1 x pizza" in order.stdout, order.stdout + order.stderr
    assert heard.returncode == 0, heard.stdout + heard.stderr
    assert "listener › heard" in heard.stdout and "listener › text: next" in heard.stdout, heard.stdout


def test_a_piped_line_is_done_when_its_own_runs_are_and_refused_by_an_error_naming_a_chunk() -> None:
    """A line waited for every run shown to end, another member's long one too; and a recording whose run
    was refused at the limit (the ERROR names its last chunk's envelope) never settled (a reviewer)."""
    from types import SimpleNamespace

    from haip_runtime.client import Received
    from haip_runtime.client.chat import _Mine, _Turn
    from haip_runtime.client.view import ChatView

    view, mine = ChatView(), _Mine(messages={"mine"})
    view.terminal = SimpleNamespace(print=lambda text: None)
    turn = _Turn(started=False, line="mine")
    for event in (
        {"type": "RUN_STARTED", "run_id": "r1", "payload": {"run_id": "r1", "agent": "a", "message_id": "theirs"}},
        {"type": "RUN_STARTED", "run_id": "r2", "payload": {"run_id": "r2", "agent": "a", "message_id": "mine"}},
        {"type": "RUN_FINISHED", "run_id": "r2", "payload": {"run_id": "r2", "status": "OK"}},
    ):
        view.on_event(Received(event))
        mine.see(Received(event))
        turn.see(Received(event), view, mine)
    assert view.runs == {"r1": "a"} and turn.settled.is_set()  # the other member's run goes on
    recording = _Turn(started=False, message_id="audio-1", sent={"chunk-0", "chunk-1"})
    error = {"type": "ERROR", "payload": {"code": "RUN_LIMIT_EXCEEDED", "related_id": "chunk-1", "message": "busy"}}
    recording.see(Received(error), view, mine)
    assert recording.settled.is_set()


def test_the_greeting_of_a_conversation_the_chat_started_is_its_own_turn() -> None:
    """An author's tester: a piped chat whose agent's on_start failed showed it but did not count it
    (its run answers no message); in a conversation it only joined, another's greeting is not its own."""
    from haip_runtime.client import Received
    from haip_runtime.client.chat import _Mine

    mine = _Mine()
    for event in (
        {"type": "TRANSACTION_START", "transaction": "t1", "payload": {"referenceId": "x"}},
        {"type": "RUN_STARTED", "transaction": "t1", "run_id": "g1", "payload": {"run_id": "g1", "agent": "a"}},
        {"type": "RUN_STARTED", "transaction": "t2", "run_id": "g2", "payload": {"run_id": "g2", "agent": "a"}},
    ):
        mine.see(Received(event))
    failed = {"type": "RUN_ERROR", "transaction": "t1", "run_id": "g1", "payload": {"run_id": "g1", "code": "X"}}
    joined = {"type": "RUN_ERROR", "transaction": "t2", "run_id": "g2", "payload": {"run_id": "g2", "code": "X"}}
    assert mine.ran(Received(failed)) and not mine.ran(Received(joined))


def test_without_agent_the_chat_talks_to_the_servers_first_agent_when_it_has_no_echo() -> None:
    """A newcomer's find: against a server without ``echo`` the chat's default was refused (``no agent named
    'echo'``), an agent the person never named; with no agents at all it says so."""
    from haip_runtime.config.loading import validate_config

    agents = {"poet": {"plugin": "tests.support.agents:ParagraphsAgent"}}
    for declared, said in ((agents, None), ({}, "the server has no agent you may talk to")):
        config = validate_config({"server": {"host": "127.0.0.1", "port": 0}, "agents": declared}, base_dir=ROOT)
        with live_server(config) as live:
            command = [sys.executable, "-m", "haip_runtime", "chat", live.bare_url, "--token", live.token("ann")]
            done = subprocess.run(command, input="a poem\n", capture_output=True, text=True, timeout=30)
        if said is None:
            assert done.returncode == 0 and "talking to poet" in done.stdout and POEM[0] in done.stdout, done.stderr
        else:
            assert done.returncode == 1 and said in done.stderr and len(done.stderr.strip().splitlines()) == 1
