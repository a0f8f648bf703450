"""The public surface: ``haip_runtime.__all__`` is sorted and lists every public name."""

from __future__ import annotations

import types

import haip_runtime


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(haip_runtime).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert haip_runtime.__all__ == sorted(haip_runtime.__all__)
    assert public | {"__version__"} == set(haip_runtime.__all__)


def test_every_export_is_documented() -> None:
    for name in haip_runtime.__all__:
        if name != "__version__":
            assert getattr(haip_runtime, name).__doc__, name
