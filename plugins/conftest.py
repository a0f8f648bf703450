"""pytest set-up for agent tests: the harness is async, and anyio's pytest plugin needs a backend."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
