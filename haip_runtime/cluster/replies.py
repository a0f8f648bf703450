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


#: A Lua function the scripts that keep streams share: ``shrink(stream, cap)`` keeps a stream's entries within
#: ``cap`` bytes (their fields' values) by trimming the oldest down to seven eighths of it, never the newest;
#: the bytes it holds after. Scripts keep a running total (bytes appended since the last shrink, and what
#: it left) and shrink when it passes ``cap``: the total counts what count and age trims took out too, so
#: it is high, never low, and each shrink sets it right by reading the stream (at least an eighth of
#: ``cap`` appended between two reads: for a stream of large entries, about eight bytes read per byte kept).
SHRINK = """
local function shrink(stream, cap)
  local rows = redis.call('XRANGE', stream, '-', '+')
  local sizes, total = {}, 0
  for index, row in ipairs(rows) do
    local size = 0
    for field = 2, #row[2], 2 do size = size + #row[2][field] end
    sizes[index] = size
    total = total + size
  end
  local goal = cap - math.floor(cap / 8)
  local dropped = 0
  while total > goal and dropped < #rows - 1 do
    dropped = dropped + 1
    total = total - sizes[dropped]
  end
  if dropped > 0 then
    local ms, seq = string.match(rows[dropped][1], '^(%d+)-(%d+)$')
    redis.call('XTRIM', stream, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
  end
  return total
end
"""
