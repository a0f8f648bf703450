"""Log output: console lines for people, one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from haip_runtime.config import ObservabilityConfig
from haip_runtime.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("haip_runtime").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("haip_runtime").setLevel(ours)


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
