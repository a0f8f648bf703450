"""Fault 7, and the HTTP routes' safety net: every HTTP error is JSON with a code.

Before: an SSE POST of JSON nested 1,000 or 100,000 deep answered a plain-text HTTP 500 (a
``RecursionError``) while WebSocket and streaming answered ``INVALID_MESSAGE``; an unexpected
exception in any route answered a plain-text 500 and was logged twice. Now the first is a JSON 400
``INVALID_MESSAGE`` (and an ERROR on the stream, which goes on); the second a JSON 500
``INTERNAL_ERROR``, logged once with its traceback."""

from __future__ import annotations

import logging
from typing import Any

import httpx2
import pytest

from haip_runtime.client import HaipClient
from tests.support.peers import open_peer
from tests.support.serving import LiveServer

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_fault_7_sse_post_nested_deep_is_a_json_invalid_message(depth: int, stored: LiveServer) -> None:
    token = stored.token("deep")
    async with open_peer("sse", stored, token) as peer:
        await peer.receive()
        await peer.hai(token)
        await peer.receive_type("INFO")
        answer = await peer.post("[" * depth + "]" * depth)
        error = await peer.receive_type("ERROR")
        await peer.send("PING", {"nonce": "still here"})
        pong = await peer.receive_type("PONG")
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "INVALID_MESSAGE" and answer.json()["error"]["detail"]["where"] == "body"
    assert error["payload"]["code"] == "INVALID_MESSAGE" and pong["payload"]["nonce"] == "still here"


async def test_an_unexpected_exception_in_a_route_is_a_json_500_logged_once(
    stored: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(stored.runtime.store, "transactions_of", broken)
    async with httpx2.AsyncClient() as http:
        with caplog.at_level(logging.ERROR):
            answer = await http.get(
                f"{stored.http_url}/haip/transactions", headers={"authorization": f"Bearer {stored.token()}"}
            )
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": {"code": "INTERNAL_ERROR", "message": "internal error; see the server log"}}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug in the store" in str(tracebacks[0].exc_info[1])  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/haip/transactions", {"limit": "9" * 5000}),  # past int()'s 4,300 digits: was a 500
        ("/haip/transactions", {"limit": "２"}),  # a fullwidth digit: was taken
        ("/haip/transactions", {"cursor": "nan|x"}),  # a cursor no server gives: was an empty page
        ("/haip/transactions", {"cursor": "-inf|"}),
        ("/haip/transactions", {"cursor": "1|"}),
        ("/haip/transactions/{tx}/events", {"after": "9" * 5000}),
        ("/haip/transactions/{tx}/messages", {"limit": "9" * 5000}),
    ],
)
async def test_rest_parameters_no_server_gives_are_a_400(stored: LiveServer, path: str, params: dict[str, str]) -> None:
    """A prober's finds."""
    async with HaipClient(stored.ws_url, token=stored.token()) as client:
        tx = await client.start_transaction("echo")
    async with httpx2.AsyncClient() as http:
        answer = await http.get(
            f"{stored.http_url}{path.format(tx=tx)}",
            params=params,
            headers={"authorization": f"Bearer {stored.token()}"},
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "INVALID_PAYLOAD"
