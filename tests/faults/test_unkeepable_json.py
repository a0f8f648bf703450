"""Faults 1 and 2: a lone surrogate escape or an over-long integer in a frame.

Before: the surrogate was accepted, killed the store's writer (history stopped for everyone) and
could not be sent on; a 5,000-digit integer raised an uncaught ``ValueError`` that ended the
connection. Now both are refused where envelopes are decoded, on every transport, with
``ERROR INVALID_MESSAGE``; the connection, the session and the store go on."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx2
import pytest

from haip_runtime.session import liveness
from tests.support.peers import KINDS, open_peer
from tests.support.serving import LiveServer

pytestmark = pytest.mark.anyio
every_transport = pytest.mark.parametrize("kind", KINDS)

SURROGATE = '"\\ud800"'
LONG_INT = "9" * 5000


def frame(seq: int, type: str, payload: str, transaction: str | None = None) -> str:
    """An envelope written by hand, so the payload can hold what ``json.dumps`` would not write."""
    head = {"id": f"f{seq}", "session": "", "transaction": transaction, "seq": str(seq), "ts": "1", "channel": "USER"}
    return json.dumps(head)[:-1] + f',"type":"{type}","payload":{payload}}}'


async def open_echo(peer: Any, token: str) -> str:
    await peer.receive()
    await peer.hai(token)
    await peer.receive_type("INFO")
    await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
    return str((await peer.receive_type("TRANSACTION_START"))["transaction"])


async def stored_texts(live: LiveServer, user: str, tx: str) -> list[Any]:
    async with httpx2.AsyncClient() as http:
        answer = await http.get(
            f"{live.http_url}/haip/transactions/{tx}/events", headers={"authorization": f"Bearer {live.token(user)}"}
        )
    assert answer.status_code == 200, answer.text
    events = answer.json()["events"]
    return [event["payload"]["text"] for event in events if event["type"] in ("MESSAGE", "MESSAGE_PART")]


@every_transport
@pytest.mark.parametrize(
    ("bad", "type"),
    [
        ('{"text": ' + SURROGATE + "}", "MESSAGE"),
        ('{"nonce": ' + SURROGATE + "}", "PING"),
        ('{"text": "x", "n": ' + LONG_INT + "}", "MESSAGE"),
    ],
    ids=["surrogate-message", "surrogate-ping-nonce", "long-integer"],
)
async def test_fault_1_2_unkeepable_json_is_refused_and_nothing_else_is_lost(
    kind: str,
    bad: str,
    type: str,
    stored: LiveServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its seq cannot be read. On WebSocket and HTTP streaming the next envelope's seq says it was the
    # one before (frames come in order), so that one is acted on at once; over SSE (POSTs may overtake
    # each other) it stays a gap, given up on after its deadline (shortened here), and what follows waits.
    monkeypatch.setattr(liveness, "GAP_GRACE_SECONDS", 0.01)
    monkeypatch.setattr(liveness, "GAP_GIVE_UP_SECONDS", 0.05)
    user = f"u-{kind}"
    async with open_peer(kind, stored, stored.token(user)) as peer:
        tx = await open_echo(peer, stored.token(user))
        peer.seq += 1
        with caplog.at_level(logging.INFO):
            await peer.send_frame(frame(peer.seq, type, bad, tx))
            error = await peer.receive_type("ERROR")
        await peer.send("MESSAGE", "after the bad frame", transaction=tx, channel="USER")
        frames = [await peer.receive()]
        while frames[-1]["type"] != "MESSAGE":
            frames.append(await peer.receive())
        reply = frames[-1]
    gaps = [f["payload"]["code"] for f in frames if f["type"] == "ERROR"]
    assert gaps == (["SEQ_VIOLATION"] if kind == "sse" else [])
    assert error["payload"]["code"] == "INVALID_MESSAGE" and error["payload"]["detail"]["where"] in ("frame", "body")
    assert reply["payload"] == "you said: after the bad frame"  # the connection and the session went on
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    assert len([r for r in caplog.records if "refused a frame" in r.getMessage()]) == 1
    assert (await stored_texts(stored, user, tx))[-2:] == ["after the bad frame", "you said: after the bad frame"]


@pytest.mark.parametrize("bad", [SURROGATE, LONG_INT], ids=["surrogate", "long-integer"])
async def test_fault_2_unkeepable_json_in_last_rx_seq_before_authentication(bad: str, stored: LiveServer) -> None:
    async with open_peer("websocket", stored, stored.token()) as peer:
        await peer.receive()
        body = '{"haip_version":"1.1.2","accept_major":[1],"last_rx_seq":' + bad + "}"
        await peer.send_frame(frame(1, "HAI", body))
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "INVALID_MESSAGE" and code == 1008  # the first frame must be a HAI


async def test_fault_2_sse_post_of_a_long_integer_is_a_json_400(stored: LiveServer) -> None:
    async with open_peer("sse", stored, stored.token("sse-int")) as peer:
        await open_echo(peer, stored.token("sse-int"))
        answer = await peer.post("[" + frame(9, "PING", '{"nonce": "a"}') + "," + LONG_INT + "]")
        error = await peer.receive_type("ERROR")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_MESSAGE"
    assert error["payload"]["code"] == "INVALID_MESSAGE"
