"""The Origin check on its own (the live refusal is in test_security.py)."""

from __future__ import annotations

import pytest

from haip_runtime.transports.origin import origin_allowed


@pytest.mark.parametrize(
    ("headers", "allowed", "expected"),
    [
        ({}, [], True),
        ({"origin": "http://rt.example:8080", "host": "rt.example:8080"}, [], True),
        ({"origin": "https://rt.example", "host": "RT.example"}, [], True),
        ({"origin": "https://evil.example", "host": "rt.example"}, [], False),
        ({"origin": "https://App.example/", "host": "rt.example"}, ["https://app.example"], True),
        ({"origin": "http://app.example", "host": "rt.example"}, ["https://app.example"], False),
        ({"origin": "null", "host": "rt.example"}, ["https://app.example"], False),
        ({"origin": "https://anything.example"}, ["*"], True),
        ({"origin": "https://rt.example"}, [], False),
    ],
)
def test_origin_allowed(headers: dict[str, str], allowed: list[str], expected: bool) -> None:
    assert origin_allowed(headers, allowed) is expected
