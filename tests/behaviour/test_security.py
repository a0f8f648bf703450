"""Attacks on a real server, each refused with the right error and nothing else harmed.

Tokens (forged, expired, not yet valid, wrong issuer or audience, `alg: none`, HS256 signed with
the RS256 public key, JWKS key rotation, expiry mid-session), sessions (another user's id in a
resume), roles, hostile frames (oversized, deeply nested, malformed), floods and quotas, and
browser origins.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from haip_runtime.client import HaipClient
from tests.support.jwks_server import JwksServer, jwk_of, serve_jwks
from tests.support.raw import RawPeer, raw_peer
from tests.support.serving import LiveServer, live_server, make_config

pytestmark = pytest.mark.anyio

SECRET = "s" * 40
ISSUER, AUDIENCE = "https://id.example", "haip"


def claims(**changes: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, "iss": ISSUER, "aud": AUDIENCE, **changes}


@pytest.fixture(scope="module")
def jwt_server() -> Iterator[LiveServer]:
    auth = {"mode": "jwt", "secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE, "leeway_seconds": 0}
    with live_server(make_config({"auth": auth})) as live:
        yield live


async def refused(url: str, token: str) -> tuple[dict[str, Any], int | None]:
    async with raw_peer(url) as peer:
        await peer.hai(token)
        error = await peer.receive_type("ERROR")
        return error["payload"], await peer.closed()


async def ready_user(peer: RawPeer, token: str) -> dict[str, Any]:
    await peer.hai(token)
    return await peer.receive_type("INFO")


def unsigned(body: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body)}."


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (jwt.encode(claims(), "x" * 40, algorithm="HS256"), "invalid token"),
        (jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"), "token expired"),
        (jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"), "token not yet valid"),
        (jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"), "not meant for this server"),
        (jwt.encode(claims(aud="other"), SECRET, algorithm="HS256"), "not meant for this server"),
        (unsigned(claims()), "invalid token"),
        (jwt.encode(claims(), SECRET * 2, algorithm="HS512"), "invalid token"),
    ],
    ids=["forged", "expired", "not-yet-valid", "wrong-issuer", "wrong-audience", "alg-none", "unpinned-alg"],
)
async def test_bad_tokens_are_refused_and_the_server_serves_on(jwt_server: LiveServer, token: str, reason: str) -> None:
    error, code = await refused(jwt_server.ws_url, token)
    assert error["code"] == "AUTHENTICATION_FAILED" and error["message"].endswith(reason) and code == 1008
    assert "alice" not in error["message"]
    async with raw_peer(jwt_server.ws_url) as peer:
        ready = await ready_user(peer, jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert ready["payload"]["user"] == "alice"


async def test_authentication_failures_are_logged_without_the_token(
    jwt_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = jwt.encode(claims(), "x" * 40, algorithm="HS256")
    await refused(jwt_server.ws_url, token)
    lines = [record.getMessage() for record in caplog.records if record.name == "haip_runtime.auth.tokens"]
    assert "authentication failed: invalid token" in lines
    assert not any(token in record.getMessage() for record in caplog.records)


# --- public keys ----------------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hs256_with_key(body: dict[str, Any], key: bytes) -> str:
    """HS256 signed with ``key`` by hand (PyJWT itself refuses to use a PEM as an HMAC secret)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = f"{part(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{part(json.dumps(body).encode())}"
    return f"{signing}.{part(hmac.new(key, signing.encode(), hashlib.sha256).digest())}"


async def test_rs256_server_accepts_its_key_and_refuses_hs256_signed_with_the_public_key(tmp_path: Path) -> None:
    key = rsa_key()
    pem_file = tmp_path / "public.pem"
    pem_file.write_bytes(public_pem(key))
    auth = {"mode": "jwt", "algorithms": ["RS256"], "public_key_file": str(pem_file)}
    with live_server(make_config({"auth": auth})) as live:
        body = {"sub": "alice", "exp": int(time.time()) + 600}
        async with raw_peer(live.ws_url) as peer:
            ready = await ready_user(peer, jwt.encode(body, key, algorithm="RS256"))
        error, code = await refused(live.ws_url, hs256_with_key(body, public_pem(key)))
    assert ready["payload"]["user"] == "alice"
    assert error["code"] == "AUTHENTICATION_FAILED" and error["message"].endswith("invalid token") and code == 1008


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


async def test_jwks_key_rotation_is_followed_and_retired_keys_are_refused(jwks: JwksServer) -> None:
    old, new = rsa_key(), rsa_key()
    jwks.keys = [jwk_of(old, "old")]
    auth = {"mode": "jwt", "algorithms": ["RS256"], "jwks_url": jwks.url, "jwks_min_refetch_seconds": 0}
    with live_server(make_config({"auth": auth})) as live:
        body = {"sub": "alice", "exp": int(time.time()) + 600}
        async with raw_peer(live.ws_url) as peer:
            before = await ready_user(peer, jwt.encode(body, old, algorithm="RS256", headers={"kid": "old"}))
        jwks.keys = [jwk_of(new, "new")]  # the identity provider rotates
        async with raw_peer(live.ws_url) as peer:
            after = await ready_user(peer, jwt.encode(body, new, algorithm="RS256", headers={"kid": "new"}))
        error, code = await refused(live.ws_url, jwt.encode(body, old, algorithm="RS256", headers={"kid": "old"}))
    assert before["payload"]["user"] == after["payload"]["user"] == "alice"
    assert error["code"] == "AUTHENTICATION_FAILED" and "no signing key with kid 'old'" in error["message"]
    assert code == 1008 and jwks.requests == 3  # first fetch, then one per unknown kid


async def test_an_unreachable_jwks_url_is_a_clear_refusal(jwks: JwksServer) -> None:
    key = rsa_key()
    jwks.stop()
    auth = {"mode": "jwt", "algorithms": ["RS256"], "jwks_url": jwks.url}
    with live_server(make_config({"auth": auth})) as live:
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, key, algorithm="RS256")
        error, code = await refused(live.ws_url, token)
    assert error["code"] == "AUTHENTICATION_FAILED" and "signing keys unavailable" in error["message"]
    assert code == 1008


async def test_health_is_degraded_while_the_jwks_cannot_be_fetched_and_ok_once_it_can(jwks: JwksServer) -> None:
    """An operator's wish: /health said "ok" while nobody could log in (the JWKS unreachable)."""
    key = rsa_key()
    jwks.keys = [jwk_of(key, "k1")]
    auth = {"mode": "jwt", "algorithms": ["RS256"], "jwks_url": jwks.url, "jwks_min_refetch_seconds": 0}
    body = {"sub": "alice", "exp": int(time.time()) + 600}
    with live_server(make_config({"auth": auth})) as live:
        jwks.failing = True
        await refused(live.ws_url, jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"}))
        down = live.runtime.health()
        jwks.failing = False
        async with raw_peer(live.ws_url) as peer:
            await ready_user(peer, jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"}))
        up = live.runtime.health()
    assert down["status"] == "degraded" and down["degraded"]["auth"].startswith(
        f"cannot fetch auth.jwks_url: {jwks.url}"
    )
    assert down["degraded"]["auth"].endswith("(no keys: every token is refused)")
    assert up["status"] == "ok" and "degraded" not in up


async def test_a_token_that_expires_mid_session_ends_the_connection_until_a_fresh_one_resumes_it(
    jwt_server: LiveServer,
) -> None:
    token = jwt.encode(claims(exp=int(time.time()) + 2), SECRET, algorithm="HS256")
    async with raw_peer(jwt_server.ws_url) as peer:
        first = await ready_user(peer, token)
        error = await peer.receive_type("ERROR", timeout=10)
        code = await peer.closed()
    fresh = jwt.encode(claims(), SECRET, algorithm="HS256")
    async with raw_peer(jwt_server.ws_url) as peer:
        await peer.hai(fresh, session=first["session"], last_rx_seq=first["seq"])
        resumed = await peer.receive_type("INFO")
        await peer.send("PING", {"nonce": "still-here"})
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == "AUTHENTICATION_FAILED" and "token expired" in error["payload"]["message"]
    assert code == 1008 and resumed["payload"]["resumed"] is True and pong["payload"]["nonce"] == "still-here"


# --- sessions and roles ---------------------------------------------------------------------------


async def test_another_users_session_id_does_not_resume_it(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token("alice")) as alice:
        tx = await alice.start_transaction("echo")
        async with raw_peer(server.ws_url) as mallory:
            await mallory.hai(server.token("mallory"), session=alice.session_id or "", last_rx_seq="1")
            error = await mallory.receive_type("ERROR")
            ready = await mallory.receive_type("INFO")
        await alice.send_text(tx, "still mine")
        echoed = await alice.wait_for("MESSAGE_PART")
    assert error["payload"]["code"] == "RESUME_FAILED" and ready["payload"]["resumed"] is False
    assert ready["session"] != alice.session_id and echoed.get("text") == "you said: still mine"


async def test_an_agent_outside_the_role_is_unauthorized() -> None:
    config = make_config({"roles": {"user": {"agents": ["echo"]}}})
    with live_server(config) as live:
        async with raw_peer(live.ws_url) as peer:
            await ready_user(peer, live.token("bob"))
            sent = await peer.send("TRANSACTION_START", {"toolName": "storyteller"}, transaction="ref-1")
            error = await peer.receive_type("ERROR")
            await peer.send("PING", {"nonce": "alive"})
            pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == "UNAUTHORIZED" and error["payload"]["related_id"] in (sent, "ref-1")
    assert pong["payload"]["nonce"] == "alive"


async def test_an_event_type_outside_the_role_is_unauthorized_and_costs_only_itself() -> None:
    config = make_config({"roles": {"viewer": {"events": ["TOOL_LIST"]}}, "auth": {"default_roles": ["viewer"]}})
    with live_server(config) as live:
        async with raw_peer(live.ws_url) as peer:
            await ready_user(peer, live.token("vic"))
            sent = await peer.send("TRANSACTION_START", {"toolName": "echo"}, transaction="ref-2")
            error = await peer.receive_type("ERROR")
            await peer.send("TOOL_LIST", {})
            listing = await peer.receive_type("TOOL_LIST")
    assert error["payload"]["code"] == "UNAUTHORIZED" and error["payload"]["related_id"] == sent
    assert "you may not send TRANSACTION_START" in error["payload"]["message"]
    assert [tool["name"] for tool in listing["payload"]["tools"]] == ["echo", "storyteller"]


DEMO = {"transport": "stdio", "command": sys.executable, "args": ["-m", "haip_runtime.demo.mcp_server"]}


async def test_tools_outside_the_role_call_ids_and_in_flight_calls() -> None:
    config = make_config(
        {
            "agents": {"operator": {"plugin": "operator", "mcp_servers": ["demo"]}},
            "mcp": {"servers": {"demo": DEMO}},
            "roles": {"user": {"tools": ["demo.add", "demo.sleep"]}},
            "limits": {"tool_calls_per_session": 2},
        }
    )
    with live_server(config) as live:
        async with (
            HaipClient(live.ws_url, token=live.token("bob"), timeout=20) as bob,
            HaipClient(live.ws_url, token=live.token("eve"), timeout=20) as eve,
        ):
            bob_tx, eve_tx = await bob.start_transaction("operator"), await eve.start_transaction("operator")
            await bob.wait_for(lambda e: e.type == "TOOL_LIST" and len(e.get("tools")) == 2)
            sent = await bob.send("TOOL_CALL", {"tool": "demo.fail", "params": {}}, transaction=bob_tx)
            outside = await bob.wait_for("ERROR")
            for call_id in ("c1", "c2", "c3"):
                params = {"seconds": 5}
                await bob.send(
                    "TOOL_CALL", {"tool": "demo.sleep", "call_id": call_id, "params": params}, transaction=bob_tx
                )
            limited = await bob.wait_for(lambda e: e.type == "ERROR" and e.get("code") == "RATE_LIMITED")
            # Eve uses Bob's call id in her own transaction: it is hers to use, and tells her nothing.
            await eve.send(
                "TOOL_CALL", {"tool": "demo.add", "call_id": "c1", "params": {"a": 1, "b": 2}}, transaction=eve_tx
            )
            done = await eve.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "c1")
            await eve.send("TOOL_CANCEL", {"call_id": "c2"}, transaction=eve_tx)
            not_hers = await eve.wait_for("ERROR")
            # Eve tries to steer the MCP side: the server, command, URL and headers are the config's alone.
            steer = {
                "tool": "demo.add",
                "call_id": "steer",
                "server": "evil",
                "command": "/bin/sh",
                "url": "http://127.0.0.1:1/mcp",
                "headers": {"Authorization": "Bearer stolen"},
                "params": {"a": 2, "b": 2},
            }
            await eve.send("TOOL_CALL", steer, transaction=eve_tx)
            steered_call = await eve.wait_for(lambda e: e.type == "TOOL_CALL" and e.get("call_id") == "steer")
            steered = await eve.wait_for(lambda e: e.type == "TOOL_DONE" and e.get("call_id") == "steer")
            unknown = await eve.send("TOOL_CALL", {"tool": "evil.add", "params": {}}, transaction=eve_tx)
            no_server = await eve.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == unknown)
            # Bob tries to join Eve's transaction: it does not exist for him, and Eve goes on.
            joined = await bob.send("TRANSACTION_JOIN", {}, transaction=eve_tx)
            no_join = await bob.wait_for(lambda e: e.type == "ERROR" and e.get("related_id") == joined)
    assert outside.get("code") == "UNAUTHORIZED" and outside.get("related_id") == sent
    assert steered_call.get("server") == "demo" and "command" not in steered_call.payload
    assert steered.get("status") == "OK" and steered.get("result")["structuredContent"] == {"result": 4.0}
    assert no_server.get("code") == "UNAUTHORIZED" and no_join.get("code") == "TRANSACTION_NOT_FOUND"
    assert limited.get("detail") == {"limit": "limits.tool_calls_per_session"}
    assert done.get("status") == "OK" and done.transaction == eve_tx
    assert not_hers.get("code") == "INVALID_PAYLOAD" and "no call 'c2'" in not_hers.get("message")


# --- hostile frames -------------------------------------------------------------------------------


def nested(depth: int) -> str:
    envelope = {"id": "deep", "session": "", "seq": "2", "ts": "1", "channel": "USER", "type": "PING"}
    return json.dumps(envelope)[:-1] + ', "payload": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_deeply_nested_json_is_invalid_message_and_the_connection_lives(server: LiveServer, depth: int) -> None:
    async with raw_peer(server.ws_url) as peer:
        await ready_user(peer, server.token())
        await peer.send_frame(nested(depth))
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "alive"})
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == "INVALID_MESSAGE" and "nested deeper" in error["payload"]["message"]
    assert pong["payload"]["nonce"] == "alive"


async def test_deeply_nested_json_before_the_handshake_is_refused(server: LiveServer) -> None:
    async with raw_peer(server.ws_url) as peer:
        await peer.send_frame(nested(5000))
        error = await peer.receive_type("ERROR")
        code = await peer.closed()
    assert error["payload"]["code"] == "INVALID_MESSAGE" and code == 1008


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "INVALID_MESSAGE"),
        ("[]", "INVALID_MESSAGE"),
        ('"text"', "INVALID_MESSAGE"),
        (b"\x00\xff", "BINARY_FRAME_ERROR"),
    ],
    ids=["not-json", "array", "string", "binary"],
)
async def test_malformed_frames_cost_only_themselves(server: LiveServer, frame: str | bytes, code: str) -> None:
    async with raw_peer(server.ws_url) as peer:
        await ready_user(peer, server.token())
        await peer.send_frame(frame)
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "alive"})
        pong = await peer.receive_type("PONG")
    assert error["payload"]["code"] == code and pong["payload"]["nonce"] == "alive"


async def test_a_frame_far_over_the_limit_closes_with_1009(server: LiveServer) -> None:
    """Past four times ``server.max_frame_bytes`` a frame is not read at all (up to that, it is answered
    ``MESSAGE_TOO_LARGE`` and the connection stays: tests/session/test_handshake.py)."""
    async with raw_peer(server.ws_url, max_size=None) as peer:
        await ready_user(peer, server.token())
        with contextlib.suppress(ConnectionClosed):  # the close may come while the frame is still going out
            await peer.send_frame('{"pad": "' + "x" * (5 * 1024 * 1024) + '"}')
        code = await peer.closed()
    assert code == 1009


# --- floods and quotas ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight() -> Iterator[LiveServer]:
    limits = {
        "messages_per_second": 0.01,
        "message_burst": 5,
        "sessions_per_user": 2,
        "transactions_per_user": 2,
        "members_per_transaction": 1,
    }
    with live_server(make_config({"limits": limits})) as live:
        yield live


async def test_a_flood_gets_rate_limited_and_the_connection_lives(tight: LiveServer) -> None:
    async with raw_peer(tight.ws_url) as peer:
        await ready_user(peer, tight.token("flooder"))
        for number in range(20):
            await peer.send("PING", {"nonce": str(number)})
        answers = [await peer.receive() for _ in range(20)]
        kinds = [(a["type"], a["payload"].get("code")) for a in answers if a["type"] in ("PONG", "ERROR")]
    # The burst (5) is answered; the rest is refused one by one, and nothing closes.
    assert kinds == [("PONG", None)] * 5 + [("ERROR", "RATE_LIMITED")] * 15
    assert answers[-1]["payload"]["detail"] == {"limit": "limits.messages_per_second"}


async def test_sessions_per_user_are_bounded_and_other_users_unaffected(tight: LiveServer) -> None:
    token = tight.token("many")
    async with raw_peer(tight.ws_url) as first, raw_peer(tight.ws_url) as second:
        await ready_user(first, token)
        await ready_user(second, token)
        async with raw_peer(tight.ws_url) as third:
            await third.hai(token)
            error = await third.receive_type("ERROR")
            code = await third.closed()
        async with raw_peer(tight.ws_url) as other_user:
            other = await ready_user(other_user, tight.token("someone-else"))
        await first.send("PING", {"nonce": "alive"})
        pong = await first.receive_type("PONG")
    assert error["payload"]["code"] == "RATE_LIMITED" and code == 1008
    assert other["payload"]["user"] == "someone-else" and pong["payload"]["nonce"] == "alive"


async def test_transactions_and_members_are_bounded(tight: LiveServer) -> None:
    async with HaipClient(tight.ws_url, token=tight.token("owner")) as owner:
        first = await owner.start_transaction("echo")
        await owner.start_transaction("echo")
        sent = await owner.send("TRANSACTION_START", {"toolName": "echo"}, transaction="third")
        too_many = await owner.wait_for("ERROR")
        async with HaipClient(tight.ws_url, token=tight.token("owner")) as second_session:
            await second_session.send("TRANSACTION_JOIN", {}, transaction=first)
            full = await second_session.wait_for("ERROR")
    assert too_many.get("code") == "RATE_LIMITED" and too_many.get("related_id") == sent
    assert too_many.get("detail") == {"limit": "limits.transactions_per_user"}
    assert full.get("code") == "RATE_LIMITED" and full.get("detail") == {"limit": "limits.members_per_transaction"}


# --- browser origins ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    with live_server(make_config({"server": {"allowed_origins": ["https://app.example"]}})) as live:
        yield live


@pytest.mark.parametrize("origin", [None, "https://app.example", "same"], ids=["no-origin", "listed", "same-origin"])
async def test_allowed_origins_connect(guarded: LiveServer, origin: str | None) -> None:
    headers = {} if origin is None else {"Origin": f"http://127.0.0.1:{guarded.port}" if origin == "same" else origin}
    async with raw_peer(guarded.ws_url, additional_headers=headers) as peer:
        ready = await ready_user(peer, guarded.token())
    assert ready["payload"]["user"] == "alice"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.evil.example"])
async def test_a_browser_origin_not_on_the_list_is_refused_at_the_upgrade(guarded: LiveServer, origin: str) -> None:
    with pytest.raises(InvalidStatus) as refused_upgrade:
        async with raw_peer(guarded.ws_url, additional_headers={"Origin": origin}):
            pass
    assert refused_upgrade.value.response.status_code == 403


async def test_the_rest_history_refuses_a_page_of_an_origin_not_on_the_list(guarded: LiveServer) -> None:
    """A reviewer's find: the docs said every HTTP door refuses an unlisted origin; the REST history did not."""
    import httpx2

    headers = {"authorization": f"Bearer {guarded.token()}"}
    async with httpx2.AsyncClient(base_url=guarded.http_url) as client:
        refused = await client.get("/haip/transactions", headers={**headers, "origin": "https://evil.example"})
        listed = await client.get("/haip/transactions", headers={**headers, "origin": "https://app.example"})
        plain = await client.get("/haip/transactions", headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "UNAUTHORIZED"
    assert listed.status_code == plain.status_code == 200
    assert listed.headers["access-control-allow-origin"] == "https://app.example"
