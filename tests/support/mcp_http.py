"""The 2025-11-25 streamable HTTP transport of MCP spoken by hand (httpx): for tests that choose which
node each request reaches, or whose header a request carries, where an SDK client would hide it."""

from __future__ import annotations

import json
from typing import Any

import httpx2

LEGACY = "2025-11-25"


async def rpc(
    http: httpx2.AsyncClient,
    url: str,
    body: dict[str, Any],
    session: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx2.Response:
    """One JSON-RPC POST of the 2025-11-25 streamable HTTP transport, its whole response read."""
    sent = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": LEGACY, **(headers or {})}
    if session is not None:
        sent["Mcp-Session-Id"] = session
    return await http.post(f"{url}/mcp", json=body, headers=sent)


def answer_of(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC answer in a response (a JSON body, or the last `data:` of an event stream)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return dict(json.loads([item for item in data if item][-1]))
    return dict(response.json())


async def initialized(http: httpx2.AsyncClient, url: str) -> str:
    """A new session at ``url``: its id, once `initialize` is answered and acknowledged."""
    params = {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}
    response = await rpc(http, url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
    assert response.status_code == 200, response.text
    session = response.headers["mcp-session-id"]
    acknowledged = await rpc(http, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert acknowledged.status_code == 202, acknowledged.text
    return session


def echo_call(number: int, message: str) -> dict[str, Any]:
    params = {"name": "echo", "arguments": {"message": message}}
    return {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": params}
