"""Connection and handshake over a real uvicorn (PROTOCOL.md section 3)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from haip_runtime.client import ClientError, HaipClient
from haip_runtime.protocol.events import ALL_EVENTS
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio


async def test_server_sends_hai_at_once_with_its_session_id(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        hai = await peer.receive()
    assert hai["type"] == "HAI" and hai["seq"] == "1" and hai["transaction"] is None and hai["channel"] == "SYSTEM"
    assert hai["payload"]["haip_version"] == "1.1.2" and hai["payload"]["accept_major"] == [1]
    assert "MESSAGE_START" in hai["payload"]["accept_events"]
    assert hai["payload"]["capabilities"]["max_concurrent_runs"] == 4
    assert hai["payload"]["capabilities"]["max_frame_bytes"] == 1024 * 1024
    assert len(hai["session"]) == 36


async def test_token_in_hai_payload_authenticates(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        hai = await peer.receive()
        await peer.hai(server.token("alice"))
        ready = await peer.receive_type("INFO")
    epoch = ready["payload"].pop("epoch")
    assert ready["payload"] == {"event": "session.ready", "user": "alice", "resumed": False}
    assert epoch == server.runtime.hub.epoch
    assert ready["session"] == hai["session"] and ready["seq"] == "2" and ready["ack"] == "1"


@pytest.mark.parametrize("where", ["header", "subprotocol", "query"])
async def test_token_outside_the_payload_authenticates(server: LiveServer, where: str) -> None:
    token = server.token("bob")
    url, kwargs = server.ws_url, dict[str, Any]()
    if where == "header":
        kwargs = {"additional_headers": {"Authorization": f"Bearer {token}"}}
    elif where == "subprotocol":
        kwargs = {"subprotocols": ["haip", f"token.{token}"]}
    else:
        url += f"?token={token}"
    async with raw_peer(url, **kwargs) as peer:
        await peer.hai(None)
        ready = await peer.receive_type("INFO")
        if where == "subprotocol":
            assert peer.ws.subprotocol == "haip"
    assert ready["payload"]["user"] == "bob"


async def test_header_credentials_win_over_the_hai_payload(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {server.token('carol')}"}
    async with raw_peer(server.ws_url, additional_headers=headers) as peer:
        await peer.hai("not-a-token")
        ready = await peer.receive_type("INFO")
    assert ready["payload"]["user"] == "carol"


@pytest.mark.parametrize(
    "token",
    ["garbage", "Bearer", ""],
    ids=["garbage", "empty-bearer", "missing"],
)
async def test_wrong_token_gets_authentication_failed_and_close_1008(server: LiveServer, token: str) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(token or None)
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED"
    assert code == 1008


async def test_token_signed_with_another_key_is_refused(server: LiveServer) -> None:
    import jwt

    forged = jwt.encode({"sub": "mallory", "exp": 2_000_000_000}, "x" * 48, algorithm="HS256")
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(forged)
        error = await peer.receive_type("ERROR")
        assert await peer.closed() == 1008
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED"


async def test_expired_token_is_refused(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token("alice", exp=1_000_000_000))
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED" and "expired" in error["payload"]["message"]


async def test_first_frame_not_hai_gets_handshake_required(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        sent = await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        error = await peer.receive_type("ERROR")
        assert await peer.closed() == 1008
    assert error["payload"]["code"] == "HANDSHAKE_REQUIRED" and error["payload"]["related_id"] == sent


async def test_unsupported_major_gets_version_incompatible_and_close_1002(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token(), accept_major=[2])
        error = await peer.receive_type("ERROR")
        assert await peer.closed() == 1002
    assert error["payload"]["code"] == "VERSION_INCOMPATIBLE"
    assert error["payload"]["message"] == "this runtime speaks HAIP major 1; the client accepts 2"  # not (1,)


@pytest.mark.parametrize("major", [True, 1.0])
async def test_a_major_version_that_is_not_an_integer_is_refused(server: LiveServer, major: object) -> None:
    """A hostile probe's find: ``accept_major: [true]`` and ``[1.0]`` passed for 1."""
    async with raw_peer(server.ws_url) as peer:
        await peer.receive()
        await peer.hai(server.token(), accept_major=[major])
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "INVALID_PAYLOAD"
    assert error["payload"]["message"].startswith("invalid HAI payload at /payload/accept_major/0")


async def test_version_is_checked_before_credentials(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai("garbage", accept_major=[9])
        error = await peer.receive_type("ERROR")
    assert error["payload"]["code"] == "VERSION_INCOMPATIBLE"


async def test_garbage_before_handshake_is_invalid_message_and_closes(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.send_frame("{not json")
        error = await peer.receive_type("ERROR")
        assert await peer.closed() == 1008
    assert error["payload"]["code"] == "INVALID_MESSAGE"


@pytest.mark.parametrize(
    ("frame", "code", "where"),
    [
        ("{not json", "INVALID_MESSAGE", "frame"),
        ("[1, 2]", "INVALID_MESSAGE", "/"),
        (
            json.dumps({"id": "x", "session": "", "seq": "9", "ts": "1", "channel": "USER", "payload": {}}),
            "INVALID_MESSAGE",
            "/type",
        ),
        (
            json.dumps(
                {
                    "id": "x",
                    "session": "",
                    "seq": "9",
                    "ts": "1",
                    "channel": "bad channel!",
                    "type": "PING",
                    "payload": {},
                }
            ),
            "INVALID_MESSAGE",
            "/channel",
        ),
        (
            json.dumps(
                {
                    "id": "x",
                    "session": "",
                    "seq": "9",
                    "ts": "1",
                    "channel": "USER",
                    "type": "PING",
                    "payload": {},
                    "crit": True,
                    "mystery": 1,
                }
            ),
            "UNSUPPORTED_TYPE",
            "/mystery",
        ),
    ],
    ids=["not-json", "not-object", "no-type", "bad-channel", "critical-unknown-field"],
)
async def test_bad_frame_after_handshake_is_answered_and_the_connection_lives(
    server: LiveServer, frame: str, code: str, where: str
) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        await peer.send_frame(frame)
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "still-here"})
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == code and error["payload"]["detail"]["where"] == where
    assert pong["payload"] == {"nonce": "still-here"}


async def test_unknown_type_is_unsupported_and_the_connection_lives(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        sent = await peer.send("TELEPORT", {})
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "n"})
        await peer.receive_type("PONG")
    assert error["payload"]["code"] == "UNSUPPORTED_TYPE" and error["payload"]["related_id"] == sent


async def test_frame_over_the_limit_is_message_too_large(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        await peer.send("PING", {"nonce": "x" * (1024 * 1024)})
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "small"})
        await peer.receive_type("PONG")
    assert error["payload"]["code"] == "MESSAGE_TOO_LARGE"


async def test_a_refused_frame_keeps_its_place_in_a_numbered_clients_seqs(server: LiveServer) -> None:
    """A tester's find: an envelope refused as too large, invalid or critical was never counted, so a
    numbered client got a REPLAY_REQUEST for it, its acks stayed behind, and a SEQ_VIOLATION 5 s later."""
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        big = await peer.send("PING", {"nonce": "x" * (2 * 1024 * 1024)})  # past 1 MiB + 1 KiB: uvicorn's old cap
        too_large = await peer.receive_type("ERROR")
        peer.seq += 1  # a PING with no channel and no payload: not an envelope
        await peer.send_frame(json.dumps({"id": "odd", "session": "", "seq": str(peer.seq), "ts": "1", "type": "PING"}))
        invalid = await peer.receive_type("ERROR")
        last = await peer.send("PING", {"nonce": "small"})
        pong = await peer.receive_type("PONG")
    assert too_large["payload"]["code"] == "MESSAGE_TOO_LARGE" and too_large["payload"]["related_id"] == big
    assert too_large["ack"] == "2"  # the HAI, then the frame refused
    assert invalid["payload"]["code"] == "INVALID_MESSAGE" and invalid["payload"]["related_id"] == "odd"
    assert invalid["ack"] == "3"
    assert pong["ack"] == "4" and pong["payload"]["nonce"] == "small", last


async def test_an_unreadable_frame_then_a_refused_one_with_a_seq_leave_no_gap(server: LiveServer) -> None:
    """A front-end developer's find: "not json" (its seq unread), then a frame too large (its seq read), then a
    good one: the runtime asked for the unreadable one's seq and held the good one for 5 s."""
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        peer.seq += 1  # seq 2, never readable
        await peer.send_frame("not json")
        unreadable = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "x" * (2 * 1024 * 1024)})  # seq 3, read from the frame it is in
        too_large = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "small"})  # seq 4: nothing before it is missing
        answer = await peer.receive(timeout=2)  # (held past a gap, it would wait 5 s behind a REPLAY_REQUEST)
    assert unreadable["payload"]["code"] == "INVALID_MESSAGE" and too_large["payload"]["code"] == "MESSAGE_TOO_LARGE"
    assert answer["type"] == "PONG" and answer["ack"] == "4" and too_large["ack"] == "3"


async def test_a_refused_frame_with_an_absurd_seq_costs_only_itself(server: LiveServer) -> None:
    """A reviewer's find: a seq of 5,000 digits made ``int()`` raise outside the error handling, and the
    connection closed (1000); and a refused frame must not move the client's numbering far ahead."""
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        for seq in ("0" * 4999 + "2", str(2**64 - 1), str(10**9)):
            await peer.send_frame(json.dumps({"id": "odd", "session": "", "seq": seq, "ts": "1", "type": "PING"}))
            refused = await peer.receive_type("ERROR")
            assert refused["payload"]["code"] == "INVALID_MESSAGE" and refused["ack"] == "1"
        await peer.send("PING", {"nonce": "still here"})  # seq 2: counted as the next one
        pong = await peer.receive_type("PONG")
    assert pong["payload"]["nonce"] == "still here" and pong["ack"] == "2"


async def test_a_frame_past_four_times_the_limit_closes_the_websocket_with_1009(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        with contextlib.suppress(ConnectionClosed):  # the close may come while the frame is still going out
            await peer.send("PING", {"nonce": "x" * (4 * 1024 * 1024 + 2048)})
        closed = await peer.closed()
    assert closed == 1009


async def test_frames_sent_before_authentication_are_processed_in_order_after_it(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.send("PING", {"nonce": "first"})
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref-1")
        await peer.send("PING", {"nonce": "second"})
        seen = [await peer.receive() for _ in range(6)]
    kinds = [(e["type"], e["payload"].get("nonce") or e["payload"].get("event")) for e in seen]
    assert kinds == [
        ("HAI", None),
        ("INFO", "session.ready"),
        ("PONG", "first"),
        ("TRANSACTION_START", None),
        ("TOOL_LIST", None),
        ("PONG", "second"),
    ]


async def test_numbered_client_is_acked_and_duplicates_are_dropped(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        await peer.send("PING", {"nonce": "a"})
        peer.seq -= 1  # resend seq 2: a duplicate
        await peer.send("PING", {"nonce": "duplicate"})
        await peer.send("PING", {"nonce": "b"})
        first, second = await peer.receive_type("PONG"), await peer.receive_type("PONG")
    assert (first["payload"]["nonce"], first["ack"]) == ("a", "2")
    assert (second["payload"]["nonce"], second["ack"]) == ("b", "3")


async def test_client_library_reports_a_refused_handshake_with_its_code(server: LiveServer) -> None:
    with pytest.raises(ClientError) as caught:
        async with HaipClient(server.ws_url, token="nope"):
            pass
    assert caught.value.code == "AUTHENTICATION_FAILED"


async def test_authentication_failures_are_answered_the_same_every_time(server: LiveServer) -> None:
    answers = []
    for _ in range(20):
        async with raw_peer(server.bare_url) as peer:
            await peer.hai("Bearer TOKEN")
            error = await peer.receive_type("ERROR")
            answers.append((error["payload"]["code"], await peer.closed()))
    assert answers == [("AUTHENTICATION_FAILED", 1008)] * 20


async def test_resume_resends_what_was_missed_while_away(server: LiveServer) -> None:
    token = server.token("rosa")
    everything: dict[str, Any] = {"accept_events": list(ALL_EVENTS)}
    async with raw_peer(server.ws_url) as first:
        hai = await first.receive()
        await first.hai(token, **everything)
        await first.receive_type("INFO")
        await first.send("TRANSACTION_START", {"toolName": "storyteller"}, transaction="ref")
        started = await first.receive_type("TRANSACTION_START")
        await first.send("MESSAGE", "a long story", transaction=started["transaction"], channel="USER")
        last_seen = await first.receive_type("RUN_STARTED")
    # The socket is gone; the turn goes on. Resume on a new connection from what was last seen.
    async with raw_peer(server.ws_url) as second:
        await second.receive()  # the new connection's own HAI
        await second.hai(token, session=hai["session"], last_rx_seq=last_seen["seq"], **everything)
        resent: list[dict[str, Any]] = []
        while {"RUN_FINISHED", "INFO"} - {e["type"] for e in resent}:
            resent.append(await second.receive())
    assert {e["session"] for e in resent} == {hai["session"]}
    seqs = [int(e["seq"]) for e in resent]
    assert seqs == list(range(int(last_seen["seq"]) + 1, int(last_seen["seq"]) + 1 + len(seqs)))
    story = "".join(e["payload"]["text"] for e in resent if e["type"] == "MESSAGE_PART")
    assert story.startswith("Once upon a time, someone said 'a long story'.") and story.endswith("The end.")
    ready = [e["payload"] for e in resent if e["type"] == "INFO"]
    assert ready == [{"event": "session.ready", "user": "rosa", "resumed": True, "epoch": server.runtime.hub.epoch}]


async def test_resume_of_an_unknown_session_starts_a_fresh_one(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        hai = await peer.receive()
        await peer.hai(server.token("rosa"), session="not-a-session", last_rx_seq="5")
        error = await peer.receive_type("ERROR")
        ready = await peer.receive_type("INFO")
    assert error["payload"]["code"] == "RESUME_FAILED"
    assert ready["payload"]["resumed"] is False and ready["session"] == hai["session"]


async def test_someone_else_cannot_resume_a_session(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as owner:
        hai = await owner.receive()
        await owner.hai(server.token("rosa"))
        await owner.receive_type("INFO")
    async with raw_peer(server.ws_url) as thief:
        await thief.receive()
        await thief.hai(server.token("mallory"), session=hai["session"], last_rx_seq="1")
        error = await thief.receive_type("ERROR")
    assert error["payload"]["code"] == "RESUME_FAILED"


async def test_gap_in_client_seqs_is_acked_contiguously_and_replay_is_requested(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.hai(server.token())
        await peer.receive_type("INFO")
        await peer.send("PING", {"nonce": "two"})
        peer.seq += 1  # seq 3 is "lost" on the way
        await peer.send("PING", {"nonce": "four"})
        pongs = [await peer.receive_type("PONG"), await peer.receive_type("PONG")]
        request = await peer.receive_type("REPLAY_REQUEST")
        peer.seq = 2
        await peer.send("PING", {"nonce": "three"})  # the replay
        late = await peer.receive_type("PONG")
        await peer.send("PING", {"nonce": "three again"})  # seq 4 again: a duplicate, dropped
        peer.seq = 4
        await peer.send("PING", {"nonce": "five"})
        last = await peer.receive_type("PONG")
    assert [(p["payload"]["nonce"], p["ack"]) for p in pongs] == [("two", "2"), ("four", "2")]
    assert request["payload"] == {"from_seq": "3", "to_seq": "3"}
    assert (late["payload"]["nonce"], late["ack"]) == ("three", "4")
    assert (last["payload"]["nonce"], last["ack"]) == ("five", "5")


async def test_credit_is_topped_up_per_channel_as_the_client_uses_it() -> None:
    config = make_config({"flow_control": {"initial_credit_messages": 4}})
    with live_server(config) as live:
        async with raw_peer(live.ws_url) as peer:
            hai = await peer.receive()
            await peer.hai(live.token())
            await peer.receive_type("INFO")
            sizes = []
            for nonce in ("a", "b"):
                sizes.append(len(await _sent_size(peer, nonce)))
            grant = await peer.receive_type("FLOW_UPDATE")
    assert hai["payload"]["capabilities"]["flow_control"] == {
        "initial_credit_messages": 4,
        "initial_credit_bytes": 16 * 1024 * 1024,
    }
    assert grant["payload"] == {"channel": "SYSTEM", "add_messages": 2, "add_bytes": sum(sizes)}


async def _sent_size(peer: RawPeer, nonce: str) -> str:
    peer.seq += 1
    frame = json.dumps(
        {
            "id": nonce,
            "session": "",
            "seq": str(peer.seq),
            "ts": "1",
            "channel": "SYSTEM",
            "type": "INFO",  # counted; PING and PONG are not (a client must always be able to answer)
            "payload": {"nonce": nonce},
        }
    )
    await peer.send_frame(frame)
    return frame
