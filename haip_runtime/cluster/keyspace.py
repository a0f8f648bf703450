"""Every Redis key and channel name the cluster uses, in one place.

Keys of one transaction, one session, one user or one lease share a hash tag (``{t:...}``), so each
Lua script touches keys of one Redis Cluster slot. The keys would move to a Redis Cluster unchanged; the
solo appends would not (``translog.py``: ``PUBSUB NUMSUB`` counts one shard's subscribers).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keyspace:
    """Names under one ``key_prefix`` (several deployments may share a Redis).

    Channels also name the database (``db``) when it is not 0: keys live in a database, channels do
    not, so two deployments on one Redis with different database numbers and the same prefix heard
    each other's messages (another's forwarded POSTs, bearer tokens included: found by a tester)."""

    prefix: str
    db: int = 0

    @property
    def _channels(self) -> str:
        return f"{self.prefix}:db{self.db}" if self.db else self.prefix

    def sequence(self, transaction: str) -> str:
        return f"{self.prefix}:{{t:{transaction}}}:seq"

    def log(self, transaction: str) -> str:
        return f"{self.prefix}:{{t:{transaction}}}:log"

    def log_bytes(self, transaction: str) -> str:
        """About how many bytes the transaction's log holds (never fewer): its byte bound is kept by it."""
        return f"{self.prefix}:{{t:{transaction}}}:bytes"

    def log_ended(self, transaction: str) -> str:
        """Set while an ended transaction's log is let go (its keys expire soon after each append)."""
        return f"{self.prefix}:{{t:{transaction}}}:ended"

    def channel(self, transaction: str) -> str:
        return f"{self._channels}:tx:{transaction}"

    def node_channel(self, node: str) -> str:
        return f"{self._channels}:node:{node}"

    def replay(self, session: str) -> str:
        return f"{self.prefix}:{{s:{session}}}:replay"

    def replay_meta(self, session: str) -> str:
        return f"{self.prefix}:{{s:{session}}}:meta"

    def replay_ids(self, session: str) -> str:
        return f"{self.prefix}:{{s:{session}}}:ids"

    def stream(self, session: str) -> str:
        return f"{self.prefix}:{{s:{session}}}:stream"

    def inbound(self, session: str, envelope: str) -> str:
        return f"{self.prefix}:{{s:{session}}}:in:{envelope}"

    def lease(self, name: str) -> str:
        return f"{self.prefix}:{{l:{name}}}"

    def wanted(self, name: str) -> str:
        """Set while a node able to do all the lease's work waits for it (``Leases.want``)."""
        return f"{self.prefix}:{{l:{name}}}:wanted"

    def fence(self, name: str) -> str:
        return f"{self.prefix}:{{l:{name}}}:fence"

    def slots(self, user: str, kind: str) -> str:
        return f"{self.prefix}:{{u:{user}}}:slots:{kind}"

    def rate_stem(self, user: str, kind: str) -> str:
        """Rate windows' keys are this stem and the window's number (made by the script, from Redis's clock)."""
        return f"{self.prefix}:{{u:{user}}}:rate:{kind}:"

    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def node_agents(self) -> str:
        """Each node's agents (a hash: node -> names, comma-separated), read with the live nodes."""
        return f"{self.prefix}:node-agents"

    def worker_metrics(self, group: str) -> str:
        """The metrics of the workers of one ``serve --workers`` (a hash: worker -> Prometheus text)."""
        return f"{self.prefix}:metrics:{group}"

    def epoch(self) -> str:
        return f"{self.prefix}:epoch"
