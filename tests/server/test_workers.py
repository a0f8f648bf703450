"""The supervisor's small rules: worker node names, and the wait before a dead worker starts again.
(The supervisor at work, with real processes: ``tests/behaviour/test_workers.py``.)"""

from __future__ import annotations

from haip_runtime.server.workers import MAX_BACKOFF_SECONDS, Outcome, backoff, node_id


def test_each_worker_process_is_a_node_of_its_own_named_after_the_configured_one() -> None:
    assert node_id("web-1", 1, 1) == "web-1-w1"
    assert node_id("web-1", 2, 3) == "web-1-w2.3"  # its third process: a new node, never a dead one's name
    long = node_id("n" * 64, 12, 7)
    assert len(long) == 64 and long.endswith("-w12.7")


def test_the_backoff_doubles_with_each_death_in_a_row_up_to_a_bound() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(50) == MAX_BACKOFF_SECONDS


def test_an_outcome_says_how_the_worker_ended() -> None:
    assert Outcome(7, -9, 3.0).describe() == "was killed by SIGKILL"
    assert Outcome(7, 3, None).describe() == "exited with code 3"
