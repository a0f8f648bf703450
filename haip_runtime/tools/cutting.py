"""Tool results bounded: a result larger than ``[mcp.servers.<name>] max_result_bytes`` is cut.

A 10 MB tool result became one 20 MB ``TOOL_DONE`` frame (text plus ``structuredContent``), twenty
times what a client may send, stored whole. ``cut_result`` keeps what fits of the result as JSON
(``content`` and ``structuredContent``, less ``RESULT_ENVELOPE_ROOM`` for the envelope around it):
``structuredContent`` goes first when the whole does not fit (MCP asks servers to repeat it as
text), then text blocks are kept in order and the last one that does not fit is cut at a
character boundary; other blocks (images, resources) are kept only whole. A last text block says
how much was cut. Members, the model and the store all get the same cut result.
"""

from __future__ import annotations

from typing import Any

from haip_runtime.protocol import fastjson

#: Bytes kept free for the envelope and the rest of the TOOL_DONE payload.
RESULT_ENVELOPE_ROOM = 4096
#: Bytes kept for the note that says what was cut.
NOTE_ROOM = 256


json_size = fastjson.size


def cut_result(
    content: list[dict[str, Any]], structured: dict[str, Any] | None, limit: int, server: str, where: str = ""
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(content, structured)`` whole if they fit ``limit`` bytes as JSON, else cut with a note naming the
    option that set ``limit`` (``where``; the server's ``max_result_bytes`` unless said)."""
    whole = json_size({"content": content, "structuredContent": structured})
    budget = max(limit - RESULT_ENVELOPE_ROOM, 2 * NOTE_ROOM)
    if whole <= budget:
        return content, structured
    room = budget - NOTE_ROOM - json_size({"content": [], "structuredContent": None})
    kept: list[dict[str, Any]] = []
    for block in content:
        size = json_size(block) + 1
        if size <= room:
            kept.append(block)
            room -= size
        elif block.get("type") == "text" and room > 64:
            kept.append({**block, "text": fastjson.fitting_start(str(block.get("text", "")), room - 64)})
            room = 0
    used = json_size({"content": kept, "structuredContent": None})
    where = where or f"mcp.servers.{server}.max_result_bytes"
    note = f"[result cut: {whole} bytes, over the limit of {limit} ({where}); {used} bytes kept]"
    return [*kept, {"type": "text", "text": note}], None
