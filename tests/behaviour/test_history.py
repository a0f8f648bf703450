"""Conversations you can find again over REST: the list's titles and previews, and a conversation
read back as assembled messages, paged, with the same credentials and refusals as the event log."""

from __future__ import annotations

import httpx2
import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import LiveServer

pytestmark = pytest.mark.anyio


async def a_story(server: LiveServer, user: str, subject: str) -> str:
    async with HaipClient(server.ws_url, token=server.token(user)) as client:
        tx = await client.start_transaction("storyteller")
        await client.send_text(tx, subject)
        await client.wait_for(lambda e: e.type == "RUN_FINISHED" and e.transaction == tx)
        return tx


async def test_the_list_has_a_title_a_preview_and_the_last_activity(server: LiveServer) -> None:
    first = await a_story(server, "lena", "a red kite")
    second = await a_story(server, "lena", "a very long subject " * 10)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {server.token('lena')}"}) as http:
        listed = (await http.get(f"{server.http_url}/haip/transactions")).json()["transactions"]
    assert [t["id"] for t in listed] == [second, first]
    newest, older = listed
    assert older["title"] == "a red kite" and older["agents"] == ["storyteller"]
    assert older["preview"].startswith("Once upon a time, someone said 'a red kite'.")
    assert newest["title"].startswith("a very long subject a very") and newest["title"].endswith("…")
    assert len(newest["title"]) == 80
    assert newest["last_activity"] >= older["last_activity"] >= older["created_at"]


async def test_messages_come_assembled_and_paged(server: LiveServer) -> None:
    tx = await a_story(server, "milo", "a lantern")
    url = f"{server.http_url}/haip/transactions/{tx}/messages"
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {server.token('milo')}"}) as http:
        whole = (await http.get(url)).json()
        first = (await http.get(url, params={"limit": 1})).json()
        rest = (await http.get(url, params={"after": first["next_after"]})).json()
        bad = await http.get(url, params={"after": "-1"})
    question, answer = whole["messages"]
    assert (question["role"], question["author"], question["text"]) == ("user", "milo", "a lantern")
    assert (answer["role"], answer["author"], answer["state"]) == ("agent", "storyteller", "complete")
    assert answer["text"] == (
        "Once upon a time, someone said 'a lantern'. "
        "The words travelled far, and everyone who heard 'a lantern' smiled. The end."
    )
    assert whole["next_after"] is None and answer["time"] >= question["time"]
    assert first["messages"] == [question] and rest["messages"] == [answer] and rest["next_after"] is None
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_PAYLOAD"


async def test_messages_are_refused_as_the_event_log_is(server: LiveServer) -> None:
    tx = await a_story(server, "nina", "a boat")
    url = f"{server.http_url}/haip/transactions/{tx}/messages"
    async with httpx2.AsyncClient() as http:
        anonymous = await http.get(url)
        other = await http.get(url, headers={"Authorization": f"Bearer {server.token('oscar')}"})
        by_query = await http.get(url, params={"token": server.token("nina")})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert other.status_code == 404 and other.json()["error"]["code"] == "TRANSACTION_NOT_FOUND"
    assert by_query.status_code == 200 and len(by_query.json()["messages"]) == 2


async def test_a_conversation_is_listed_with_its_answer_as_soon_as_the_run_ends(server: LiveServer) -> None:
    async with HaipClient(server.ws_url, token=server.token("pia")) as client:
        tx = await client.start_transaction("echo")
        await client.send_text(tx, "ping")
        await client.wait_for("RUN_FINISHED")
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {server.token('pia')}"}) as http:
            listed = (await http.get(f"{server.http_url}/haip/transactions")).json()["transactions"]
            messages = (await http.get(f"{server.http_url}/haip/transactions/{tx}/messages")).json()
    assert listed[0]["title"] == "ping" and listed[0]["preview"] == "you said: ping"
    assert [m["text"] for m in messages["messages"]] == ["ping", "you said: ping"]


async def test_a_path_or_method_the_runtime_does_not_serve_is_refused_in_json_too(server: LiveServer) -> None:
    """A hostile probe's find: these two were Starlette's plain text, where every HTTP error of the runtime
    is ``{"error": {code, message}}`` (PROTOCOL.md section 1)."""
    async with httpx2.AsyncClient(base_url=server.http_url) as http:
        no_path = await http.get("/haip/transactions/some-id")
        no_method = await http.post("/haip/transactions")
        no_upgrade = await http.get("/haip/websocket")  # (a re-tester's find: it said 404)
    assert no_path.status_code == 404 and no_path.json()["error"]["code"] == "NOT_FOUND"
    assert no_method.status_code == 405 and no_method.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert set(no_method.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert no_upgrade.status_code == 426 and no_upgrade.headers["upgrade"] == "websocket"
    assert "takes a WebSocket" in no_upgrade.json()["error"]["message"]
