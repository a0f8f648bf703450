"""``server/node.py``: the socket a node serves on."""

from __future__ import annotations

import os
import sys

import anyio
import pytest
import uvloop

from haip_runtime.server import node

CHILD = """
import os
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the listing's own descriptor, closed by now
        pass
print(" ".join(links))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads a child's descriptors in /proc")
def test_a_child_process_started_under_uvloop_does_not_hold_the_nodes_listening_socket() -> None:
    """A stdio MCP server is a child of the node; under uvloop (the default loop) a child keeps every
    inheritable descriptor, and one holding the port would keep it after the node was killed."""
    sock = node.bind("127.0.0.1", 0)

    async def child_descriptors() -> str:
        process = await anyio.run_process([sys.executable, "-c", CHILD])
        return process.stdout.decode()

    with sock:
        listening = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
        seen = uvloop.run(child_descriptors())
    assert listening not in seen.split()
