"""Free 127.0.0.1 ports for the servers the tests start, outside the kernel's ephemeral range.

A port from ``bind(("127.0.0.1", 0))`` is an ephemeral one: once its server stops, any outgoing
connection on the machine (the other xdist worker's, a node's to Redis) may take it as its source
port, and a server restarted "on the same port" may find it taken. Ports below the ephemeral range
are never handed out that way, so a test may stop a server and start it again where it was.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Linux's default ephemeral range starts here; the machine's own setting is read when it can be.
DEFAULT_EPHEMERAL_START = 32768
#: The lowest port handed out (above the well-known and most registered services' ports).
LOWEST = 20000
ATTEMPTS = 200


def ephemeral_start() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START
    return low


def free_port() -> int:
    """A port free on 127.0.0.1 now, chosen at random below the ephemeral range when there is room
    (else an ephemeral one, as ``bind`` to port 0 gives)."""
    high = ephemeral_start() - 1
    if high - LOWEST >= 1000:
        for _ in range(ATTEMPTS):
            port = random.randint(LOWEST, high)
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
