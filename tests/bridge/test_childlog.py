"""An MCP server's stderr: each child's last lines, not every restart's interleaved."""

from __future__ import annotations

from haip_runtime.bridge.childlog import ChildLog


def test_the_tail_is_the_latest_childs_alone() -> None:
    """A newcomer's find: a server that crashed at each start showed "boom 2 | boom 1 | boom 2"."""
    log = ChildLog("tickets")
    for attempt in (1, 2):
        with log.pipe() as stderr:
            stderr.write(f"starting {attempt}\nboom {attempt}\n")
        assert log.tail(wait=5) == [f"starting {attempt}", f"boom {attempt}"]
