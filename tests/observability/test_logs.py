"""Log output: console lines for people, one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from haip_runtime.config.models import ObservabilityConfig
from haip_runtime.observability.logs import LogBudget, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("haip_runtime").level
    uvicorn = logging.getLogger("uvicorn.error")
    theirs, filters = uvicorn.level, uvicorn.filters[:]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("haip_runtime").setLevel(ours)
    uvicorn.setLevel(theirs)
    uvicorn.filters[:] = filters


def test_json_format_is_one_object_per_line(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(ObservabilityConfig(log_format="json", log_level="debug"))
    log = logging.getLogger("haip_runtime.test")
    log.debug("hello %s", "world")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it broke")
    lines = capsys.readouterr().err.splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert (first["level"], first["logger"], first["message"]) == ("debug", "haip_runtime.test", "hello world")
    assert first["ts"].endswith("Z") and second["message"] == "it broke" and "ValueError: boom" in second["exception"]


def test_console_format_honours_the_level(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(ObservabilityConfig(log_level="warning"))
    logging.getLogger("haip_runtime.test").info("quiet")
    logging.getLogger("haip_runtime.test").warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err and "WARNING haip_runtime.test: loud" in err


def test_tokens_and_configured_secrets_never_reach_the_log(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(ObservabilityConfig(), secrets=["sk-very-secret-key", "short"])
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"
    log = logging.getLogger("haip_runtime.test")
    log.warning("header Authorization: Bearer abc.def.ghi; raw %s; url /haip?token=xyz&x=1", jwt)
    log.warning("env API_KEY=%s, word short stays", "sk-very-secret-key")
    err = capsys.readouterr().err
    assert "abc.def.ghi" not in err and jwt not in err and "xyz" not in err and "sk-very-secret-key" not in err
    assert "Bearer <redacted>" in err and "token=<redacted>&x=1" in err and "API_KEY=<redacted>" in err
    assert "word short stays" in err


def test_a_log_budget_drops_past_its_limit_and_strips_tracebacks() -> None:
    now = [0.0]
    budget = LogBudget(limit=2, window=60, clock=lambda: now[0])
    try:
        raise ValueError("bad line")
    except ValueError:
        exc_info = sys.exc_info()

    def record() -> logging.LogRecord:
        return logging.LogRecord("mcp.client.stdio", logging.ERROR, __file__, 1, "parse failed", None, exc_info)

    first, second, third = record(), record(), record()
    assert budget.filter(first) and budget.filter(second) and not budget.filter(third)
    assert first.exc_info is None and first.getMessage() == "parse failed: ValueError: bad line"
    now[0] = 61
    later = record()
    assert budget.filter(later) and later.getMessage().endswith("(1 similar lines dropped)")


def test_a_workers_lines_say_which_worker_they_are(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(ObservabilityConfig(), worker="w2")
    logging.getLogger("haip_runtime.test").warning("from a worker")
    configure_logging(ObservabilityConfig(log_format="json"), worker="w2")
    logging.getLogger("haip_runtime.test").warning("in json")
    console, json_line = capsys.readouterr().err.splitlines()
    assert console.endswith("WARNING [w2] haip_runtime.test: from a worker")
    assert json.loads(json_line)["worker"] == "w2"


def test_a_clients_text_cannot_write_lines_of_its_own_into_the_console_log(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hostile probe's find: a TRANSACTION_END reason of "bye\\n06:50:00 ERROR ...: a FORGED admin token"
    and a terminal escape made a convincing log line of the client's own; a NUL made grep call it binary."""
    configure_logging(ObservabilityConfig(log_level="info"))
    reason = "bye\n06:50:00 ERROR   haip_runtime.auth.tokens: FORGED\r\x1b[31m\x00\u2028 é"
    logging.getLogger("haip_runtime.test").info("transaction ended: %s", reason)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("haip_runtime.test").exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(
        r"transaction ended: bye\n06:50:00 ERROR   haip_runtime.auth.tokens: FORGED\r\x1b[31m\x00\u2028 é"
    )
    assert lines[1].endswith("failed") and lines[2] == "Traceback (most recent call last):"  # tracebacks still read


@pytest.mark.parametrize("level", ["info", "warning"])
def test_a_client_text_frame_that_is_not_utf8_is_no_server_error(
    restore_logging: None, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    """A prober's find: uvicorn logs it as an ERROR with a traceback; it is the client's fault (closed 1007)."""
    configure_logging(ObservabilityConfig(log_level=level))
    try:
        b"\xff".decode()
    except UnicodeDecodeError:
        logging.getLogger("uvicorn.error").exception("Invalid UTF-8 sequence received from client.")
    logging.getLogger("uvicorn.error").error("Exception in ASGI application")  # (any other error stays one)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err and "ERROR   uvicorn.error: Exception" in err
    said = "INFO    uvicorn.error: a client sent a text frame that is not UTF-8: its connection was closed 1007"
    assert (said in err) is (level == "info")
