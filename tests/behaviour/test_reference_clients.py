"""The HAIP TypeScript SDK and CLI, replayed byte for byte (REFERENCE-CLIENTS.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from haip_runtime.protocol.events import TRANSACTION_ERA_EVENTS
from tests.support.raw import raw_peer
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


@pytest.fixture(scope="module")
def pirate_server() -> Iterator[LiveServer]:
    agents = {"pirate": {"plugin": "echo", "options": {"prefix": "Arr! you said: "}}}
    config = make_config({"agents": agents, "session": {"heartbeat_interval_seconds": 0.2}})
    with live_server(config) as live:
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
