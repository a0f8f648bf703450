"""History over REST: a user's transactions and their event logs (PROTOCOL.md section 1).

``GET /haip/transactions?limit=&cursor=`` lists the caller's transactions (started or joined),
most recently active first, each with a ``title``, a ``preview`` and its ``last_activity``;
``GET /haip/transactions/{id}/events?after=&limit=`` pages through one transaction's log in
``tseq`` order; ``GET /haip/transactions/{id}/messages?after=&limit=`` pages through it as
assembled messages (``conversation/transcript.py``). Same bearer credentials as the socket
(``Authorization`` header or ``?token=``); 401 without them, 404 for a transaction the caller may
not see.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from haip_runtime.auth.tokens import Principal
from haip_runtime.conversation.registry import TransactionRegistry
from haip_runtime.conversation.transcript import Transcript, summary
from haip_runtime.exceptions import HandshakeError, RequestRefusedError, StorageError
from haip_runtime.protocol.envelope import Event, parse_uint64
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.store.base import StorageState, Store, TransactionRecord
from haip_runtime.transports.http import http_credentials, http_error_body, http_error_headers, refused_origin

MAX_PAGE = 1000
#: Events a conversation list reads of each transaction: from its start (the title), from its end (the preview).
HEAD_EVENTS, TAIL_EVENTS = 40, 200
#: Events one page of messages reads at most (a page of long streamed answers, with their tool calls).
SCAN_CHUNK, MAX_SCAN = 500, 50_000


def history_routes(
    store: Store,
    transactions: TransactionRegistry,
    authenticate: Callable[[str | None], Awaitable[Principal]],
    allowed_origins: Sequence[str] = (),
) -> list[Route]:
    """The REST routes over ``store``; ``transactions`` knows who may see one, and what is newer in memory.
    A browser page of an origin not in ``allowed_origins`` (nor the server's own) gets 403, as at every door."""

    async def listing(request: Request) -> JSONResponse:
        principal = await _principal(authenticate, request)
        limit = _int_param(request, "limit", 50, 1, MAX_PAGE)
        cursor = _cursor(request.query_params.get("cursor"))
        records = await store.transactions_of(principal.user, limit=limit + 1, before=cursor)
        page = records[:limit]
        body: dict[str, Any] = {"transactions": [await _listed(store, transactions, record) for record in page]}
        body["next_cursor"] = f"{page[-1].updated_at!r}|{page[-1].id}" if len(records) > limit else None
        return JSONResponse(body)

    async def visible(request: Request) -> str:
        principal = await _principal(authenticate, request)
        transaction_id: str = request.path_params["transaction_id"]
        record = await store.transaction(transaction_id)
        if record is None and store.health.state is not StorageState.OK:
            message = f"transaction {transaction_id!r} is not stored: the store cannot write ({store.health.error})"
            raise RequestRefusedError(ErrorCode.STORAGE_UNAVAILABLE, message, status=503)
        if record is None or not transactions.may_see(record.members, principal):
            raise RequestRefusedError(ErrorCode.TRANSACTION_NOT_FOUND, f"no transaction {transaction_id!r}", status=404)
        return transaction_id

    async def events(request: Request) -> JSONResponse:
        transaction_id = await visible(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page = await store.events(transaction_id, after=after, limit=limit)
        next_after = page[-1].tseq if len(page) == limit else None
        return JSONResponse(
            {"transaction": transaction_id, "events": [_event(e) for e in page], "next_after": next_after}
        )

    async def messages(request: Request) -> JSONResponse:
        transaction_id = await visible(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        transcript = Transcript(_int_param(request, "limit", 50, 1, MAX_PAGE))
        cursor, read = after, 0
        while read < MAX_SCAN:
            chunk = await store.events(transaction_id, after=cursor, limit=SCAN_CHUNK)
            for event in chunk:
                transcript.feed(event)
            read += len(chunk)
            if len(chunk) < SCAN_CHUNK or (transcript.next_after is not None and transcript.complete):
                break
            cursor = chunk[-1].tseq or cursor
        next_after = transcript.next_after
        if next_after is None and read >= MAX_SCAN:  # a page of very long messages: go on from here
            next_after = cursor
        body = {"transaction": transaction_id, "messages": transcript.items, "next_after": next_after}
        return JSONResponse(body)

    return [
        Route("/haip/transactions", _answering(listing, allowed_origins)),
        Route("/haip/transactions/{transaction_id}/events", _answering(events, allowed_origins)),
        Route("/haip/transactions/{transaction_id}/messages", _answering(messages, allowed_origins)),
    ]


def _answering(handler: Any, allowed_origins: Sequence[str]) -> Any:
    async def endpoint(request: Request) -> JSONResponse:
        try:
            if refused_origin(request.scope, allowed_origins):
                raise RequestRefusedError(ErrorCode.UNAUTHORIZED, "origin not allowed", status=403)
            response: JSONResponse = await handler(request)
        except RequestRefusedError as refusal:
            headers = http_error_headers(refusal.status)
            return JSONResponse(http_error_body(refusal), status_code=refusal.status, headers=headers)
        except StorageError as error:
            return JSONResponse(http_error_body(error), status_code=503)
        return response

    return endpoint


async def _principal(authenticate: Callable[[str | None], Awaitable[Principal]], request: Request) -> Principal:
    try:
        return await authenticate(http_credentials(request.scope).first(None))
    except HandshakeError as error:
        raise RequestRefusedError(error.code, error.message, status=401) from error


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    number = parse_uint64(raw)  # (ASCII digits, 20 at most: a 5,000-digit one was a 500, past int()'s limit)
    if number is None or not low <= number <= high:
        raise RequestRefusedError(
            ErrorCode.INVALID_PAYLOAD, f"{name} must be a whole number from {low} to {high}", status=400
        )
    return number


def _cursor(raw: str | None) -> tuple[float, str] | None:
    if not raw:
        return None
    stamp, _, transaction_id = raw.partition("|")
    try:
        when = float(stamp)
    except ValueError:
        when = math.nan
    if not math.isfinite(when) or not transaction_id:  # (nan, inf and no id came back as an empty page)
        raise RequestRefusedError(ErrorCode.INVALID_PAYLOAD, "cursor is not one this server gave", status=400)
    return when, transaction_id


async def _listed(store: Store, transactions: TransactionRegistry, record: TransactionRecord) -> dict[str, Any]:
    body = record.public()
    live = transactions.live.get(record.id)
    if live is not None:  # the store's copy is written at turn boundaries; memory is exact
        body["last_tseq"] = live.tseq
    head = await store.events(record.id, limit=HEAD_EVENTS)
    tail = head if len(head) < HEAD_EVENTS else await store.tail(record.id, limit=TAIL_EVENTS)
    body.update(summary(head, tail))
    if body["last_activity"] is None:
        body["last_activity"] = body["updated_at"]
    return body


def _event(event: Event) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event.id,
        "tseq": event.tseq,
        "ts": event.ts,
        "channel": event.channel,
        "type": event.type,
        "payload": event.payload,
    }
    if event.run_id is not None:
        body["run_id"] = event.run_id
    if event.thread_id is not None:
        body["thread_id"] = event.thread_id
    return body
