"""The last line of every HTTP route (``JsonFailsafe``), driven through the ASGI interface itself."""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import pytest

from haip_runtime.server.failsafe import JsonFailsafe

pytestmark = pytest.mark.anyio

SCOPE = {"type": "http", "method": "POST", "path": "/mcp", "headers": []}


async def call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await JsonFailsafe(app)(SCOPE, receive, send)
    return sent


async def test_an_exception_before_any_answer_is_a_json_500_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    sent = await call(broken)
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["code"] == "INTERNAL_ERROR"
    [record] = [r for r in caplog.records if r.name == "haip_runtime.server.failsafe"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_an_exception_after_the_whole_answer_is_one_warning_and_no_second_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An integrator's find: the MCP SDK, answering a notification of a client that had just closed its
    session, tried to answer it again: uvicorn refused, and each normal cancel logged an ERROR traceback."""

    async def answered_then_broken(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        raise RuntimeError("Unexpected ASGI message 'http.response.start' sent, after response already completed.")

    sent = await call(answered_then_broken)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    [record] = [r for r in caplog.records if r.name == "haip_runtime.server.failsafe"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage().startswith("POST /mcp: an error after its response was sent: RuntimeError")
