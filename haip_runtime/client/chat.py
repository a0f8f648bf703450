"""``haip-runtime chat``: talk to agents from a terminal, watch and answer their tool calls.

``Chat`` is the session loop: it reads lines at the prompt and sends them (to the agent, or as
answers to approvals and input requests, asked field by field from the request's JSON Schema), runs
the commands ``/agents [name]``, ``/tools``, ``/history``, ``/join <id>``, ``/help``, ``/quit``, and
cancels on Ctrl-C (twice quits). What is shown is ``view.py``'s; the connection, resumed after a drop,
is ``haip_client.HaipClient``; ``/history`` and what ``/join`` shows of a conversation come from the
REST history (``GET /haip/transactions``, ``.../messages``) with the same token.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import anyio
import httpx2
from rich.text import Text

from haip_runtime.client.haip_client import HaipClient, Received
from haip_runtime.client.recording import SpokenAnswers, send_recording
from haip_runtime.client.terminal import INTERRUPTED, Terminal, open_terminal, short
from haip_runtime.client.view import ChatView, Question
from haip_runtime.exceptions import ClientError
from haip_runtime.protocol.envelope import new_id

HELP = (
    "Type to talk to the agent. /agents lists agents, /agents <name> starts a conversation with one, "
    "/tools lists the tools with their arguments, /history your recent conversations, /join <id> goes back "
    "to one, /say FILE.wav sends a recording, /quit leaves. Ctrl-C cancels what is running, twice quits."
)
#: How many of a joined conversation's last messages ``/join`` prints.
SHOWN_ON_JOIN = 20
#: ``since`` of a join that wants no history replayed in the stream (past any tseq: nothing is after it).
NO_REPLAY = 2**63 - 1
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


def http_base(ws_url: str) -> str:
    """``http(s)://host:port`` of the server a WebSocket URL points at (where its REST history is)."""
    parts = urlsplit(ws_url)
    return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "", "", ""))


#: Characters in a conversation's id; a shorter ``--join``/``/join`` is the start of one of yours.
FULL_ID = 36
#: How many of the user's latest conversations such a start is looked for among.
PREFIX_SEARCH = 200
#: How long ``/tools`` waits for the conversation's first TOOL_LIST (sent right after its start).
TOOL_LIST_WAIT = 5.0


class Chat:
    """One chat session: the prompt's lines to the server, the server's events to the view."""

    def __init__(self, client: HaipClient) -> None:
        self.client = client
        self.view = ChatView()
        self.terminal: Terminal | None = None
        self.transaction: str | None = None
        self.interrupts = 0
        self.lost: str | None = None
        self._turn: _Turn | None = None  # piped input waits for this before its next line
        self.recent: list[str] = []  # the ids /history showed last: /join takes the start of one
        self.failed: list[str] = []  # codes of the turns that failed (piped input then exits 1)
        #: What piped input sent and caused: its messages' ids (lines, recordings, their transcripts and the
        #: answers), and the runs that answered them. Only their failures are its own (the conversation may be
        #: shared: another member's failed turn must not fail this one's script).
        self.mine = _Mine()
        self.down: dict[str, Any] = {}  # MCP servers /health said were not connected
        self.spoken = SpokenAnswers()

    # --- events ------------------------------------------------------------------------------------

    def connection_changed(self, state: str) -> None:
        """The client's reconnect news (``HaipClient(on_connection=...)``), as one line each."""
        if state == "reconnecting":
            self.view.say("the connection dropped; reconnecting… (what you type is sent once it is back)", "yellow")
        elif state == "resumed":
            self.view.say("reconnected: the session resumed, nothing was missed", "green")
        elif state == "restarted":
            self.view.forget_runs()
            self.view.say("reconnected: the server had restarted; the conversation was rejoined", "green")
        elif state == "lost":
            self.lost = self.lost or "the connection to the server was lost and could not be resumed"
            if self._turn is not None:  # piped input waiting for a turn that will not end here
                self._turn.settled.set()
            if self.terminal is not None:
                self.terminal.interrupt()
        if self.terminal is not None:
            self.terminal.refresh()

    async def watch(self) -> None:
        async for event in self.client.events():
            if event.type == "PING":
                continue
            self.mine.see(event)  # (before the filter: a start's reply may come before ``start`` has its id)
            if event.transaction in (None, self.transaction):
                if event.type == "RUN_ERROR" and event.transaction is not None and self.mine.ran(event):
                    self.failed.append(str(event.get("code")))
                elif event.type == "INFO" and event.get("event") == "audio.unheard" and self.mine.about(event):
                    self.failed.append("AUDIO_UNHEARD")
                elif event.type == "INFO" and event.get("event") == "speech.failed" and self.mine.about(event):
                    self.failed.append(str(event.get("code")))
                elif event.type == "INFO" and event.get("event") == "run.unqueued" and self.mine.about(event):
                    self.failed.append("NOT_ANSWERED")
                elif event.type == "ERROR" and self._turn is not None and self._turn.refused_by(event):
                    self.failed.append(str(event.get("code")))  # a recording not understood, say
                try:
                    self.view.on_event(event)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a payload not as documented
                    self.view.say(f"✗ cannot show {event.type}: {exc!r}", "red")
                if (line := self.spoken.see(event)) is not None:
                    self.view.say(line, "magenta")
            if self._turn is not None:
                self._turn.see(event, self.view, self.mine)
            if self.terminal is not None:
                self.terminal.refresh()
        if self._turn is not None:
            self._turn.settled.set()
        code = self.client.close_code
        self.lost = self.lost or f"the connection to the server was lost (close code {code})"
        if self.terminal is not None:
            self.terminal.interrupt()

    # --- answers and commands ---------------------------------------------------------------------

    async def answer(self, question: Question, line: str) -> None:
        text = line.strip()
        if question.kind == "approval":
            verb, _, reason = text.partition(" ")
            if verb.lower() not in ("y", "yes", "approve", "n", "no", "reject"):
                self.view.say("answer y to approve, n (or n <reason>) to reject", "yellow")
                return
            decision = "approve" if verb.lower() in ("y", "yes", "approve") else "reject"
            self.view.answered(question)
            payload = {"call_id": question.call_id, "decision": decision, **({"reason": reason} if reason else {})}
            await self.client.send("TOOL_UPDATE", payload, transaction=self.transaction)
            return
        if text == "!decline":
            self.view.answered(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "decision": "decline"})
            return
        if len(question.values) >= len(question.fields):  # a request with no fields: Enter answers it
            self.view.answered(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "input": question.values})
            return
        name, schema, required = question.fields[len(question.values)]
        try:
            value = field_value(schema, text, required)
        except ValueError as exc:
            self.view.say(str(exc), "yellow")
            return
        question.values[name] = value
        if value is None:
            del question.values[name]
            question.fields.remove((name, schema, required))
        if len(question.values) == len(question.fields):
            self.view.answered(question)
            await self._send_input(question.call_id, {"call_id": question.call_id, "input": question.values})

    async def _send_input(self, call_id: str, payload: dict[str, Any]) -> None:
        await self.client.send("TOOL_UPDATE", payload, transaction=self.transaction)

    async def start(self, agent: str | None) -> None:
        """A conversation with ``agent``; ``None``: echo if the server has it, else its first agent."""
        if agent is None:  # (a newcomer's find: a server without echo refused the chat's default, never named)
            names = [str(a["name"]) for a in (await self.request("TOOL_LIST", {}, "TOOL_LIST")).get("tools", [])]
            if not names:
                raise ClientError("the server has no agent you may talk to (none, or none your roles may start)")
            agent = "echo" if "echo" in names else names[0]
        self.transaction = await self.client.start_transaction(agent)
        self.view.begin(agent, self.transaction)
        await self.report_servers()

    async def _tools_coming(self, transaction: str) -> None:
        """No tools yet: wait (``TOOL_LIST_WAIT`` at most) for the TOOL_LIST that follows the start, or, while
        an MCP server makes its first connection (a server that just started), for the one that lists its
        tools (an author's find: ``/tools`` as a script's first line said there were none)."""
        deadline = time.monotonic() + TOOL_LIST_WAIT

        def lists() -> set[int]:
            return {id(e) for e in self.client.received if e.type == "TOOL_LIST" and e.transaction == transaction}

        async def next_list(old: set[int], *, listing: bool = False) -> Received | None:
            with contextlib.suppress(ClientError):  # (none in time: said as no tools)
                return await self.client.wait_for(
                    lambda e: (
                        e.type == "TOOL_LIST"
                        and e.transaction == transaction
                        and id(e) not in old
                        and (bool(e.get("tools")) or not listing)
                    ),
                    timeout=max(deadline - time.monotonic(), 0.01),
                )
            return None

        if not lists():
            first = await next_list(set())
            if first is None or first.get("tools"):
                return
        try:
            servers = (await self.rest("/health", {})).get("mcp") or {}
        except ClientError:
            return
        if any(status.get("state") in ("starting", "connecting") for status in servers.values()):
            await next_list(lists(), listing=True)

    async def report_servers(self) -> None:
        """One line per MCP server that is down (``/health``): its tools are missing, and this says why."""
        try:
            health = await self.rest("/health", {})
        except ClientError:
            return  # an older server, or a proxy that hides /health: the INFO events still tell
        servers = health.get("mcp") or {}
        self.down = {name: s for name, s in servers.items() if s.get("state") in ("failed", "reconnecting")}
        for name, status in self.down.items():
            error = f": {status['error']}" if status.get("error") else ""
            self.view.servers[name] = (str(status["state"]), error)
            self.view.say(f"MCP server {name} {status['state']}{error}", "yellow")

    async def join(self, wanted: str) -> None:
        """Join a conversation (``wanted``: its id, or the start of one /history listed) and show its last messages."""
        matches = [tx for tx in self.recent if tx.startswith(wanted)]
        if not matches and len(wanted) < FULL_ID:  # (--join, or /join before /history): the latest ones
            listed = (await self.rest("/haip/transactions", {"limit": PREFIX_SEARCH}))["transactions"]
            matches = [item["id"] for item in listed if item["id"].startswith(wanted)]
        if len(matches) > 1:
            raise ClientError(f"{len(matches)} of your conversations begin with {wanted!r}: give more of its id")
        transaction = matches[0] if matches else wanted
        before, self.transaction = self.transaction, transaction  # its live events show from now on
        self.view.hold()  # (streamed ones wait for the history up to the join)
        upto: int | None = None
        try:  # no history in the stream: the last messages come from the REST history, up to the join
            try:
                joined = await self.client.join(transaction, since=NO_REPLAY)
            except ClientError:
                self.transaction = before
                raise
            upto = int(joined.get("tseq") or 0)
            agents = [str(agent) for agent in joined.get("agents") or []]
            self.view.begin(agents[0] if agents else "", transaction, joined=True)
            messages, more = await self.messages(transaction, upto=upto)
            if more:
                self.view.say(f"… {more} earlier message(s) (GET /haip/transactions/{transaction}/messages)", "dim")
            for message in messages:
                if message.get("state") == "streaming" and message.get("message_id"):  # its next parts come live
                    text = await self.streamed_so_far(transaction, message, upto=upto)
                    self.view.resume_stream(str(message["message_id"]), str(message.get("author") or ""), text)
                else:
                    self.view.print_past(message, self.client.user)
        finally:
            self.view.release(upto)
        others = [str(member) for member in joined.get("members") or [] if member != self.client.user]
        self.view.say(f"in this conversation: {', '.join(others + agents)}", "dim")
        await self.report_servers()

    async def messages(self, transaction: str, upto: int) -> tuple[list[dict[str, Any]], int]:
        """The conversation's last ``SHOWN_ON_JOIN`` messages up to ``upto`` (a tseq: what came after it
        comes live), and how many came before them."""
        kept: list[dict[str, Any]] = []
        after: int | None = 0
        while after is not None:
            page = await self.rest(f"/haip/transactions/{quote(transaction)}/messages", {"after": after, "limit": 1000})
            kept += [message for message in page["messages"] if int(message.get("tseq") or 0) <= upto]
            after = page["next_after"]
        return kept[-SHOWN_ON_JOIN:], max(0, len(kept) - SHOWN_ON_JOIN)

    async def streamed_so_far(self, transaction: str, message: dict[str, Any], upto: int) -> str:
        """What a message still streaming at the join had said up to the join's tseq ``upto``: the history's
        text of it may have more (parts stored since), which come live too (they showed twice)."""
        message_id, text, after = message["message_id"], "", int(message["tseq"]) - 1
        while after < upto:
            page = await self.rest(f"/haip/transactions/{quote(transaction)}/events", {"after": after, "limit": 1000})
            for event in page["events"]:
                payload = event.get("payload")
                if int(event.get("tseq") or 0) > upto:
                    return text
                if event["type"] in ("MESSAGE_START", "MESSAGE_PART") and isinstance(payload, dict):
                    text += str(payload.get("text") or "") if payload.get("message_id") == message_id else ""
            if page["next_after"] is None:
                break
            after = int(page["next_after"])
        return text

    async def history(self) -> None:
        listed = (await self.rest("/haip/transactions", {"limit": 10}))["transactions"]
        if not listed:
            self.view.say("no conversations yet", "dim")
            return
        out = Text()
        for item in listed:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["last_activity"] / 1000))
            out.append(f"{'*' if item['id'] == self.transaction else ' '} {item['id']}", style="bold")
            out.append(f"  {when}  {', '.join(item['agents'])}  ", style="dim")
            out.append(f"{short(item.get('title') or '(nothing said yet)', 60)}\n")
        out.append("/join <id> (or its first characters) goes back to one", style="dim")
        self.recent = [item["id"] for item in listed]
        self.view.say(out)

    async def rest(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """A GET of the server's REST history, with this chat's token; a refusal raises ``ClientError``."""
        headers = {"Authorization": f"Bearer {self.client.token}"} if self.client.token else {}
        try:
            async with httpx2.AsyncClient(timeout=self.client.timeout) as http:
                response = await http.get(http_base(self.client.url) + path, params=params, headers=headers)
            body: dict[str, Any] = response.json()
        except (httpx2.HTTPError, ValueError) as exc:
            raise ClientError(f"cannot read the history: {exc}") from None
        if response.status_code != 200:
            error = body.get("error") or {}
            raise ClientError(str(error.get("message") or response.status_code), code=error.get("code"))
        return body

    async def command(self, line: str) -> bool:
        """Handle a line; ``False`` means quit."""
        verb, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if verb == "/quit":
            return False
        if verb == "/help":
            self.view.say(HELP, "dim")
        elif verb in ("/agents", "/agent"):
            await (self.start(rest) if rest else self.list_agents())
        elif verb == "/tools":
            await self.list_tools()
        elif verb == "/history":
            await self.history()
        elif verb == "/join":
            await (self.join(rest) if rest else self.history())
        elif verb == "/say" and self.transaction is not None:
            await self.say(rest)
        elif line.strip():
            assert self.transaction is not None and self.terminal is not None
            if self.terminal.echoes_input:
                await self.client.send_text(self.transaction, line.strip())
            else:  # piped: show the line, and let the agent finish (or ask) before reading the next
                self.view.print_message(self.client.user or "you", line.strip())
                self._turn = _Turn(started=False, line=new_id())
                self.mine.messages.add(self._turn.line or "")
                self._turn.message_id = await self.client.send_text(
                    self.transaction, line.strip(), message_id=self._turn.line
                )
                await self._turn.settled.wait()
        return True

    async def say(self, path: str) -> None:
        """Send a recording; piped, wait for the answer and its speech before the next line."""
        assert self.transaction is not None and self.terminal is not None
        if not path:
            self.view.say("/say FILE.wav sends a recording to the agent", "yellow")
        elif self.terminal.echoes_input:
            await send_recording(self.client, self.transaction, path)
        else:
            self._turn = _Turn(started=False, message_id=new_id())  # (known before its events can come)
            self.mine.messages.add(self._turn.message_id or "")
            await send_recording(self.client, self.transaction, path, self._turn.message_id, self._turn.sent)
            await self._turn.settled.wait()

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
            mark = "*" if agent["name"] == self.view.agent else " "
            out.append(f"{mark} {agent['name']}", style="bold")
            out.append(f"  {agent.get('description') or ''}\n", style="dim")
        out.append("/agents <name> starts a conversation with another agent", style="dim")
        self.view.say(out)

    async def list_tools(self) -> None:
        tools = self.view.tools
        if not tools and self.transaction is not None:
            await self._tools_coming(self.transaction)
            lists = [e for e in self.client.received if e.type == "TOOL_LIST" and e.transaction == self.transaction]
            tools = lists[-1].get("tools") or [] if lists else []  # (the view may not have read it yet)
        if not tools:
            down = f" (MCP servers not connected: {', '.join(self.down)})" if self.down else ""
            self.view.say(f"no tools in this conversation (yet){down}", "dim")
            return
        out = Text()
        for tool in tools:
            schema = (await self.request("TOOL_SCHEMA", {"tool": tool["name"]}, "TOOL_SCHEMA")).get("schema", {})
            out.append(f"{tool['name']}({signature(schema.get('inputSchema') or {})})", style="bold")
            out.append(f"  {short(tool.get('description') or '', 70)}\n", style="dim")
        self.view.say(out[:-1] if str(out).endswith("\n") else out)

    def interrupt(self) -> bool:
        """Ctrl-C: cancel what runs; ``False`` (quit) when pressed twice in a row."""
        self.interrupts += 1
        if self.interrupts >= 2:
            return False
        if self.view.runs or self.view.calls:
            self.view.say("cancelling… (Ctrl-C again quits)", "yellow")
            return True
        self.view.say("nothing to cancel (Ctrl-C again or Ctrl-D quits)", "dim")
        return True

    async def cancel_running(self) -> None:
        for run_id in list(self.view.runs):
            await self.client.send("RUN_CANCEL", {"run_id": run_id}, transaction=self.transaction)
        for call_id, call in list(self.view.calls.items()):
            if call.run_id is None or call.run_id not in self.view.runs:
                payload = {"call_id": call_id, "reason": "cancelled from the terminal"}
                await self.client.send("TOOL_CANCEL", payload, transaction=self.transaction)

    # --- the loop ----------------------------------------------------------------------------------

    def attach(self, terminal: Terminal) -> None:
        self.terminal = self.view.terminal = terminal

    async def run(self, terminal: Terminal) -> None:
        self.attach(terminal)
        while self.lost is None:
            question = self.view.questions[0] if self.view.questions else None
            try:
                prompt = question.prompt() if question else f"{self.client.user} › "
                line = await terminal.read(prompt, question=question is not None)
            except EOFError:
                if question is not None and not terminal.echoes_input:  # nothing left to answer it with
                    self.view.say(f"✗ input ended with a question unanswered: {question.prompt().strip()}", "red")
                    self.failed.append("UNANSWERED")
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
                if question is not None and question in self.view.questions:
                    await self.answer(question, line)
                    if not terminal.echoes_input and self.view.runs and not self.view.questions:
                        self._turn = _Turn(started=True)
                        await self._turn.settled.wait()
                elif question is None and not await self.command(line):
                    return
            except ClientError as exc:
                if self.lost is None:
                    self.view.say(f"✗ {exc}" + (f" ({exc.code})" if exc.code else ""), "red")
                    if not terminal.echoes_input:  # a script must see that a line was refused
                        self.failed.append(exc.code or "REFUSED")
        raise ClientError(self.lost)


@dataclass
class _Turn:
    """For piped input: settled once the agent has finished its turn, asks something, or refused the line."""

    started: bool
    #: The line's message id (a recording's: that of its transcript, once heard): its runs name it.
    line: str | None = None
    #: The envelope's id (a recording's: its audio message id): what refuses it names it.
    message_id: str | None = None
    settled: anyio.Event = field(default_factory=anyio.Event)
    heard: bool = False  # the line was a recording, heard as words: its answers will be spoken too
    answers: set[str] = field(default_factory=set)
    spoken: set[str] = field(default_factory=set)
    #: The envelopes that sent the line (a recording's chunks): an ERROR refusing it names one.
    sent: set[str] = field(default_factory=set)

    def see(self, event: Received, view: ChatView, mine: _Mine | None = None) -> None:
        """Settle the turn on ``event`` if it ends it. ``mine``: what this chat sent and caused; its line is
        done when its own runs are (without it, every run shown), not when another member's are."""
        if event.type == "RUN_STARTED":
            # This line's: a run started for another member's message, in a shared conversation, is not. A
            # recording's runs name its transcript, or the recording itself (an agent's ``on_audio``).
            answered = event.get("message_id")
            self.started = self.started or (answered is not None and answered in (self.line, self.message_id))
        elif event.type == "MESSAGE" and isinstance(event.payload, dict) and event.get("spoken"):
            if self.message_id is not None and event.get("audio_message_id") == self.message_id:
                self.heard, self.line = True, str(event.get("message_id"))
        elif event.type == "MESSAGE_END" and (mine is None or mine.ran(event)):
            self.answers.add(str(event.get("message_id")))
        elif (event.type == "AUDIO_CHUNK" and event.get("final")) or event.get("event") == "speech.interrupted":
            self.spoken.add(str(event.get("message_id")))
        elif event.get("event") == "speech.failed":
            self.heard = False  # nothing more of this run is spoken: its text is the answer
        unheard = event.get("event") == "audio.unheard" and event.get("message_id") == self.message_id
        unanswered = (
            event.get("event") == "run.unqueued" and self.line is not None and event.get("message_id") == self.line
        )
        refused = self.refused_by(event) or (unheard and self.message_id is not None) or unanswered
        running = view.runs.keys() if mine is None else view.runs.keys() & mine.runs
        done = self.started and not running and (not self.heard or self.answers <= self.spoken)
        if view.questions or refused or done:
            self.settled.set()

    def refused_by(self, event: Received) -> bool:
        """Whether ``event`` is the ERROR that refused this turn's line (a recording not understood, say, or
        its run refused at the limit: that names the recording's last chunk)."""
        related = event.get("related_id")
        return event.type == "ERROR" and related is not None and (related == self.message_id or related in self.sent)


@dataclass
class _Mine:
    """The messages piped input sent (and their transcripts and answers), and the runs that answered them."""

    messages: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)
    #: The conversations this chat started: their greetings (``on_start`` runs, answering no message) are its own.
    started: set[str] = field(default_factory=set)

    def see(self, event: Received) -> None:
        message_id = event.get("message_id")
        if event.type == "TRANSACTION_START" and event.transaction is not None:
            self.started.add(event.transaction)  # (a session is sent only its own starts: others' are joins)
        elif event.type == "RUN_STARTED" and event.get("run_id"):
            if message_id in self.messages or (message_id is None and event.transaction in self.started):
                self.runs.add(str(event.get("run_id")))
        elif event.type == "MESSAGE" and event.get("audio_message_id") in self.messages and message_id:
            self.messages.add(str(message_id))  # a recording's transcript: the runs answer it
        elif event.type in ("MESSAGE_START", "MESSAGE") and message_id and self.ran(event):
            self.messages.add(str(message_id))  # an answer (its speech may fail)

    def ran(self, event: Received) -> bool:
        """Whether ``event`` belongs to a run that answered one of these messages."""
        run_id = event.get("run_id") or event.run_id
        return run_id is not None and str(run_id) in self.runs

    def about(self, event: Received) -> bool:
        """Whether ``event`` (an ``INFO``) is about one of these messages."""
        return event.get("message_id") in self.messages


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
        raise ValueError(f"{'an' if kind == 'integer' else 'a'} {kind} please") from None
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


async def chat(
    url: str, token: str | None, agent: str | None, reconnect: float = 60.0, join: str | None = None
) -> None:
    """Connect, start a conversation with ``agent`` (``None``: echo, or the server's first agent) or join
    conversation ``join``, and run the chat until the person quits.

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
        async with anyio.create_task_group() as tg, open_terminal(session.view.live) as terminal:
            session.attach(terminal)
            session.view.say(f"connected to {ws_url} as {client.user}. {HELP}", "dim")
            try:
                await (session.join(join) if join else session.start(agent))
                tg.start_soon(session.watch)
                await session.run(terminal)
            except ClientError as exc:  # raised outside the group, so the CLI gets it, not an ExceptionGroup
                error = exc
            finally:
                tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if (
        session.failed and session.terminal is not None and not session.terminal.echoes_input
    ):  # a script must see that its turn failed
        count = "a turn" if len(session.failed) == 1 else f"{len(session.failed)} turns"
        raise ClientError(f"{count} failed: {', '.join(session.failed)}")
