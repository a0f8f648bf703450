"""Error bodies: the one place an error becomes wire data (PROTOCOL.md section 14).

``error_body`` builds ``{code, message, related_id?, detail?}``: the payload of ``ERROR``, the
``error`` of ``TOOL_DONE``, the body of ``RUN_ERROR`` (beside its ``run_id``) and the JSON an HTTP
door answers an error with (``{code, message, detail?}``). ``error_payload`` is the ``ERROR``
payload of a ``ProtocolError``. Nothing else spells these keys; nothing here decides codes.
"""

from __future__ import annotations

from typing import Any

from haip_runtime.exceptions import ProtocolError


def error_body(
    code: str, message: str, *, related_id: str | None = None, detail: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``{code, message, related_id?, detail?}``, keys in that order; empty ones are left out.

    ``code`` is any wire code (``ErrorCode``, ``ToolErrorCode``, ``LlmErrorCode``); it goes out as
    its plain string.
    """
    body: dict[str, Any] = {"code": str(code), "message": message}
    if related_id:
        body["related_id"] = related_id
    if detail:
        body["detail"] = detail
    return body


def error_payload(error: ProtocolError) -> dict[str, Any]:
    """The ``ERROR`` payload of a protocol error: its code, message, ``related_id`` and ``detail``."""
    return error_body(error.code, error.message, related_id=error.related_id, detail=error.detail)
