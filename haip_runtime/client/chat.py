"""``haip-runtime chat``: talk to agents from a terminal, watch and answer their tool calls.

Lines go to the agent. Tool calls show live in the area under the prompt (a progress bar and the
tool's message), then as one line with their result. Approvals and input requests become
questions at the prompt (input fields are asked one by one, from the request's JSON Schema).
Ctrl-C cancels the running turn; a second Ctrl-C quits (so does Ctrl-D). A dropped connection is
resumed by the client, and after a server restart the conversation is rejoined. Chat commands:
``/agents [name]``, ``/tools``, ``/help``, ``/quit``; other lines (``/call ...``) go to the agent.
Built on ``haip_runtime.client.haip_client.HaipClient``; drawn by ``haip_runtime.client.terminal``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import anyio
from prompt_toolkit.formatted_text import StyleAndTextTuples
from rich.text import Text

from haip_runtime.client.haip_client import HaipClient, Received
from haip_runtime.client.terminal import INTERRUPTED, Terminal, open_terminal, progress_bar, short
from haip_runtime.exceptions import ClientError
from haip_runtime.protocol.events import ToolOutcome, ToolStatus

HELP = (
    "Type to talk to the agent. /agents lists agents, /agents <name> starts a conversation with one, "
    "/tools lists the tools with their arguments, /quit leaves. Ctrl-C cancels what is running, twice quits."
)
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def websocket_url(url: str) -> tuple[str, str | None]:
    """The WebSocket URL for an http(s) or ws(s) ``url``, and the ``?token=`` it carries, if any."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ClientError(f"{url!r} is not an http(s):// or ws(s):// URL")
    token = parse_qs(parts.query).get("token", [None])[0]
    path = parts.path if parts.path not in ("", "/") else "/haip/websocket"
    return urlunsplit((scheme, parts.netloc, path, "", "")), token


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


class Chat:
    def __init__(self, client: HaipClient) -> None:
        self.client = client
        self.terminal: Terminal | None = None
        self.agent = ""
        self.transaction: str | None = None
        self.runs: dict[str, str] = {}
        self.calls: dict[str, Call] = {}
        self.streams: dict[str, list[str]] = {}  # message_id -> [author, text not printed yet]
        self.questions: list[Question] = []
        self.tools: list[dict[str, Any]] = []
        self.interrupts = 0
        self.lost: str | None = None
        self._turn: _Turn | None = None  # piped input waits for this before its next line

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

    def connection_changed(self, state: str) -> None:
        """The client's reconnect news (``HaipClient(on_connection=...)``), as one line each."""
        if state == "reconnecting":
            self.say("the connection dropped; reconnecting… (what you type is sent once it is back)", "yellow")
        elif state == "resumed":
            self.say("reconnected: the session resumed, nothing was missed", "green")
        elif state == "restarted":
            self.runs.clear()  # turns of the old server process are gone; its log replays what they said
            self.calls.clear()
            self.questions.clear()
            self.say("reconnected: the server had restarted; the conversation was rejoined", "green")
        elif state == "lost":
            self.lost = self.lost or "the connection to the server was lost and could not be resumed"
            if self.terminal is not None:
                self.terminal.interrupt()
        if self.terminal is not None:
            self.terminal.refresh()

    async def watch(self) -> None:
        async for event in self.client.events():
            if event.type == "PING":
                continue
            if event.transaction in (None, self.transaction):
                try:
                    self.on_event(event)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a payload not as documented
                    self.say(f"✗ cannot show {event.type}: {exc!r}", "red")
            if self._turn is not None:
                self._turn.see(event, self)
            if self.terminal is not None:
                self.terminal.refresh()
        if self._turn is not None:
            self._turn.settled.set()
        code = self.client.close_code
        self.lost = self.lost or f"the connection to the server was lost (close code {code})"
        if self.terminal is not None:
            self.terminal.interrupt()

    def on_event(self, event: Received) -> None:
        kind = event.type
        if kind in ("MESSAGE_START", "MESSAGE_PART", "MESSAGE_END"):
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
            self.runs.pop(event.get("run_id"), None)
            if kind == "RUN_ERROR":
                self.say(f"✗ {event.get('code')}: {event.get('message')}", "red")
        elif kind == "ERROR" and _restart_notice(event):
            pass  # the reconnect line already says the server restarted and the conversation was rejoined
        elif kind == "ERROR":
            self.say(f"✗ {event.get('code')}: {event.get('message')}", "red")
        elif kind == "INFO" and event.get("event") == "mcp.server":
            error = f": {event.get('error')}" if event.get("error") else ""
            self.say(f"MCP server {event.get('server')} {event.get('state')}{error}", "dim")
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
            stream[1] += str(event.get("text") or "")
            done, _, rest = stream[1].rpartition("\n")
            if done:  # whole lines are printed as they complete; the rest shows in the live area
                self._print_message(stream[0], done)
                stream[1] = rest
                stream[0] = " " * len(stream[0])
            return
        del self.streams[message_id]
        if stream[1]:
            self._print_message(stream[0], stream[1])

    def _message(self, event: Received) -> None:
        if isinstance(event.payload, str):
            self._print_message("agent" if event.raw.get("channel") == "AGENT" else "someone", event.payload)
        else:
            self._print_message(str(event.get("author") or "someone"), str(event.get("text") or ""))

    def _print_message(self, author: str, text: str) -> None:
        lines = text.split("\n")
        out = Text()
        out.append(f"{author} › ", style="bold cyan" if author.strip() else "")
        out.append(lines[0])
        for line in lines[1:]:
            out.append("\n" + " " * (len(author) + 3) + line)
        self.say(out)

    def _tool_list(self, tools: list[dict[str, Any]]) -> None:
        if len(tools) != len(self.tools):
            self.say(f"{len(tools)} tools available (/tools lists them)", "dim")
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
        if call.status == ToolStatus.AWAITING_APPROVAL:
            self.ask(Question(call_id, "approval", call.tool))
        elif call.status == ToolStatus.INPUT_REQUIRED:
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

    async def answer(self, question: Question, line: str) -> None:
        text = line.strip()
        if question.kind == "approval":
            verb, _, reason = text.partition(" ")
            if verb.lower() not in ("y", "yes", "approve", "n", "no", "reject"):
                self.say("answer y to approve, n (or n <reason>) to reject", "yellow")
                return
            decision = "approve" if verb.lower() in ("y", "yes", "approve") else "reject"
            self.questions.remove(question)
            payload = {"call_id": question.call_id, "decision": decision, **({"reason": reason} if reason else {})}
            await self.client.send("TOOL_UPDATE", payload, transaction=self.transaction)
            return
        if text == "!decline":
            self.questions.remove(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "decision": "decline"})
            return
        if len(question.values) >= len(question.fields):  # a request with no fields: Enter answers it
            self.questions.remove(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "input": question.values})
            return
        name, schema, required = question.fields[len(question.values)]
        try:
            value = field_value(schema, text, required)
        except ValueError as exc:
            self.say(str(exc), "yellow")
            return
        question.values[name] = value
        if value is None:
            del question.values[name]
            question.fields.remove((name, schema, required))
        if len(question.values) == len(question.fields):
            self.questions.remove(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "input": question.values})

    async def _send_input(self, call_id: str, payload: dict[str, Any]) -> None:
        await self.client.send("TOOL_UPDATE", payload, transaction=self.transaction)

    # --- commands ----------------------------------------------------------------------------------

    async def start(self, agent: str) -> None:
        self.transaction = await self.client.start_transaction(agent)
        self.agent = agent
        self.calls.clear()
        self.streams.clear()
        self.runs.clear()
        self.questions.clear()
        self.tools = []
        self.say(f"talking to {agent} (conversation {self.transaction})", "dim")

    async def command(self, line: str) -> bool:
        """Handle a line; ``False`` means quit."""
        verb, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if verb == "/quit":
            return False
        if verb == "/help":
            self.say(HELP, "dim")
        elif verb in ("/agents", "/agent"):
            await (self.start(rest) if rest else self.list_agents())
        elif verb == "/tools":
            await self.list_tools()
        elif line.strip():
            assert self.transaction is not None and self.terminal is not None
            if self.terminal.echoes_input:
                await self.client.send_text(self.transaction, line.strip())
            else:  # piped: show the line, and let the agent finish (or ask) before reading the next
                self._print_message(self.client.user or "you", line.strip())
                self._turn = _Turn(started=False)
                self._turn.message_id = await self.client.send_text(self.transaction, line.strip())
                await self._turn.settled.wait()
        return True

    async def request(self, type: str, payload: dict[str, Any], answer: str) -> Received:
        """Send a request; its answer of type ``answer`` (or the ERROR it caused raises ``ClientError``)."""
        last = self.client.received[-1].seq if self.client.received else 0
        sent = await self.client.send(type, payload, transaction=self.transaction if type != "TOOL_LIST" else None)
        event = await self.client.wait_for(
            lambda e: e.seq > last and (e.type == answer or (e.type == "ERROR" and e.get("related_id") == sent))
        )
        if event.type == "ERROR":
            raise ClientError(str(event.get("message")), code=event.get("code"))
        return event

    async def list_agents(self) -> None:
        agents = (await self.request("TOOL_LIST", {}, "TOOL_LIST")).get("tools", [])
        out = Text()
        for agent in agents:
            mark = "*" if agent["name"] == self.agent else " "
            out.append(f"{mark} {agent['name']}", style="bold")
            out.append(f"  {agent.get('description') or ''}\n", style="dim")
        out.append("/agents <name> starts a conversation with another agent", style="dim")
        self.say(out)

    async def list_tools(self) -> None:
        if not self.tools:
            self.say("no tools in this conversation (yet)", "dim")
            return
        out = Text()
        for tool in self.tools:
            schema = (await self.request("TOOL_SCHEMA", {"tool": tool["name"]}, "TOOL_SCHEMA")).get("schema", {})
            out.append(f"{tool['name']}({signature(schema.get('inputSchema') or {})})", style="bold")
            out.append(f"  {short(tool.get('description') or '', 70)}\n", style="dim")
        self.say(out[:-1] if str(out).endswith("\n") else out)

    def interrupt(self) -> bool:
        """Ctrl-C: cancel what runs; ``False`` (quit) when pressed twice in a row."""
        self.interrupts += 1
        if self.interrupts >= 2:
            return False
        if self.runs or self.calls:
            self.say("cancelling… (Ctrl-C again quits)", "yellow")
            return True
        self.say("nothing to cancel (Ctrl-C again or Ctrl-D quits)", "dim")
        return True

    async def cancel_running(self) -> None:
        for run_id in list(self.runs):
            await self.client.send("RUN_CANCEL", {"run_id": run_id}, transaction=self.transaction)
        for call_id, call in list(self.calls.items()):
            if call.run_id is None or call.run_id not in self.runs:
                payload = {"call_id": call_id, "reason": "cancelled from the terminal"}
                await self.client.send("TOOL_CANCEL", payload, transaction=self.transaction)

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self, terminal: Terminal) -> None:
        self.terminal = terminal
        while self.lost is None:
            question = self.questions[0] if self.questions else None
            try:
                prompt = question.prompt() if question else f"{self.client.user} › "
                line = await terminal.read(prompt, question=question is not None)
            except EOFError:
                return
            except KeyboardInterrupt:
                if not self.interrupt():
                    return
                await self.cancel_running()
                continue
            if line == INTERRUPTED:
                continue
            self.interrupts = 0
            try:
                if question is not None and question in self.questions:
                    await self.answer(question, line)
                    if not terminal.echoes_input and self.runs and not self.questions:
                        self._turn = _Turn(started=True)
                        await self._turn.settled.wait()
                elif question is None and not await self.command(line):
                    return
            except ClientError as exc:
                if self.lost is None:
                    self.say(f"✗ {exc}" + (f" ({exc.code})" if exc.code else ""), "red")
        raise ClientError(self.lost)


@dataclass
class _Turn:
    """For piped input: settled once the agent has finished its turn, asks something, or refused the line."""

    started: bool
    message_id: str | None = None
    settled: anyio.Event = field(default_factory=anyio.Event)

    def see(self, event: Received, chat: Chat) -> None:
        if event.type == "RUN_STARTED":
            self.started = True
        refused = event.type == "ERROR" and self.message_id is not None and event.get("related_id") == self.message_id
        if chat.questions or refused or (self.started and not chat.runs):
            self.settled.set()


def field_value(schema: dict[str, Any], text: str, required: bool) -> Any:
    """``text`` typed for one input field, converted to the field's JSON type (``None``: skipped)."""
    if not text:
        if required:
            raise ValueError("this field is required")
        return None
    kind = schema.get("type", "string")
    if "enum" in schema and text not in map(str, schema["enum"]):
        raise ValueError(f"one of: {', '.join(map(str, schema['enum']))}")
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        raise ValueError(f"a {kind} please") from None
    if kind == "boolean":
        if text.lower() not in ("y", "yes", "true", "n", "no", "false"):
            raise ValueError("y or n please")
        return text.lower() in ("y", "yes", "true")
    return text


def signature(schema: dict[str, Any]) -> str:
    """``steps: integer = 5, delay: number = 0.2`` from a tool's input schema."""
    required = set(schema.get("required", []))
    parts = []
    for name, spec in (schema.get("properties") or {}).items():
        kind = spec.get("type") or "/".join(s.get("type", "?") for s in spec.get("anyOf", [])) or "any"
        default = "" if name in required or "default" not in spec else f" = {json.dumps(spec['default'])}"
        parts.append(f"{name}: {kind}{default}")
    return ", ".join(parts)


async def chat(url: str, token: str | None, agent: str, reconnect: float = 60.0) -> None:
    """Connect, start a conversation with ``agent`` and run the chat until the person quits.

    A dropped connection is resumed (or, after a server restart, the conversation rejoined) for up
    to ``reconnect`` seconds; then the chat ends with one line.
    """
    ws_url, url_token = websocket_url(url)
    error: ClientError | None = None
    session: Chat | None = None

    def changed(state: str) -> None:
        if session is not None:
            session.connection_changed(state)

    async with HaipClient(ws_url, token=token or url_token, reconnect=reconnect, on_connection=changed) as client:
        session = Chat(client)
        async with anyio.create_task_group() as tg, open_terminal(session.live) as terminal:
            session.terminal = terminal
            session.say(f"connected to {ws_url} as {client.user}. {HELP}", "dim")
            try:
                await session.start(agent)
                tg.start_soon(session.watch)
                await session.run(terminal)
            except ClientError as exc:  # raised outside the group, so the CLI gets it, not an ExceptionGroup
                error = exc
            finally:
                tg.cancel_scope.cancel()
    if error is not None:
        raise error


def _restart_notice(event: Received) -> bool:
    detail = event.get("detail")
    return event.get("code") == "RESUME_FAILED" and isinstance(detail, dict) and detail.get("reason") == "restarted"
