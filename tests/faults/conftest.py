"""The fault suite: each test reproduces one fault a hostile probe found (issue 17) against a real
server, names it, and checks what the runtime does about it now (SECURITY.md lists them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.serving import LiveServer, live_server, make_config


def sqlite_config(path: Path, **extra: Any) -> Any:
    return make_config({"storage": {"backend": "sqlite", "path": str(path)}, **extra})


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The runtime with the echo agent and a SQLite store, on a real uvicorn."""
    with live_server(sqlite_config(tmp_path_factory.mktemp("faults") / "haip.db")) as live:
        yield live
