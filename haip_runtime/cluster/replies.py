"""Redis replies as the types the bus uses (redis-py's own types say ``bytes | str | None`` everywhere).

The bus's clients never decode responses, so every value is ``bytes``; these turn the loose types
into exact ones once, where the replies enter.
"""

from __future__ import annotations

from typing import Any, cast

#: What a Lua script's ARGV may be made of.
Arg = bytes | str | int | float

#: ``XRANGE``/``XREVRANGE``: (entry id, fields).
StreamRows = list[tuple[bytes, dict[bytes, bytes]]]


def stream_rows(reply: Any) -> StreamRows:
    return cast(StreamRows, reply or [])


def text(reply: Any) -> str | None:
    """A bulk string reply as text (``None`` for nil)."""
    return cast(bytes, reply).decode() if reply is not None else None


def fields(reply: Any) -> dict[bytes, bytes]:
    """A hash reply (``HGETALL``)."""
    return cast(dict[bytes, bytes], reply or {})
