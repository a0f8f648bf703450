"""One behaviour suite over every transport (WebSocket, SSE, HTTP streaming) against a real uvicorn:
handshake and its failures, a conversation, tool progress, errors, resume."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx2
import pytest

from haip_runtime.protocol.events import ALL_EVENTS
from haip_runtime.server.app import Runtime
from haip_runtime.transports.stream import LineSplitter
from tests.support.peers import KINDS, InProcess, SsePeer, StreamPeer, open_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio
every_transport = pytest.mark.parametrize("kind", KINDS)
every_transport_and_memory = pytest.mark.parametrize("kind", [*KINDS, "memory"])

DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}
EVERYTHING: dict[str, Any] = {"accept_events": list(ALL_EVENTS)}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    agents = {"echo": {"plugin": "echo"}, "operator": {"plugin": "operator", "mcp_servers": ["demo"]}}
    with live_server(make_config({"agents": agents, "mcp": {"servers": {"demo": DEMO}}})) as server:
        yield server


@pytest.fixture
async def server(kind: str, live: LiveServer) -> AsyncIterator[LiveServer | InProcess]:
    """The uvicorn for a network transport; for ``memory`` a runtime in this test's event loop."""
    if kind != "memory":
        yield live
        return
    async with Runtime(make_config({"agents": {"echo": {"plugin": "echo"}}})) as runtime:
        yield InProcess(runtime)


async def handshake(peer: Any, token: str, **payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    hai = await peer.receive()
    await peer.hai(token, **payload)
    return hai, await peer.receive_type("INFO")


@every_transport_and_memory
async def test_handshake_gives_the_server_hai_then_session_ready(kind: str, server: LiveServer | InProcess) -> None:
    async with open_peer(kind, server, server.token("ann")) as peer:
        hai, ready = await handshake(peer, server.token("ann"))
    assert hai["type"] == "HAI" and hai["seq"] == "1" and hai["session"]
    assert hai["payload"]["capabilities"]["binary_frames"] is (kind in ("websocket", "memory"))
    assert ready["payload"]["event"] == "session.ready" and ready["payload"]["user"] == "ann"
    assert ready["session"] == hai["session"] and ready["seq"] == "2"


@every_transport_and_memory
async def test_first_message_not_hai_is_refused_and_the_connection_closed(
    kind: str, server: LiveServer | InProcess
) -> None:
    async with open_peer(kind, server, server.token()) as peer:
        await peer.receive()
        sent = await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "HANDSHAKE_REQUIRED" and error["payload"]["related_id"] == sent
    assert code == (None if kind == "stream" else 1008)  # NDJSON has no close code: the response ends


@every_transport_and_memory
async def test_unsupported_major_gets_version_incompatible(kind: str, server: LiveServer | InProcess) -> None:
    async with open_peer(kind, server, server.token()) as peer:
        await peer.receive()
        await peer.hai(server.token(), accept_major=[2])
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "VERSION_INCOMPATIBLE"
    assert code == (None if kind == "stream" else 1002)


@every_transport_and_memory
async def test_a_bad_token_is_refused(kind: str, server: LiveServer | InProcess) -> None:
    async with open_peer(kind, server, "not-a-token") as peer:
        if isinstance(peer, SsePeer):
            assert peer.status == 401  # the stream needs credentials before it opens
            return
        await peer.receive()
        await peer.hai("not-a-token")
        error = await peer.receive_type("ERROR")
        await peer.closed()
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED"


@every_transport_and_memory
async def test_a_conversation_with_the_echo_agent(kind: str, server: LiveServer | InProcess) -> None:
    async with open_peer(kind, server, server.token()) as peer:
        await handshake(peer, server.token())
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
        await peer.send("MESSAGE", "hello there", transaction=started["transaction"], channel="USER")
        reply = await peer.receive_type("MESSAGE")
    assert started["payload"]["referenceId"] == "ref"
    assert reply["payload"] == "you said: hello there" and reply["transaction"] == started["transaction"]


@every_transport
async def test_tool_progress_reaches_the_client(kind: str, live: LiveServer) -> None:
    async with open_peer(kind, live, live.token()) as peer:
        await handshake(peer, live.token(), **EVERYTHING)
        await peer.send("TRANSACTION_START", {"toolName": "operator"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        while "demo.slow_count" not in {t["name"] for t in (await peer.receive_type("TOOL_LIST"))["payload"]["tools"]}:
            pass
        command = '/call demo.slow_count {"steps": 3, "delay": 0.05}'
        await peer.send("MESSAGE", {"text": command}, transaction=tx, channel="USER")
        updates = []
        while (envelope := await peer.receive(timeout=15))["type"] != "TOOL_DONE":
            if envelope["type"] == "TOOL_UPDATE" and "progress" in envelope["payload"]:
                updates.append(envelope["payload"]["progress"])
    assert updates and updates == sorted(updates) and updates[-1] == 3
    assert envelope["payload"]["status"] == "OK"


@every_transport_and_memory
async def test_bad_input_costs_only_itself(kind: str, server: LiveServer | InProcess) -> None:
    async with open_peer(kind, server, server.token()) as peer:
        await handshake(peer, server.token())
        await peer.send_frame("{not json")
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "still-here"})
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == "INVALID_MESSAGE"
    assert pong["payload"] == {"nonce": "still-here"}


@every_transport_and_memory
async def test_resume_with_last_rx_seq_resends_what_was_missed(kind: str, server: LiveServer | InProcess) -> None:
    token = server.token()
    async with open_peer(kind, server, token) as peer:
        hai, _ = await handshake(peer, token)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
    async with open_peer(kind, server, token) as again:
        await again.receive()
        again.seq = peer.seq  # a numbered client goes on counting across connections
        await again.hai(token, session=hai["session"], last_rx_seq="2")
        replayed = await again.receive()
        if isinstance(again, SsePeer):
            again.session = hai["session"]
        await again.receive_type("INFO")
        await again.send("MESSAGE", "after resume", transaction=started["transaction"], channel="USER")
        reply = await again.receive_type("MESSAGE")
    assert replayed["seq"] == "3" and replayed["session"] == hai["session"]
    assert reply["payload"] == "you said: after resume" and reply["session"] == hai["session"]


async def test_sse_last_event_id_resumes_without_a_hai(live: LiveServer) -> None:
    kind = "sse"
    token = live.token()
    async with open_peer(kind, live, token) as peer:
        hai, _ = await handshake(peer, token)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
    params = {"session": hai["session"]}
    async with open_peer(kind, live, token, params=params, headers={"last-event-id": "2"}) as again:
        again.seq = peer.seq
        replayed = await again.receive()
        ready = await again.receive_type("INFO")
        await again.send("MESSAGE", "resumed by id", transaction=started["transaction"], channel="USER")
        reply = await again.receive_type("MESSAGE")
    assert (replayed["seq"], replayed["type"]) == ("3", "TRANSACTION_START")
    assert ready["payload"]["resumed"] is True
    assert reply["payload"] == "you said: resumed by id"


async def test_sse_last_event_id_names_its_session_so_the_same_url_resumes(live: LiveServer) -> None:
    token = live.token("ann")
    async with open_peer("sse", live, token) as peer:
        await handshake(peer, token)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
        last = peer.last_event_id
    assert isinstance(peer, SsePeer) and last is not None and last.rpartition(":")[0] == peer.session
    async with open_peer("sse", live, token, headers={"last-event-id": last}) as again:  # no ?session=
        again.seq = peer.seq
        ready = await again.receive_type("INFO")
        await again.send("MESSAGE", "same URL", transaction=started["transaction"], channel="USER")
        reply = await again.receive_type("MESSAGE")
    assert ready["payload"]["resumed"] is True and ready["session"] == peer.session
    assert reply["payload"] == "you said: same URL" and again.last_event_id == f"{peer.session}:{reply['seq']}"


async def test_sse_last_event_id_with_a_seq_that_is_not_one_is_a_failed_resume_not_a_silent_new_session(
    live: LiveServer,
) -> None:
    """A hostile probe's find: `<session>:abc` (or `:-1`, or past 2^64) quietly opened a fresh session,
    where `<session>:999999` says RESUME_FAILED; and a re-tester's: so did `:5` and `x` (no session)."""
    token = live.token("ann")
    async with open_peer("sse", live, token) as peer:
        await handshake(peer, token)
    assert isinstance(peer, SsePeer)
    failed = []
    for last in (f"{peer.session}:abc", f"{peer.session}:-1", f"{peer.session}:18446744073709551616", ":5", "x"):
        async with open_peer("sse", live, token, headers={"last-event-id": last}) as again:
            hai = await again.receive_type("HAI")
            failed.append((hai["session"] != peer.session, (await again.receive_type("ERROR"))["payload"]["code"]))
    assert failed == [(True, "RESUME_FAILED")] * 5


async def test_an_sse_stream_whose_resume_failed_takes_no_post_for_the_old_session(live: LiveServer) -> None:
    """A tester's find (a phone after the server restarted): the EventSource reconnected with the old
    session's Last-Event-ID, the resume failed, and a message POSTed to the old session got 202, became
    the new session's first frame (HANDSHAKE_REQUIRED) and closed the stream 1008, for good. It is now
    404 RESUME_FAILED, as the guide says, and the new session's HAI goes on as usual."""
    token = live.token("ann")
    old = "0f4c0ffe-dead-4bad-8bad-000000000000"  # a session this runtime never had (as after a restart)
    async with open_peer("sse", live, token, headers={"last-event-id": f"{old}:7"}) as again:
        assert isinstance(again, SsePeer)
        hai = await again.receive_type("HAI")
        failed = await again.receive_type("ERROR")
        message = (
            '{"id":"m1","session":"' + old + '","seq":"8","ts":"1","channel":"USER","type":"MESSAGE","payload":"hi"}'
        )
        refused = await again.post(message, session=old)
        await again.hai(token)
        await again.receive_type("INFO")
        await again.send("PING", {"nonce": "still open"})
        pong = await again.receive_type("PONG")
    assert hai["session"] != old and failed["payload"]["code"] == "RESUME_FAILED"
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "RESUME_FAILED"
    assert pong["payload"]["nonce"] == "still open"


def _sse_frame(peer: SsePeer, type: str, payload: object, session: str, transaction: str | None = None) -> str:
    peer.seq += 1
    envelope = {"id": f"x{peer.seq}-{type}", "session": session, "transaction": transaction, "seq": str(peer.seq)}
    return json.dumps({**envelope, "ts": "1", "channel": "USER", "type": type, "payload": payload})


async def test_sse_posts_after_a_resume_by_hai_go_to_either_session_id(live: LiveServer) -> None:
    """A reviewer's find, in the first version of the fix above: a stream taking POSTs only for the session
    it writes refused (404) what the guide says to do after resuming by HAI over a fresh stream: POST to the
    stream's first session, or, what no ack covered, to the resumed one at once (before its first frame)."""
    token = live.token("ann")
    async with open_peer("sse", live, token) as peer:
        hai, _ = await handshake(peer, token)
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        started = await peer.receive_type("TRANSACTION_START")
    old, answers = hai["session"], []
    async with open_peer("sse", live, token) as again:
        fresh = await again.receive()  # the new stream's server HAI: a fresh session
        assert isinstance(again, SsePeer) and fresh["session"] != old
        again.seq = peer.seq
        await again.hai(token, session=old, last_rx_seq="2")  # POSTed to the fresh session's id
        answers.append((await again.post(_sse_frame(again, "PING", {"nonce": "n"}, old), session=old)).status_code)
        ready = await again.receive_type("INFO")
        message = _sse_frame(again, "MESSAGE", "after the resume", old, started["transaction"])
        answers.append((await again.post(message, session=fresh["session"])).status_code)
        reply = await again.receive_type("MESSAGE")
    assert ready["session"] == old and answers == [202, 202] and reply["payload"] == "you said: after the resume"


async def test_sse_posts_are_bound_to_the_streams_user(live: LiveServer) -> None:
    async with open_peer("sse", live, live.token("ann")) as peer:
        await handshake(peer, live.token("ann"))
        assert isinstance(peer, SsePeer)
        other = await peer.post('{"id":"x"}', token=live.token("bob"))
        unknown = await peer.post('{"id":"x"}', session="no-such-session")
        garbage = await peer.post("{not json")
        unauthenticated = await peer.post('{"id":"x"}', token="bad")
        batch = await peer.post(
            '[{"id":"p1","session":"","seq":"2","ts":"1","channel":"SYSTEM","type":"PING","payload":{"nonce":"a"}},'
            '{"id":"p2","session":"","seq":"3","ts":"1","channel":"SYSTEM","type":"PING","payload":{"nonce":"b"}}]'
        )
        pongs = [(await peer.receive_type("PONG"))["payload"]["nonce"] for _ in range(2)]
    assert other.status_code == unknown.status_code == 404
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "INVALID_MESSAGE"
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert unknown.json()["error"]["code"] == other.json()["error"]["code"] == "RESUME_FAILED"  # one shape everywhere
    assert batch.status_code == 202 and batch.json() == {"accepted": 2} and pongs == ["a", "b"]


async def test_an_sse_post_of_too_many_envelopes_says_to_send_them_again_and_their_seqs_stay_free(
    live: LiveServer,
) -> None:
    """A front-end tester: a refused batch left its seqs a gap every later envelope waited 5 s for, and the
    413 did not say what to do. Sent again in smaller requests with the same seqs, nothing waits."""
    async with open_peer("sse", live, live.token("ann")) as peer:
        await handshake(peer, live.token("ann"))  # (seqs 1 and 2 are taken)
        assert isinstance(peer, SsePeer)

        def ping(seq: int) -> str:
            return json.dumps(
                {
                    "id": f"p{seq}",
                    "session": "",
                    "seq": str(seq),
                    "ts": "1",
                    "channel": "SYSTEM",
                    "type": "PING",
                    "payload": {"nonce": str(seq)},
                }
            )

        pings = [ping(seq) for seq in range(3, 3 + 65)]
        refused = await peer.post("[" + ",".join(pings) + "]")
        halves = [await peer.post("[" + ",".join(part) + "]") for part in (pings[:40], pings[40:])]
        with anyio.fail_after(3):  # (a gap would hold them 5 s)
            nonces = [(await peer.receive_type("PONG"))["payload"]["nonce"] for _ in range(65)]
    assert (
        refused.status_code == 413
        and "send them again in smaller requests, with the same seqs" in (refused.json()["error"]["message"])
    )
    assert [half.status_code for half in halves] == [202, 202] and nonces == [str(seq) for seq in range(3, 68)]


async def test_stream_lines_split_across_chunks_and_a_closed_body_still_gets_its_answer(live: LiveServer) -> None:
    async with open_peer("stream", live, live.token()) as peer:
        assert isinstance(peer, StreamPeer)
        await handshake(peer, live.token())
        await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref")
        tx = (await peer.receive_type("TRANSACTION_START"))["transaction"]
        line = (
            '{"id":"m1","session":"","seq":"3","ts":"1","channel":"USER","type":"MESSAGE",'
            f'"transaction":"{tx}","payload":"split in three"}}\n'
        ).encode()
        for piece in (line[:10], line[10:50], line[50:]):
            await peer.send_chunk(piece)
        await peer.end_body()  # the client has said all it will say
        reply = await peer.receive_type("MESSAGE")
    assert reply["payload"] == "you said: split in three"


async def test_http_transports_refuse_a_foreign_origin(live: LiveServer) -> None:
    foreign = {"origin": "https://elsewhere.example", "authorization": f"Bearer {live.token()}"}
    async with httpx2.AsyncClient(base_url=live.http_url) as client:
        sse = await client.get("/haip/sse", headers=foreign)
        post = await client.post("/haip/sse/any", headers=foreign, content="{}")
        stream = await client.post("/haip/stream", headers=foreign, content="")
    assert sse.status_code == post.status_code == stream.status_code == 403


async def test_sse_stream_is_unbuffered_and_kept_alive(live: LiveServer) -> None:
    async with (
        httpx2.AsyncClient(base_url=live.http_url, timeout=None) as client,
        client.stream("GET", "/haip/sse", params={"token": live.token()}) as response,
    ):
        lines = response.aiter_lines()
        first = [await anext(lines) for _ in range(2)]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert "gzip" not in response.headers.get("content-encoding", "")
    session = json.loads(first[1].removeprefix("data: "))["session"]
    assert first[0] == f"id: {session}:1" and first[1].startswith('data: {"id":')  # EventSource resumes with it


def test_ndjson_lines_are_put_back_together_and_an_overlong_line_is_skipped_to_its_end() -> None:
    envelope = b'{"id":"a","session":"","seq":"1","ts":"1","channel":"SYSTEM","type":"PING","payload":{}}'
    lines = LineSplitter(max_line_bytes=len(envelope))
    items = lines.feed(envelope[:7]) + lines.feed(envelope[7:] + b"\n\n  \n")
    items += lines.feed(b"x" * (len(envelope) + 1)) + lines.feed(b"more of it\n" + envelope + b"\n")
    items += lines.feed(b"{not json\n")
    assert [getattr(item, "id", None) or item.code.value for item in items] == [  # type: ignore[union-attr]
        "a",
        "MESSAGE_TOO_LARGE",
        "a",
        "INVALID_MESSAGE",
    ]
