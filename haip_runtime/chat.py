"""``haip-runtime chat``: talk to an agent from a terminal, and answer its tool calls.

Lines are sent to the agent as messages. Lines starting with ``!`` act on the conversation:
``!approve`` / ``!reject [reason]`` a tool call waiting for approval, ``!input {json}`` /
``!decline`` a tool asking for input, ``!cancel`` the running tool call, ``!stop`` the running
turn, ``!help``. Agent text goes to stdout; tool activity and errors to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import anyio

from haip_runtime.client import HaipClient, Received

HELP = """commands: !approve [reason] | !reject [reason] | !input {json} | !decline | !cancel | !stop | !help"""


@dataclass
class Pending:
    """What the conversation is waiting on, as the latest events say."""

    approval: str | None = None
    input: str | None = None
    running_call: str | None = None
    running_turn: str | None = None

    def see(self, event: Received) -> str | None:
        """Track ``event``; returns a hint for the human when something waits on them."""
        call_id, status = event.get("call_id"), event.get("status")
        if event.type == "TOOL_UPDATE" and status == "AWAITING_APPROVAL":
            self.approval = call_id
            return f"{event.get('call_id')} waits for approval: type !approve or !reject [reason]"
        if event.type == "TOOL_UPDATE" and status == "INPUT_REQUIRED":
            self.input = call_id
            request = event.get("request") or {}
            return (
                f"the tool asks: {request.get('message')} (schema {json.dumps(request.get('schema'))}); "
                "type !input {json} or !decline"
            )
        if event.type == "TOOL_UPDATE" and status == "RUNNING":
            self.running_call = call_id
        elif event.type == "TOOL_DONE" and call_id == self.running_call:
            self.running_call = None
        elif event.type == "RUN_STARTED":
            self.running_turn = event.run_id
        elif event.type in ("RUN_FINISHED", "RUN_ERROR") and event.run_id == self.running_turn:
            self.running_turn = None
        return None


def command(line: str, pending: Pending) -> tuple[str, dict[str, Any]] | str:
    """A ``!`` line as (type, payload) to send, or a message for the human."""
    verb, _, rest = line[1:].strip().partition(" ")
    rest = rest.strip()
    if verb in ("approve", "reject"):
        if pending.approval is None:
            return "no tool call is waiting for approval"
        decision = {"call_id": pending.approval, "decision": verb, **({"reason": rest} if rest else {})}
        pending.approval = None
        return "TOOL_UPDATE", decision
    if verb in ("input", "decline"):
        if pending.input is None:
            return "no tool is asking for input"
        if verb == "decline":
            answer: dict[str, Any] = {"call_id": pending.input, "decision": "decline"}
        else:
            try:
                answer = {"call_id": pending.input, "input": json.loads(rest)}
            except json.JSONDecodeError as exc:
                return f"!input needs a JSON object: {exc.msg}"
        pending.input = None
        return "TOOL_UPDATE", answer
    if verb == "cancel":
        if pending.running_call is None:
            return "no tool call is running"
        return "TOOL_CANCEL", {"call_id": pending.running_call, "reason": "cancelled from the terminal"}
    if verb == "stop":
        return ("RUN_CANCEL", {"run_id": pending.running_turn}) if pending.running_turn else "no turn is running"
    return HELP


async def chat(url: str, token: str | None, agent: str) -> None:
    async with HaipClient(url, token=token) as client:
        transaction = await client.start_transaction(agent)
        pending = Pending()
        say(f"connected as {client.user}; talking to {agent!r}. {HELP}. Ctrl-D quits.")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_show_events, client, pending)
            async for line in anyio.wrap_file(sys.stdin):
                text = line.strip()
                if not text:
                    continue
                if not text.startswith("!"):
                    await client.send_text(transaction, text)
                    continue
                action = command(text, pending)
                if isinstance(action, str):
                    say(action)
                else:
                    await client.send(action[0], action[1], transaction=transaction)
            tg.cancel_scope.cancel()


async def _show_events(client: HaipClient, pending: Pending) -> None:
    async for event in client.events():
        hint = pending.see(event)
        if event.type == "MESSAGE_PART":
            print(event.get("text"), end="", flush=True)
        elif event.type == "MESSAGE_END":
            print(flush=True)
        elif event.type in ("ERROR", "RUN_ERROR"):
            say(f"! {event.get('code')}: {event.get('message')}")
        elif event.type.startswith("TOOL_") and event.type != "TOOL_LIST":
            say(f"  [{event.type}] {json.dumps(event.payload)}")
        elif event.type == "INFO" and event.get("event") == "mcp.server":
            say(f"  [MCP server {event.get('server')}: {event.get('state')}] {event.get('error') or ''}".rstrip())
        if hint:
            say(f"  >> {hint}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
