"""What ``haip-runtime chat`` shows of one conversation, and the state it shows it from.

``ChatView`` turns the events the client receives into printed lines (messages as they complete,
tool calls with their results) and the live area under the prompt (running calls with progress, the
line still streaming), and keeps the questions tools wait on. It sends nothing: ``chat.py`` owns the
connection and the prompt; ``terminal.py`` draws.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from prompt_toolkit.formatted_text import StyleAndTextTuples
from rich.text import Text

from haip_runtime.client.haip_client import Received
from haip_runtime.client.terminal import Terminal, progress_bar, short
from haip_runtime.protocol.events import ToolOutcome


def readable_error(message: str) -> str:
    """A tool's error on one line: pydantic's documentation links and ``[type=...]`` tags dropped."""
    lines = [line.strip() for line in message.splitlines() if not line.strip().startswith("For further information")]
    text = "; ".join(re.sub(r"\s*\[type=[^\]]*\]", "", line) for line in lines if line)
    return text.replace(":;", ":")


@dataclass
class Call:
    """A tool call as the chat shows it."""

    tool: str
    params: dict[str, Any]
    caller: str | None
    run_id: str | None
    status: str = "QUEUED"
    progress: float | None = None
    total: float | None = None
    message: str | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class Question:
    """Something a tool waits on the person for: an approval, or the fields of an input request."""

    call_id: str
    kind: str  # "approval" | "input"
    tool: str
    message: str = ""
    fields: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)  # (name, schema, required)
    values: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> str:
        if self.kind == "approval":
            return f"{self.tool} needs your approval: approve? [y/n, n <reason>] "
        if len(self.values) >= len(self.fields):
            return "Enter sends the answer, !decline declines: "
        name, schema, required = self.fields[len(self.values)]
        label = schema.get("title") or name
        hints = [str(schema.get("type", "string"))] + (["required"] if required else ["Enter skips"])
        if "enum" in schema:
            hints.insert(0, "/".join(map(str, schema["enum"])))
        return f"{label} ({', '.join(hints)}): "


class ChatView:
    """The conversation as the person sees it: who is running, which calls and questions are open."""

    def __init__(self) -> None:
        self.terminal: Terminal | None = None
        self.agent = ""
        self.runs: dict[str, str] = {}
        self.calls: dict[str, Call] = {}
        self.streams: dict[str, list[str]] = {}  # message_id -> [author, text not printed yet]
        self.continued: set[str] = set()  # streamed messages whose first line is printed
        self.held: list[Received] | None = None  # streamed events waiting for a join's history (``hold``)
        self.questions: list[Question] = []
        self.tools: list[dict[str, Any]] = []
        #: What was last said of each MCP server (state, error): the same again is not said twice (a
        #: newcomer's find: a server down was said by the chat's /health look, then by the runtime's INFO).
        self.servers: dict[str, tuple[str, str]] = {}

    def begin(self, agent: str, transaction: str, *, joined: bool = False) -> None:
        """A new conversation with ``agent`` (or one ``joined``): forget everything shown of the last one."""
        self.agent = agent
        self.calls.clear()
        self.streams.clear()
        self.continued.clear()
        self.runs.clear()
        self.questions.clear()
        self.tools = []
        self.say(f"{'joined' if joined else 'talking to'} {agent} (conversation {transaction})", "dim")

    def print_past(self, message: dict[str, Any], user: str | None) -> None:
        """One message of the REST history (``.../messages``), as it was shown when it happened."""
        author = str(message.get("author") or "someone")
        if message.get("text"):
            self.print_message(author, str(message["text"]))
        for call in message.get("tool_calls") or []:
            mark = {"OK": "✓", "ERROR": "✗", "CANCELLED": "⊘"}.get(str(call.get("status")), "…")
            outcome = call.get("result") if call.get("status") == "OK" else (call.get("error") or {}).get("message")
            head = f"{call.get('tool')}({short(json.dumps(call.get('arguments') or {})[1:-1], 40)})"
            self.say(f"{mark} {head} → {short(str(outcome or ''), 100)}", "dim")
        if message.get("run"):
            error = (message["run"].get("error") or {}).get("message")
            self.say(f"  ({author}: the turn ended {message['run']['status']}{': ' + error if error else ''})", "dim")

    def forget_runs(self) -> None:
        """The server restarted: its turns, calls and questions are gone (its log replays what they said)."""
        self.runs.clear()
        self.calls.clear()
        self.questions.clear()

    # --- output ------------------------------------------------------------------------------------

    def say(self, text: str | Text, style: str = "") -> None:
        assert self.terminal is not None
        self.terminal.print(text if isinstance(text, Text) else Text(text, style=style))

    def live(self) -> StyleAndTextTuples:
        """The area under the prompt: running calls with their progress, the line being streamed."""
        rows: StyleAndTextTuples = []
        for call in self.calls.values():
            known = call.progress is not None and bool(call.total)
            count = f" {call.progress:g}/{call.total:g}" if known else ""
            rows += [("class:tool", f" {call.tool} "), ("class:bar", progress_bar(call.progress, call.total))]
            rows += [("", f"{count} {call.status.replace('_', ' ').lower()}  "), ("class:dim", call.message or "")]
            rows.append(("", "\n"))
        for author, text in self.streams.values():
            if text:
                tail = " ".join(text.rsplit("\n", 1)[-1].split())
                tail = tail if len(tail) <= 100 else "…" + tail[-99:]  # the newest words
                rows += [("class:dim", f" {author} › "), ("", tail), ("", "\n")]
        if self.runs and not rows:
            rows += [("class:dim", f" {', '.join(sorted(set(self.runs.values())))} is working… (Ctrl-C stops)\n")]
        if not rows:
            rows = [("class:dim", f" {self.agent} · /agents /tools /help · Ctrl-C cancels, twice quits\n")]
        return rows[:-1] if rows and rows[-1] == ("", "\n") else rows

    # --- events ------------------------------------------------------------------------------------

    def on_event(self, event: Received) -> None:
        kind = event.type
        if kind in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END") and self.held is not None:
            self.held.append(event)  # a join reads what came before: these follow it (``release``)
        elif kind in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END"):
            self._stream(event)
        elif kind == "MESSAGE":
            self._message(event)
        elif kind == "TOOL_CALL":
            payload = event.payload
            self.calls[payload["call_id"]] = Call(
                payload["tool"], payload.get("params", {}), payload.get("caller"), event.run_id
            )
        elif kind == "TOOL_UPDATE":
            self._tool_update(event)
        elif kind == "TOOL_DONE":
            self._tool_done(event)
        elif kind == "TOOL_LIST" and event.transaction is not None:
            self._tool_list(event.get("tools", []))
        elif kind == "RUN_STARTED":
            self.runs[event.get("run_id")] = event.get("agent")
        elif kind in ("RUN_FINISHED", "RUN_ERROR"):
            agent = self.runs.pop(event.get("run_id"), None) or "the agent"
            if kind == "RUN_ERROR":
                self.say(f"✗ {event.get('code')}: {event.get('message')}", "red")
            elif event.get("status") not in (None, "OK"):  # cancelled (Ctrl-C, a restart) or failed: say why
                reason = event.get("reason") or event.get("summary")
                said = f"{': ' + str(reason) if reason else ''}"
                self.say(f"⊘ {agent}'s turn ended {event.get('status')}{said}", "yellow")
        elif kind == "ERROR" and _restart_notice(event):
            pass  # the reconnect line already says the server restarted and the conversation was rejoined
        elif kind == "ERROR":
            self.say(f"✗ {event.get('code')}: {event.get('message')}", "red")
        elif kind == "INFO" and event.get("event") == "storage":
            self.say(f"history is being written again (storage {event.get('state')})", "dim")
        elif kind == "INFO" and event.get("event") == "cluster":
            self.say(f"the cluster's Redis answers again (cluster {event.get('state')}): what waited goes on", "dim")
        elif kind == "INFO" and event.get("event") == "run.unqueued":
            self.say(f"✗ a message was not answered: {event.get('reason')}", "red")
        elif kind == "INFO" and event.get("event") == "speech.waiting":
            ahead = event.get("ahead")
            self.say(f"your recording waits to be heard: {ahead} recording(s) ahead of it", "dim")
        elif kind == "INFO" and event.get("event") == "speech.failed":
            self.say(f"✗ the answer could not be spoken: {event.get('code')}: {event.get('message')}", "red")
        elif kind == "INFO" and event.get("event") == "audio.unheard":
            self.say(f"✗ {event.get('reason')} ({', '.join(event.get('agents') or []) or 'no agents'})", "red")
        elif kind == "INFO" and event.get("event") == "mcp.server":
            if event.get("tools_changed"):  # connected all along; a fresh TOOL_LIST follows
                self.say(f"MCP server {event.get('server')} changed its tools", "dim")
            else:
                error = f": {event.get('error')}" if event.get("error") else ""
                state = (str(event.get("state")), error)
                if self.servers.get(str(event.get("server"))) != state:
                    self.servers[str(event.get("server"))] = state
                    self.say(f"MCP server {event.get('server')} {event.get('state')}{error}", "dim")
        elif kind == "TRANSACTION_JOIN" and event.get("omitted") is not None:
            # The answer to this chat's own join (who is there is said after the conversation so far). A rejoin
            # that replayed only the latest events: an answer still streaming misses its middle (a tester's find).
            omitted = event.get("omitted")
            if isinstance(omitted, int) and omitted > 0:
                for stream in self.streams.values():
                    stream[1] += " [… missed while away …] "
                self.say(f"{omitted} events were not replayed on rejoining: /history shows them", "yellow")
        elif kind == "TRANSACTION_JOIN":
            self.say(f"in this conversation: {', '.join(event.get('members', []) + event.get('agents', []))}", "dim")
        elif kind == "TRANSACTION_END":
            self.say(f"the conversation ended: {event.get('reason') or ''}", "dim")

    def _stream(self, event: Received) -> None:
        message_id = str(event.get("message_id"))
        if event.type == "MESSAGE_START":
            self.streams[message_id] = [str(event.get("author") or "agent"), ""]
            return
        stream = self.streams.get(message_id)
        if stream is None:
            return
        if event.type == "MESSAGE_PART":
            self._part(message_id, stream, str(event.get("text") or ""))
            return
        del self.streams[message_id]
        continued = message_id in self.continued
        self.continued.discard(message_id)
        if stream[1].strip():
            self.print_message(stream[0], stream[1].rstrip("\n"), continued=continued)

    def _part(self, message_id: str, stream: list[str], text: str) -> None:
        stream[1] += text
        done, _, rest = stream[1].rpartition("\n")
        if done or stream[1].endswith("\n"):  # whole lines print as they complete; the rest is live
            if done.strip() or message_id in self.continued:  # (leading blank lines are dropped)
                self.print_message(stream[0], done, continued=message_id in self.continued)
                self.continued.add(message_id)
            stream[1] = rest

    def hold(self) -> None:
        """A join is reading the conversation so far: streamed events that come meanwhile wait (a part of
        a message not taken up yet was dropped, and its end: a reviewer's find, typing /join mid-stream)."""
        self.held = []

    def release(self, after: int | None) -> None:
        """The join has shown the conversation up to tseq ``after``: the streamed events held, past it
        (``None``: the join failed, none)."""
        held, self.held = self.held or [], None
        if after is None:
            return
        for event in held:
            if (event.tseq or 0) > after:
                self._stream(event)

    def resume_stream(self, message_id: str, author: str, text: str) -> None:
        """A message still streaming when this chat joined (the REST history has it so far): shown as its
        live parts will go on with it (they were dropped, its MESSAGE_START unseen: a tester)."""
        stream = self.streams[message_id] = [author or "agent", ""]
        self._part(message_id, stream, text)

    def _message(self, event: Received) -> None:
        if isinstance(event.payload, str):
            self.print_message("agent" if event.raw.get("channel") == "AGENT" else "someone", event.payload)
        else:
            self.print_message(str(event.get("author") or "someone"), str(event.get("text") or ""))

    def print_message(self, author: str, text: str, *, continued: bool = False) -> None:
        """``author › text``, later lines indented under the text; ``continued``: more of a message
        whose first line is printed already (no ``›`` again). Blank lines stay blank."""
        indent = " " * (len(author) + 3)
        out = Text()
        for index, line in enumerate(text.split("\n")):
            if index:
                out.append("\n")
            if index == 0 and not continued:
                out.append(f"{author} › ", style="bold cyan")
                out.append(line)
            elif line.strip():
                out.append(indent + line)
        self.say(out)

    def _tool_list(self, tools: list[dict[str, Any]]) -> None:
        if len(tools) != len(self.tools):
            self.say(f"{len(tools)} tool{'' if len(tools) == 1 else 's'} available (/tools lists them)", "dim")
        self.tools = tools

    def _tool_update(self, event: Received) -> None:
        call_id = str(event.get("call_id"))
        call = self.calls.get(call_id)
        if call is None:
            return
        call.status = str(event.get("status") or call.status)
        if event.get("progress") is not None:
            call.progress, call.total = event.get("progress"), event.get("total")
        call.message = event.get("message") or (None if call.progress is None else call.message)
        self._drop_question(call_id)
        if call.status == "AWAITING_APPROVAL":
            self.ask(Question(call_id, "approval", call.tool))
        elif call.status == "INPUT_REQUIRED":
            request = event.get("request") or {}
            schema = request.get("schema") or {}
            required = set(schema.get("required", []))
            fields = [(name, spec, name in required) for name, spec in (schema.get("properties") or {}).items()]
            question = Question(call_id, "input", call.tool, str(request.get("message") or ""), fields)
            self.say(f"? {call.tool} asks: {question.message} (answer each field; !decline declines)", "yellow")
            self.ask(question)

    def _tool_done(self, event: Received) -> None:
        call_id = str(event.get("call_id"))
        call = self.calls.pop(call_id, None)
        self._drop_question(call_id)
        if call is None:
            return
        seconds = time.monotonic() - call.started
        head = f"{call.tool}({short(json.dumps(call.params)[1:-1], 40)})"
        status = event.get("status")
        if status == ToolOutcome.OK:
            result = event.get("result") or {}
            texts = [block.get("text", "") for block in result.get("content", []) if block.get("type") == "text"]
            shown = " ".join(texts) if texts else json.dumps(result.get("structuredContent"))
            self.say(f"✓ {head} → {short(shown, 100)}  ({seconds:.1f} s)", "green")
        else:
            error = event.get("error") or {}
            style = "yellow" if status == ToolOutcome.CANCELLED else "red"
            mark = "⊘" if status == ToolOutcome.CANCELLED else "✗"
            self.say(f"{mark} {head} {status}: {short(readable_error(str(error.get('message', ''))), 140)}", style)

    # --- questions ---------------------------------------------------------------------------------

    def ask(self, question: Question) -> None:
        self.questions.append(question)
        if self.terminal is not None:
            self.terminal.interrupt()  # the prompt becomes the question at once

    def _drop_question(self, call_id: str) -> None:
        """Someone (here or elsewhere) answered it, or the call ended: stop asking."""
        before = len(self.questions)
        self.questions = [q for q in self.questions if q.call_id != call_id]
        if len(self.questions) != before and self.terminal is not None:
            self.terminal.interrupt()

    def answered(self, question: Question) -> None:
        """The person answered ``question`` at the prompt: stop asking it (the chat sends the answer)."""
        self.questions.remove(question)


def _restart_notice(event: Received) -> bool:
    detail = event.get("detail")
    return event.get("code") == "RESUME_FAILED" and isinstance(detail, dict) and detail.get("reason") == "restarted"
