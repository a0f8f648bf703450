"""JSON for the hot path: orjson, with the standard library's behaviour where orjson would refuse.

Every envelope is parsed on the way in and every event's payload encoded on the way out; the
standard ``json`` module was the largest single cost after the event loop itself. orjson is
several times faster and writes the same compact UTF-8 form (``separators=(",", ":")``,
``ensure_ascii=False``). Where it refuses a value the standard library takes (integers past
64 bits and non-string keys in output, ``NaN`` in input), the standard library decides instead;
the fallback costs only on such rare values. Two differences remain, both toward standard JSON:
``NaN`` and infinities are written as ``null`` (the standard library writes ``NaN``, which is
not JSON), and integers past 64 bits in input are read as floats, as a JavaScript client reads them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads


def dumps(value: Any) -> str:
    """``value`` as compact JSON text (non-ASCII kept as is)."""
    try:
        return _orjson_dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: a big integer, a non-string key, a subclass it will not take
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    """Parse JSON text; raises ``json.JSONDecodeError`` (or ``RecursionError``) as ``json.loads`` does."""
    try:
        return _orjson_loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # the standard library's verdict and error message
