"""The only place bytes become envelopes (and payloads become models).

``decode`` turns one text frame or line into an ``Envelope`` or raises ``DecodeError`` with a
protocol code and ``detail["where"]``; ``parse_payload`` validates a payload against the model
of its type and reports failures as a JSON pointer.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.envelope import Envelope
from haip_runtime.protocol.events import ErrorCode
from haip_runtime.protocol.payloads import INBOUND, Message, Payload

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
#: One audio message (its chunks together) is at most this many times ``server.max_frame_bytes``.
AUDIO_MESSAGE_FRAMES = 16
MAX_DEPTH = 64
"""Deepest nesting of JSON arrays and objects accepted in a frame (the envelope itself is depth 1).

Deeper input would exhaust Python's recursion limit in the JSON parser, in validation or when
the payload is echoed; no HAIP message needs more than a handful of levels."""

P = TypeVar("P", bound=BaseModel)


#: Room left in a frame for the envelope around a message's text (``check_text_fits``).
ENVELOPE_ROOM = 1024


def check_text_fits(text: str, max_bytes: int, where: str) -> None:
    """``MESSAGE_TOO_LARGE`` for a message's text coming in by another door (AG-UI, MCP) that would not
    fit in a HAIP frame of ``max_bytes`` (``server.max_frame_bytes``), as it would not over HAIP: the
    members' clients take frames up to that size, and one they refuse closes their connection again
    at every resume. ``where``: the field, for the error."""
    size = len(fastjson.dumps(text).encode())
    if size + ENVELOPE_ROOM > max_bytes:
        raise DecodeError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"a message of {size} bytes is over the limit of {max_bytes - ENVELOPE_ROOM} (server.max_frame_bytes)",
            detail={"where": where, "limit": max_bytes - ENVELOPE_ROOM},
        )


def decode(frame: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Envelope:
    """Decode one frame. Raises ``DecodeError`` (INVALID_MESSAGE, MESSAGE_TOO_LARGE, UNSUPPORTED_TYPE),
    with the frame's ``id`` as ``related_id`` and its ``seq`` when they can be read."""
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
    if size > max_bytes:
        raise _identified(
            DecodeError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"frame of {size} bytes exceeds the limit of {max_bytes}",
                detail={"where": "frame", "limit": max_bytes},
            ),
            _readable(frame) if size <= max_bytes * READ_OVERSIZE else None,
        )
    raw = load_json(frame)
    if not isinstance(raw, dict):
        raise DecodeError(ErrorCode.INVALID_MESSAGE, "an envelope must be a JSON object", detail={"where": "/"})
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        where, what = _first_error(exc)
        error = DecodeError(ErrorCode.INVALID_MESSAGE, f"invalid envelope at {where}: {what}", detail={"where": where})
        raise _identified(error, raw) from exc
    envelope._size = size
    if envelope.crit and envelope.unknown_fields:
        error = DecodeError(
            ErrorCode.UNSUPPORTED_TYPE,
            f"critical envelope carries unknown fields: {', '.join(envelope.unknown_fields)}",
            related_id=envelope.id,
            detail={"where": "/" + envelope.unknown_fields[0]},
        )
        error.seq = envelope.seq
        raise error
    return envelope


#: The longest ``id`` and ``seq`` of a refused frame taken back to the client (an envelope's own bounds).
MAX_ID, MAX_SEQ = 128, 32
#: A frame over the limit is still read for its ``id`` and ``seq`` up to this many times the limit
#: (past it, only the transport's own bound applies, and the frame is not parsed at all).
READ_OVERSIZE = 4


def _readable(frame: str | bytes) -> Any:
    try:
        return load_json(frame)
    except DecodeError:
        return None


def _identified(error: DecodeError, raw: Any) -> DecodeError:
    """``error`` with the ``id`` (as ``related_id``) and ``seq`` of the refused frame, where it has them."""
    if isinstance(raw, dict):
        if isinstance(raw.get("id"), str) and len(raw["id"]) <= MAX_ID:
            error.related_id = raw["id"]
        seq = raw.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):  # (lenient clients number with integers)
            seq = str(seq)
        if isinstance(seq, str) and len(seq) <= MAX_SEQ:  # as an envelope's own seq may be
            error.seq = seq
    return error


def load_json(frame: str | bytes, *, where: str = "frame") -> Any:
    """Parse JSON the runtime can keep: ``DecodeError`` INVALID_MESSAGE for text that is not JSON,
    nests deeper than ``MAX_DEPTH``, or carries a lone surrogate or a number past a double's range
    (so the encoder and the store never meet a value the decoder let through)."""
    try:
        raw = fastjson.loads(frame)
    except DecodeError as exc:  # a lone surrogate, a number past a double
        raise DecodeError(exc.code, exc.message, detail={"where": where}) from exc
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DecodeError(ErrorCode.INVALID_MESSAGE, f"not JSON: {exc}", detail={"where": where}) from exc
    except RecursionError as exc:
        raise _too_deep(where) from exc
    if _may_be_deep(frame) and _depth(raw) > MAX_DEPTH:
        raise _too_deep(where)
    return raw


def _may_be_deep(frame: str | bytes) -> bool:
    """Cheap pre-check (C-speed counts): fewer brackets than the cap cannot nest past it."""
    if isinstance(frame, bytes):
        return frame.count(b"[") + frame.count(b"{") > MAX_DEPTH
    return frame.count("[") + frame.count("{") > MAX_DEPTH


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion; stops counting once past the cap."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _too_deep(where: str = "frame") -> DecodeError:
    return DecodeError(
        ErrorCode.INVALID_MESSAGE,
        f"JSON nested deeper than {MAX_DEPTH} levels",
        detail={"where": where, "limit": MAX_DEPTH},
    )


def parse_payload(envelope: Envelope, model: type[P] | None = None) -> P:
    """Validate ``envelope.payload`` against ``model`` (default: the model of its type)."""
    chosen: type[BaseModel] = model or INBOUND.get(envelope.type, Payload)
    data: Any = envelope.payload
    if isinstance(data, str):
        if chosen is not Message:
            raise DecodeError(
                ErrorCode.INVALID_PAYLOAD,
                f"{envelope.type} needs an object payload",
                related_id=envelope.id,
                detail={"where": "/payload"},
            )
        data = {"text": data}
    try:
        return chosen.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        where, what = _first_error(exc, prefix="/payload")
        raise DecodeError(
            ErrorCode.INVALID_PAYLOAD,
            f"invalid {envelope.type} payload at {where}: {what}",
            related_id=envelope.id,
            detail={"where": where},
        ) from exc


def _first_error(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """The first error's place as a JSON pointer, and what is wrong there. Where a union failed, pydantic
    puts the name of each of its members in the place (``payload/dict[str,any]``), which is not in the
    JSON: the place ends before it, and the message says what the union takes."""
    errors = exc.errors()
    loc, message = errors[0]["loc"], errors[0]["msg"]
    cut = next((index for index, part in enumerate(loc) if _takes(part)), len(loc))
    if cut < len(loc):
        place = loc[:cut]
        takes = sorted(
            {_takes(error["loc"][cut]) for error in errors if len(error["loc"]) > cut and error["loc"][:cut] == place}
        )
        loc, message = place, f"expected {' or '.join(takes)}"
    pointer = prefix + "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in loc)
    return pointer or "/", message


#: What the members of a union in an error's place take.
_UNION_MEMBERS = {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false"}


def _takes(part: object) -> str:
    """What a union member named in an error's place takes (``an object``, ``text``); '' for a real place."""
    if isinstance(part, str) and part.startswith("dict["):
        return "an object"
    return _UNION_MEMBERS.get(part, "") if isinstance(part, str) else ""


__all__ = ["DEFAULT_MAX_FRAME_BYTES", "MAX_DEPTH", "decode", "load_json", "parse_payload"]
