"""JSON for the hot path: orjson, with the standard library's behaviour where orjson would refuse.

Every envelope is parsed on the way in and every event's payload encoded on the way out; the
standard ``json`` module was the largest single cost after the event loop itself. orjson is
several times faster and writes the same compact UTF-8 form (``separators=(",", ":")``,
``ensure_ascii=False``). Where it refuses a value the standard library takes (integers past
64 bits and non-string keys in output), the standard library decides instead;
the fallback costs only on such rare values. Two differences remain, both toward standard JSON:
``NaN`` and infinities are written as ``null`` (the standard library writes ``NaN``, which is
not JSON), and integers past 64 bits in input are read as floats, as a JavaScript client reads them.

What is read can be written and stored: text that is valid JSON but carries a value nothing
downstream can encode (a lone UTF-16 surrogate escape such as ``"\\ud800"``, which UTF-8 cannot
hold, or a number past the range of a double, such as a 5,000-digit integer) raises
``DecodeError`` ``INVALID_MESSAGE``, as orjson refuses them too; so do ``NaN`` and ``Infinity``,
which are not JSON.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from haip_runtime.exceptions import DecodeError
from haip_runtime.protocol.events import ErrorCode

_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT64 = 2**64


def _unkeepable(message: str) -> DecodeError:
    """Valid JSON carrying a value the runtime could not encode, store or send."""
    return DecodeError(ErrorCode.INVALID_MESSAGE, f"unusable JSON: {message}", detail={"where": "frame"})


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (non-ASCII kept as is, a lone surrogate as U+FFFD)."""
    try:
        return _orjson_dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: a big integer, a non-string key, a lone surrogate...
        # (NaN and the infinities as null, as orjson writes them: the loader refuses them, and what the runtime
        # writes, stored or on the bus, must read back: a reviewer's find.)
        text = json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # A lone surrogate can only come from the runtime's own side (a plugin, a tool): the decoder
    # refuses them. Written as U+FFFD, so what is sent and stored is always valid UTF-8.
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def loads(text: str | bytes) -> Any:
    """Parse JSON text; raises ``json.JSONDecodeError`` (or ``RecursionError``) as ``json.loads`` does,
    and ``DecodeError`` for a lone surrogate or a number past a double's range."""
    try:
        return _orjson_loads(text)
    except orjson.JSONDecodeError:
        # the standard library's verdict and error message, with what orjson refused refused too
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
        _refuse_surrogates(value)
        return value


def size(value: Any) -> int:
    """Bytes of ``value`` as ``dumps`` writes it (UTF-8): how much of a frame it takes."""
    if isinstance(value, str):  # (the common case, on every streamed part: no text made)
        try:
            return len(_orjson_dumps(value))
        except TypeError:  # a lone surrogate: written as U+FFFD
            pass
    return len(dumps(value).encode())


def fitting_start(text: str, room: int) -> str:
    """The longest start of ``text`` that takes at most ``room`` bytes as a JSON string (quotes included):
    escapes and UTF-8 make a prefix's size not its length, so it is searched for."""
    low, high = 0, min(len(text), room)
    while low < high:
        middle = (low + high + 1) // 2
        if size(text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity made ``None`` (a copy where there are any; the value itself if not)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):  # (a key NaN or infinite is written as its text, as orjson cannot take it either)
        return {_finite_key(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _finite_key(key: Any) -> Any:
    return key if not isinstance(key, float) or math.isfinite(key) else str(key)


def _parse_int(digits: str) -> int | float:
    if len(digits) > 20 or abs(number := int(digits)) >= _INT64:
        return _parse_float(digits)  # past 64 bits: a float, as orjson and JavaScript read it
    return number


def _parse_float(digits: str) -> float:
    number = float(digits)  # never raises for JSON number syntax; past the range it is infinite
    if math.isinf(number):
        shown = digits if len(digits) <= 24 else f"{digits[:12]}...({len(digits)} characters)"
        raise _unkeepable(f"number {shown} is out of range")
    return number


def _parse_constant(name: str) -> float:
    """``NaN``, ``Infinity``, ``-Infinity``: the standard library's extension, not JSON. Refused: taken, they
    were forwarded and stored as ``null``, the data changed without a word (a prober's find)."""
    raise _unkeepable(f"{name} is not a JSON value")


def _refuse_surrogates(value: Any) -> None:
    """Walk the parsed value (without recursion) for a lone surrogate in a key or a string."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: Any = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for string in strings:
            if _SURROGATE.search(string):
                raise _unkeepable("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), not a character")
