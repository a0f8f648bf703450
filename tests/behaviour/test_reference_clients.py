"""The HAIP TypeScript SDK and CLI, replayed byte for byte (REFERENCE-CLIENTS.md)."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest

from haip_runtime.protocol.envelope import new_id
from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from tests.support.postgres import PostgresServer
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

# Captured frames; only the ids (shortened in the captures) are completed and TOKEN is a real token.
SDK_HAI = (
    '{"id":"2400c739-5b1e-4f0e-9a55-0c1d2e3f4a5b","transaction":"null","session":"45db6cfc-1a2b-4c3d-8e9f-'
    '0a1b2c3d4e5f","seq":"1795608079581","ts":"1795608079581","channel":"SYSTEM","type":"HAI","payload":{'
    '"haip_version":"1.1.2","accept_major":[1],"accept_events":["HAI","PING","PONG","ERROR","FLOW_UPDATE",'
    '"TRANSACTION_START","TRANSACTION_END","TRANSACTION_JOIN","REPLAY_REQUEST","MESSAGE_UPDATE","MESSAGE","AUDIO",'
    '"INFO","TOOL_LIST","TOOL_SCHEMA"],"capabilities":{"binary_frames":true,"flow_control":{"initial_credit_messages"'
    ':10,"initial_credit_bytes":1048576},"max_concurrent_runs":5,"signed_envelopes":false},"auth":{"token":'
    '"Bearer TOKEN"}}}'
)
SDK_TRANSACTION_START = (
    '{"id":"8cdea884-2b3c-4d5e-9f60-718293a4b5c6","transaction":"e0b9360a-3c4d-4e5f-a071-8293a4b5c6d7","session":'
    '"45db6cfc-1a2b-4c3d-8e9f-0a1b2c3d4e5f","seq":"1795608079599","ts":"1795608079599","channel":"SYSTEM","type":'
    '"TRANSACTION_START","payload":{"auth":{"token":"Bearer TOKEN"},"toolName":"pirate","params":{}}}'
)
SDK_MESSAGE = (
    '{"id":"b3e94583-4d5e-4f60-8172-93a4b5c6d7e8","transaction":"TX","session":"45db6cfc-1a2b-4c3d-8e9f-'
    '0a1b2c3d4e5f","seq":"1795608097051","ts":"1795608097051","channel":"USER","type":"MESSAGE","payload":'
    '"hello pirate"}'
)
REFERENCE_ID = "e0b9360a-3c4d-4e5f-a071-8293a4b5c6d7"


DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


@contextmanager
def serving(request: pytest.FixtureRequest, config: dict[str, Any]) -> Iterator[LiveServer]:
    """One runtime; or, for the ``cluster`` param, the second of two nodes sharing Redis and PostgreSQL
    (the clients must not see a difference)."""
    if request.param == "one process":
        with live_server(make_config(config)) as live:
            yield live
        return
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{secrets.token_hex(6)}"
    cluster = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": name}
    storage = {"backend": "postgres", "url": postgres.create_database(name), "flush_interval_seconds": 0.01}
    clustered = make_config({**config, "cluster": cluster, "storage": storage})
    try:
        with live_server(clustered), live_server(clustered) as second:
            yield second
    finally:
        postgres.drop_database(name)


@pytest.fixture(scope="module", params=["one process", "cluster"])
def pirate_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    agents = {
        "pirate": {"plugin": "echo", "options": {"prefix": "Arr! you said: "}},
        "storyteller": {"plugin": "haip_runtime.demo.storyteller:Storyteller", "options": {"words_per_second": 200}},
    }
    with serving(request, {"agents": agents, "session": {"heartbeat_interval_seconds": 0.2}}) as live:
        yield live


@pytest.fixture(scope="module", params=["one process", "cluster"])
def operator_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The operator with the demo MCP server, whose delete_everything needs approval."""
    demo = {**DEMO, "require_approval": ["delete_everything"]}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["demo"]}}
    with serving(request, {"agents": agents, "mcp": {"servers": {"demo": demo}}}) as live:
        yield live


async def test_sdk_conversation_replayed_byte_for_byte(pirate_server: LiveServer) -> None:
    token = pirate_server.token("sdk-user")
    async with raw_peer(pirate_server.bare_url) as peer:
        await peer.send_frame(SDK_HAI.replace("TOKEN", token))
        await peer.send_frame(SDK_TRANSACTION_START.replace("TOKEN", token))
        started = await peer.receive_type("TRANSACTION_START")
        await peer.send_frame(SDK_MESSAGE.replace("TX", started["transaction"]))
        seen = []
        while True:
            envelope = await peer.receive()
            seen.append(envelope)
            if envelope["type"] == "PING":
                pong = {**json.loads(SDK_MESSAGE), "type": "PONG", "channel": "SYSTEM", "payload": envelope["payload"]}
                await peer.send_frame(json.dumps(pong))
            if envelope["type"] == "MESSAGE":
                break
    assert started["payload"]["referenceId"] == REFERENCE_ID and started["transaction"] != REFERENCE_ID
    assert started["channel"] == "SYSTEM"
    assert envelope["channel"] == "AGENT" and envelope["payload"] == "Arr! you said: hello pirate"
    assert envelope["transaction"] == started["transaction"]
    # Only what they accept; their timestamp seqs are opaque, so nothing is acked to them.
    assert {e["type"] for e in seen} <= TRANSACTION_ERA_EVENTS
    assert all("ack" not in e for e in seen)


async def test_sdk_with_duplicate_timestamp_seqs_loses_nothing(pirate_server: LiveServer) -> None:
    token = pirate_server.token("sdk-user")
    async with raw_peer(pirate_server.bare_url) as peer:
        await peer.send_frame(SDK_HAI.replace("TOKEN", token))
        await peer.send_frame(SDK_TRANSACTION_START.replace("TOKEN", token))
        started = await peer.receive_type("TRANSACTION_START")
        message = SDK_MESSAGE.replace("TX", started["transaction"])
        await peer.send_frame(message)
        second = message.replace("hello pirate", "same ms, second message").replace("b3e94583", "c4fa5694")
        await peer.send_frame(second)  # same timestamp seq, its own id (as the SDK sends them)
        answers = [(await peer.receive_type("MESSAGE"))["payload"] for _ in range(2)]
    assert sorted(answers) == ["Arr! you said: hello pirate", "Arr! you said: same ms, second message"]


async def test_cli_health_shape(pirate_server: LiveServer) -> None:
    import httpx2

    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{pirate_server.http_url}/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert isinstance(body["uptime"], int) and body["uptime"] >= 0
    assert isinstance(body["activeConnections"], int) and isinstance(body["totalConnections"], int)


async def test_cli_default_token_is_refused_with_error_then_close(pirate_server: LiveServer) -> None:
    async with raw_peer(pirate_server.bare_url) as peer:
        await peer.send_frame(SDK_HAI)  # "Bearer TOKEN", as the CLI sends without --token
        await peer.send_frame(SDK_TRANSACTION_START)
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED" and code == 1008


def test_no_error_leaks_server_state_before_authentication() -> None:
    # Checked by construction: the handshake answers only with ERROR + close (see test_handshake.py);
    # here: an unauthenticated TRANSACTION_START for an unknown agent does not say AGENT_NOT_FOUND.
    with live_server(make_config()) as live:
        import anyio

        async def attempt() -> list[str]:
            async with raw_peer(live.bare_url) as peer:
                await peer.send_frame(SDK_HAI)
                await peer.send_frame(SDK_TRANSACTION_START)
                codes = [(await peer.receive_type("ERROR"))["payload"]["code"]]
                await peer.closed()
                return codes

        assert anyio.run(attempt) == ["AUTHENTICATION_FAILED"]


# --- what the SDK does after a drop, fast typing, approvals (PROTOCOL.md section 12) -------------------------


class SdkPeer:
    """The SDK's dialect on one WebSocket: a HAI with a made-up session, timestamp seqs, string payloads."""

    def __init__(self, peer: RawPeer, token: str) -> None:
        self.peer, self.token = peer, token
        self.session = new_id()
        self.clock = 1795608079581

    async def send(self, type: str, payload: Any, transaction: str = "null", channel: str = "SYSTEM") -> str:
        self.clock += 1
        envelope = {
            "id": new_id(),
            "transaction": transaction,
            "session": self.session,
            "seq": str(self.clock),
            "ts": str(self.clock),
            "channel": channel,
            "type": type,
            "payload": payload,
        }
        await self.peer.send_frame(json.dumps(envelope))
        return str(envelope["id"])

    async def say(self, transaction: str, text: str) -> str:
        return await self.send("MESSAGE", text, transaction, "USER")

    async def start(self, agent: str) -> str:
        await self.send(
            "TRANSACTION_START", {"auth": {"token": f"Bearer {self.token}"}, "toolName": agent, "params": {}}
        )
        return str((await self.peer.receive_type("TRANSACTION_START"))["transaction"])

    async def shown(self, timeout: float = 10) -> dict[str, Any]:
        """The next MESSAGE or ERROR: what the reference CLI shows (it answers PINGs meanwhile)."""
        with anyio.fail_after(timeout):
            while True:
                envelope = await self.peer.receive(timeout)
                if envelope["type"] == "PING":
                    await self.send("PONG", envelope["payload"])
                if envelope["type"] in ("MESSAGE", "ERROR"):
                    assert envelope["type"] in TRANSACTION_ERA_EVENTS
                    return envelope


@asynccontextmanager
async def sdk(live: LiveServer, user: str = "sdk-user") -> AsyncIterator[SdkPeer]:
    token = live.token(user)
    async with raw_peer(live.bare_url) as peer:
        client = SdkPeer(peer, token)
        hai = json.loads(SDK_HAI.replace("TOKEN", token))
        await client.send("HAI", hai["payload"])
        yield client


async def test_sdk_reconnecting_without_resume_goes_on_with_its_transaction(pirate_server: LiveServer) -> None:
    async with sdk(pirate_server) as first:
        transaction = await first.start("pirate")
        await first.say(transaction, "before the drop")
        before = await first.shown()
    async with sdk(pirate_server) as second:  # a fresh HAI, a session of its own, the old transaction id
        await second.say(transaction, "after the drop")
        after = await second.shown()
    async with sdk(pirate_server, "mallory") as stranger:
        await stranger.say(transaction, "let me in")
        refused = await stranger.shown()
        unknown = new_id()
        await stranger.say(unknown, "and this one?")
        nothing = await stranger.shown()
    assert before["payload"] == "Arr! you said: before the drop"
    assert after["type"] == "MESSAGE" and after["payload"] == "Arr! you said: after the drop"
    assert after["transaction"] == transaction
    assert refused["type"] == "ERROR" and refused["payload"]["code"] == "TRANSACTION_NOT_FOUND"
    assert refused["payload"]["message"] == nothing["payload"]["message"].replace(unknown, transaction)  # as if unknown


async def test_six_lines_typed_at_once_are_all_answered_in_order(pirate_server: LiveServer) -> None:
    async with sdk(pirate_server) as client:
        transaction = await client.start("storyteller")
        lines = [f"line {n}" for n in range(1, 7)]  # more than the 4 runs a session may have at once
        for line in lines:
            await client.say(transaction, line)
        shown = [await client.shown() for _ in lines]
    assert [e["type"] for e in shown] == ["MESSAGE"] * 6
    assert [e["payload"] for e in shown] == [
        f"Once upon a time, someone said {line!r}. The words travelled far, and everyone who heard {line!r} smiled. "
        "The end."
        for line in lines
    ]


async def test_an_approval_is_asked_in_words_and_granted_or_refused_by_typing(operator_server: LiveServer) -> None:
    async with sdk(operator_server) as client:
        transaction = await client.start("operator")
        await client.say(transaction, "/call demo.delete_everything")
        asked = await client.shown()
        await client.say(transaction, "yes")
        granted = await client.shown()
        await client.say(transaction, "/call demo.delete_everything")
        asked_again = await client.shown()
        await client.say(transaction, "no, not now")
        refused = await client.shown()
        await client.say(transaction, "/help")  # the next line is the agent's again
        helped = await client.shown()
    assert asked["channel"] == "AGENT" and asked["transaction"] == transaction
    assert (
        asked["payload"]
        == asked_again["payload"]
        == (
            "demo.delete_everything wants to run with no arguments and needs your approval: "
            'reply yes or no (a reason may follow, as in "no, not now").'
        )
    )
    assert granted["payload"] == "demo.delete_everything returned: pretended to delete everything"
    assert refused["payload"] == "demo.delete_everything ended CANCELLED: rejected by sdk-user: not now"
    assert "I run MCP tools for you" in helped["payload"]


async def test_an_input_request_is_answered_in_words(operator_server: LiveServer) -> None:
    async with sdk(operator_server) as client:
        transaction = await client.start("operator")
        await client.say(transaction, "/call demo.ask_user")
        asked = await client.shown()
        await client.say(transaction, "name: Ada")  # a required field is missing: asked again, nothing lost
        again = await client.shown()
        await client.say(transaction, "Name: Ada\nfavourite_colour: green")
        answered = await client.shown()
    assert asked["payload"].splitlines() == [
        "demo.ask_user asks: Who are you, and which colour do you like best?",
        "- name (Name): string, required",
        "- favourite_colour (Favourite Colour): string, required",
        'Reply with one "name: value" line per field, or a JSON object, or "decline".',
    ]
    assert again["payload"].startswith("Still needed: favourite_colour.")
    assert answered["payload"] == "demo.ask_user returned: Ada likes green"


async def test_an_answer_in_words_that_does_not_fit_is_asked_again_not_passed_to_the_agent(
    operator_server: LiveServer,
) -> None:
    """A reviewer's find: an answer the words reader takes but the request's schema does not was passed to
    the agent as an ordinary message, and the call waited until it timed out."""
    async with sdk(operator_server) as client:
        transaction = await client.start("operator")
        await client.say(transaction, "/call demo.ask_user")
        await client.shown()
        await client.say(transaction, '{"name": 5, "favourite_colour": "green"}')
        again = await client.shown()
        await client.say(transaction, '{"name": "Ada", "favourite_colour": "green"}')
        answered = await client.shown()
    assert again["payload"] == "name: 5 is not of type 'string'. Answer again, or say decline."
    assert answered["payload"] == "demo.ask_user returned: Ada likes green"


async def test_an_approval_asked_before_a_drop_is_answered_after_the_reconnect(operator_server: LiveServer) -> None:
    async with sdk(operator_server) as first:
        transaction = await first.start("operator")
        await first.say(transaction, "/call demo.delete_everything")
        asked = await first.shown()
    async with sdk(operator_server) as second:  # reconnected without resume, as the SDK does
        await second.say(transaction, "yes")
        asked_again = await second.shown()  # joining it, the new session is asked again; "yes" answers
        granted = await second.shown()
    assert asked["payload"] == asked_again["payload"] and "needs your approval" in asked["payload"]
    assert granted["payload"] == "demo.delete_everything returned: pretended to delete everything"


async def test_an_approval_nobody_answers_in_words_times_out_as_ever() -> None:
    demo = {**DEMO, "require_approval": ["delete_everything"], "approval_timeout_seconds": 0.3}
    agents = {"operator": {"plugin": "operator", "mcp_servers": ["demo"]}}
    with live_server(make_config({"agents": agents, "mcp": {"servers": {"demo": demo}}})) as live:
        async with sdk(live) as client:
            transaction = await client.start("operator")
            await client.say(transaction, "/call demo.delete_everything")
            asked = await client.shown()
            timed_out = await client.shown()
            await client.say(transaction, "yes")  # too late: no question is open, so the agent gets it
            to_the_agent = await client.shown()
    assert "needs your approval" in asked["payload"]
    assert timed_out["payload"] == "demo.delete_everything ended CANCELLED: nobody approved the call in time"
    assert to_the_agent["type"] == "MESSAGE" and to_the_agent["payload"].startswith("I only run tools.")
