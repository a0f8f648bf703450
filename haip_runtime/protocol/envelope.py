"""The HAIP envelope: the validated inbound model and the outbound ``Event``.

Inbound bytes become an ``Envelope`` only in ``codec.decode``. Outbound, the runtime builds an
``Event`` once (its payload JSON is encoded once, however many members receive it), the
transaction that publishes it stamps its ``transaction``, ``tseq`` and ``thread_id`` in place,
and each session adds its own ``session``, ``seq`` and ``ack`` when it sends it.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from haip_runtime.exceptions import ProtocolError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.events import Channel, ErrorCode

CHANNEL_PATTERN = r"^[A-Za-z0-9_\-]{1,128}$"


#: Ids of events, runs and messages come from a generator of their own, seeded from the OS (and
#: again in a forked child): a quarter of what ``uuid.uuid4()`` costs, which was 7 % of the server's
#: time under load. Not for secrets: session ids and the epoch use ``secret_id``.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_getrandbits = _ids.getrandbits
#: Keeps every bit but the version nibble (4) and the variant bits (10) of a UUID.
_UUID4_KEEP = 0xFFFFFFFF_FFFF_0FFF_3FFF_FFFFFFFFFFFF
_UUID4_SET = 0x00000000_0000_4000_8000_000000000000


def new_id() -> str:
    """A random RFC 4122 version 4 UUID, as text."""
    h = "%032x" % (_getrandbits(128) & _UUID4_KEEP | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def secret_id() -> str:
    """A version 4 UUID from the OS's random source, for ids that must not be guessable."""
    return str(uuid.uuid4())


def now_ms() -> str:
    return str(time.time_ns() // 1_000_000)


class Envelope(BaseModel):
    """One inbound envelope, after the tolerant conversions of PROTOCOL.md section 2."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1, max_length=128)
    session: str = Field(max_length=128)
    transaction: str | None = Field(default=None, max_length=128)
    seq: str = Field(min_length=1, max_length=32)
    ack: str | None = Field(default=None, max_length=32)
    ts: str = Field(max_length=32)
    channel: str = Field(pattern=CHANNEL_PATTERN)
    type: str = Field(min_length=1, max_length=64)
    payload: dict[str, Any] | str
    run_id: str | None = Field(default=None, max_length=128)
    thread_id: str | None = Field(default=None, max_length=128)
    pv: int | None = None
    crit: bool = False
    bin_len: int | None = Field(default=None, ge=0)
    bin_mime: str | None = Field(default=None, max_length=128)
    #: Bytes of the frame it came in (set by the codec; counts against flow-control credit).
    _size: int = PrivateAttr(default=0)
    #: The binary frame that followed this envelope in two-frame mode (set by the transport).
    _binary: bytes | None = PrivateAttr(default=None)

    @field_validator("transaction", mode="before")
    @classmethod
    def _null_string_is_null(cls, value: object) -> object:
        # Reference clients send the string "null" for "no transaction".
        return None if value in ("null", "") else value

    @field_validator("seq", "ack", "ts", mode="before")
    @classmethod
    def _numbers_as_strings(cls, value: object) -> object:
        # Decimal strings on the wire; accept JSON integers from lenient clients.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @property
    def numeric_seq(self) -> int | None:
        """``seq`` as an integer if it is a decimal UInt64, else ``None``."""
        return parse_uint64(self.seq)

    @property
    def size(self) -> int:
        return self._size

    @property
    def binary(self) -> bytes | None:
        return self._binary

    def attach_binary(self, data: bytes) -> None:
        self._binary = data

    @property
    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    @property
    def payload_dict(self) -> dict[str, Any]:
        """The payload as an object; a bare-string payload reads as ``{"text": ...}``."""
        return {"text": self.payload} if isinstance(self.payload, str) else self.payload


def parse_uint64(value: str | None) -> int | None:
    # (20 digits at most: 2**64 has 20, and ``int`` refuses strings past 4,300 digits with a ValueError.)
    if value is None or len(value) > 20 or not value.isdecimal() or not value.isascii():
        return None
    number = int(value)
    return number if number < 2**64 else None


@dataclass(slots=True, eq=False)
class Event:
    """An outbound event before a session stamps it. Built once, fanned out to every member.

    The transaction that publishes it sets ``transaction``, ``tseq`` and ``thread_id`` (``stamp``)
    before anyone else sees it; after that it is never changed: derived forms are copies
    (``with_changes``).
    """

    type: str
    payload: dict[str, Any] | str
    channel: str = Channel.SYSTEM
    transaction: str | None = None
    run_id: str | None = None
    thread_id: str | None = None
    id: str = field(default_factory=new_id)
    ts: str = field(default_factory=now_ms)
    #: The transaction-log sequence, set once the event is recorded in a transaction's log.
    tseq: int | None = None
    #: Session ids that must not receive this event (the author of a forwarded user message).
    exclude: frozenset[str] = frozenset()
    #: Two-frame mode (PROTOCOL.md section 9): the length and type of the binary frame that follows.
    bin_len: int | None = None
    bin_mime: str | None = None
    _payload_json: str | None = field(default=None, init=False, repr=False)
    _payload_size: int | None = field(default=None, init=False, repr=False)

    @property
    def payload_json(self) -> str:
        """The payload as JSON text, encoded once."""
        encoded = self._payload_json
        if encoded is None:
            encoded = self._payload_json = fastjson.dumps(self.payload)
        return encoded

    @property
    def payload_size(self) -> int:
        """Bytes of the payload as UTF-8 JSON (what it costs in flow-control byte credit)."""
        size = self._payload_size
        if size is None:
            encoded = self.payload_json
            size = self._payload_size = len(encoded) if encoded.isascii() else len(encoded.encode())
        return size

    def stamp(self, transaction: str, tseq: int, thread_id: str | None) -> None:
        """Record the event in a transaction's log: by the publishing transaction, once, before delivery."""
        self.transaction, self.tseq, self.thread_id = transaction, tseq, thread_id

    def with_changes(self, **changes: Any) -> Event:
        """A copy with ``changes`` (the payload's JSON is kept unless the payload changes)."""
        copy = Event.__new__(Event)
        for name in _EVENT_FIELDS:
            object.__setattr__(copy, name, getattr(self, name))
        if "payload" in changes:
            copy._payload_json = copy._payload_size = None
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy

    def to_wire(self, *, session: str, seq: int, ack: int | None) -> str:
        """The envelope as JSON text; the payload part is encoded once per event."""
        head: dict[str, Any] = {
            "id": self.id,
            "session": session,
            "transaction": self.transaction,
            "seq": str(seq),
            "ts": self.ts,
            "channel": self.channel,
            "type": self.type,
        }
        if ack is not None:
            head["ack"] = str(ack)
        if self.run_id is not None:
            head["run_id"] = self.run_id
        if self.thread_id is not None:
            head["thread_id"] = self.thread_id
        if self.tseq is not None:
            head["tseq"] = str(self.tseq)
        if self.bin_len is not None:
            head["bin_len"] = self.bin_len
            head["bin_mime"] = self.bin_mime
        return fastjson.dumps(head)[:-1] + ',"payload":' + self.payload_json + "}"


_EVENT_FIELDS = Event.__slots__


def parse_seq(value: str | None, where: str, related_id: str, code: ErrorCode = ErrorCode.INVALID_PAYLOAD) -> int:
    """A seq in a payload field (``where``) as a number; an error ``code`` naming the field if it is not one."""
    number = parse_uint64(value)
    if number is None:
        raise ProtocolError(
            code,
            f"{where} must be a decimal seq, not {value!r}"[:200],
            related_id=related_id,
            detail={"where": f"/payload/{where}"},
        )
    return number
