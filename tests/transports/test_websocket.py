"""The WebSocket transport's own work: two-frame input put back together, and where its credentials come from.

The transport end to end (a real uvicorn) is in ``tests/behaviour/``.
"""

from __future__ import annotations

import json

from starlette.websockets import WebSocket

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.transports.websocket import _Reassembler, websocket_credentials


def text(type: str, **extra: object) -> dict[str, object]:
    body = {"id": "a1", "session": "", "seq": "1", "ts": "1", "channel": "AUDIO_IN", "type": type, "payload": {}}
    return {"type": "websocket.receive", "text": json.dumps({**body, **extra})}


def binary(data: bytes) -> dict[str, object]:
    return {"type": "websocket.receive", "bytes": data}


def test_an_envelope_announcing_bin_len_waits_for_its_binary_frame() -> None:
    frames = _Reassembler(max_frame_bytes=1024)
    assert frames.feed(text("AUDIO", bin_len=3, bin_mime="audio/raw")) == []
    [envelope] = frames.feed(binary(b"abc"))
    assert isinstance(envelope, Envelope) and envelope.binary == b"abc"


def test_a_pair_that_does_not_match_is_dropped_with_binary_frame_error() -> None:
    frames = _Reassembler(max_frame_bytes=1024)
    frames.feed(text("AUDIO", bin_len=3))
    [short] = frames.feed(binary(b"ab"))
    [unannounced] = frames.feed(binary(b"x"))
    frames.feed(text("AUDIO", bin_len=3))
    interrupted, plain = frames.feed(text("PING"))
    assert isinstance(short, DecodeError) and isinstance(unannounced, DecodeError)
    assert isinstance(interrupted, DecodeError)
    assert {short.code, unannounced.code, interrupted.code} == {"BINARY_FRAME_ERROR"}
    assert short.related_id == interrupted.related_id == "a1" and unannounced.related_id is None
    assert isinstance(plain, Envelope) and plain.type == "PING"


def test_credentials_come_from_the_header_the_subprotocol_and_the_query() -> None:
    scope = {
        "type": "websocket",
        "path": "/haip/websocket",
        "headers": [(b"authorization", b"Bearer from-header")],
        "query_string": b"token=from-query",
        "subprotocols": ["haip", "token.from-subprotocol"],
    }

    async def never() -> dict[str, object]:
        raise AssertionError("not read")

    async def ignore(message: object) -> None:
        raise AssertionError("not written")

    credentials = websocket_credentials(WebSocket(scope, never, ignore))
    assert (credentials.authorization, credentials.subprotocol_token, credentials.query_token) == (
        "Bearer from-header",
        "from-subprotocol",
        "from-query",
    )
    assert credentials.first("from-hai") == "from-header"
