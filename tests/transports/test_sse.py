"""The SSE transport's POST bodies: one envelope, or a JSON array of them."""

from __future__ import annotations

import json

from haip_runtime.protocol.envelope import Envelope
from haip_runtime.transports.sse import parse_batch

LIMIT = 4096


def envelope_of_size(size: int, seq: str) -> dict[str, object]:
    """A MESSAGE envelope whose compact JSON is ``size`` bytes."""
    head = {"id": f"e{seq}", "session": "", "seq": seq, "ts": "1", "channel": "USER", "type": "MESSAGE"}
    envelope: dict[str, object] = {**head, "transaction": "t", "payload": {"text": ""}}
    padding = size - len(json.dumps(envelope, separators=(",", ":")))
    envelope["payload"] = {"text": "a" * padding}
    return envelope


def test_an_envelope_at_the_limit_is_taken_in_a_batch_as_it_is_alone() -> None:
    """A reviewer's find: each envelope of a batch was measured re-serialised with spaces after every
    comma and colon, so one the client sent compact at the limit was refused in a batch (and alone, or
    over WebSocket, taken)."""
    at_limit = envelope_of_size(LIMIT, "1")
    compact = json.dumps(at_limit, separators=(",", ":")).encode()
    assert len(compact) == LIMIT
    alone = parse_batch(compact, LIMIT)
    batch = parse_batch(b"[" + compact + b"," + json.dumps(envelope_of_size(100, "2")).encode() + b"]", LIMIT)
    assert all(isinstance(each, Envelope) for each in alone + batch)
    assert [each.seq for each in batch if isinstance(each, Envelope)] == ["1", "2"]


def test_an_envelope_past_the_limit_in_a_batch_is_refused_alone() -> None:
    too_large = json.dumps(envelope_of_size(LIMIT + 1, "1"), separators=(",", ":"))
    batch = parse_batch(f"[{too_large},{json.dumps(envelope_of_size(100, '2'))}]".encode(), LIMIT)
    refused, taken = batch
    assert not isinstance(refused, Envelope) and refused.code == "MESSAGE_TOO_LARGE" and refused.seq == "1"
    assert isinstance(taken, Envelope) and taken.seq == "2"
