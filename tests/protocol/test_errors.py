"""protocol/errors.py: one function spells an error body, and what it writes is what the wire always carried."""

from __future__ import annotations

from haip_runtime.exceptions import DecodeError, ProtocolError
from haip_runtime.protocol import fastjson
from haip_runtime.protocol.errors import error_body, error_payload
from haip_runtime.protocol.events import ErrorCode, LlmErrorCode, ToolErrorCode


def test_an_error_body_is_code_then_message_then_related_id_then_detail() -> None:
    body = error_body(ErrorCode.INVALID_PAYLOAD, "no", related_id="e1", detail={"where": "/payload/x"})
    text = '{"code":"INVALID_PAYLOAD","message":"no","related_id":"e1","detail":{"where":"/payload/x"}}'
    assert fastjson.dumps(body) == text


def test_an_error_body_leaves_out_an_empty_related_id_and_detail() -> None:
    assert error_body(ErrorCode.RATE_LIMITED, "slow down", related_id="", detail={}) == {
        "code": "RATE_LIMITED",
        "message": "slow down",
    }


def test_the_http_shape_is_code_message_and_detail() -> None:
    error = DecodeError(ErrorCode.MESSAGE_TOO_LARGE, "too big", related_id="e1", detail={"where": "body"})
    body = error_body(error.code, error.message, detail=error.detail)
    assert fastjson.dumps(body) == '{"code":"MESSAGE_TOO_LARGE","message":"too big","detail":{"where":"body"}}'


def test_every_kind_of_code_goes_out_as_a_plain_string() -> None:
    for code in (ErrorCode.UNAUTHORIZED, ToolErrorCode.TIMEOUT, LlmErrorCode.LLM_TIMEOUT, "CUSTOM"):
        assert type(error_body(code, "m")["code"]) is str


def test_the_error_payload_of_a_protocol_error_carries_all_it_knows() -> None:
    error = ProtocolError(ErrorCode.REPLAY_TOO_OLD, "gone", related_id="e9", detail={"where": "/payload/from_seq"})
    assert error_payload(error) == {
        "code": "REPLAY_TOO_OLD",
        "message": "gone",
        "related_id": "e9",
        "detail": {"where": "/payload/from_seq"},
    }
    bare = ProtocolError(ErrorCode.INTERNAL_ERROR, "oops")
    assert error_payload(bare) == {"code": "INTERNAL_ERROR", "message": "oops"}
