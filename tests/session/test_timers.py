"""The runtime's one timer task: calls in deadline order, cancelled calls never made, failures logged."""

from __future__ import annotations

import logging

import anyio
import pytest

from haip_runtime.session.timers import Timers

pytestmark = pytest.mark.anyio


async def test_calls_are_made_in_deadline_order_and_cancelled_ones_never() -> None:
    timers, done = Timers(), anyio.Event()
    calls: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        timers.call_later(0.03, calls.append, "third")
        timers.call_later(0.01, calls.append, "first")
        timers.call_later(0.02, calls.append, "cancelled").cancel()
        timers.call_later(0.02, calls.append, "second")
        timers.call_later(0.04, done.set)
        with anyio.fail_after(5):
            await done.wait()
        tg.cancel_scope.cancel()
    assert calls == ["first", "second", "third"] and len(timers) == 0


async def test_a_failing_callback_is_logged_and_the_next_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    timers, done = Timers(), anyio.Event()

    def fail() -> None:
        raise ValueError("boom")

    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run)
        timers.call_later(0, fail)
        timers.call_later(0, done.set)
        with caplog.at_level(logging.ERROR, logger="haip_runtime.session.timers"), anyio.fail_after(5):
            await done.wait()
        tg.cancel_scope.cancel()
    assert "timer callback" in caplog.text and "boom" in caplog.text


def test_cancelled_timers_do_not_pile_up() -> None:
    timers = Timers()
    pending = [timers.call_later(3600, print) for _ in range(1000)]
    for timer in pending[:900]:
        timer.cancel()
        timer.cancel()  # twice is once
    assert len(timers) == 100
    assert len(timers._heap) < 1000 - 256  # compacted once the cancelled ones were most of it
