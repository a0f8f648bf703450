"""The cluster's bus: Redis shared by every node (the only code that imports ``redis``).

Layer 2: imports only ``protocol``, ``exceptions``, ``config`` and ``observability``. The runtime
uses its quotas and presence (``server/fleet.py``: per-user limits over every node), and its logs,
feed and leases (``conversation/relay.py``: transactions shared by the nodes).
"""

from haip_runtime.cluster.bus import Bus, make_node_id
from haip_runtime.cluster.feed import Deliver, Feed, Notice
from haip_runtime.cluster.health import BusHealth, BusState
from haip_runtime.cluster.leases import HeldLease, Leases
from haip_runtime.cluster.replay import (
    Claimed,
    Mirrored,
    ReplayOutcome,
    ReplayRead,
    ReplayStreams,
    Taken,
    WindowUpdate,
)
from haip_runtime.cluster.translog import Appended, LogEntry, LogGap, TransactionLog

__all__ = [
    "Appended",
    "Bus",
    "BusHealth",
    "BusState",
    "Claimed",
    "Deliver",
    "Feed",
    "HeldLease",
    "Leases",
    "LogEntry",
    "LogGap",
    "Mirrored",
    "Notice",
    "ReplayOutcome",
    "ReplayRead",
    "ReplayStreams",
    "Taken",
    "TransactionLog",
    "WindowUpdate",
    "make_node_id",
]
