"""`[cluster]`: several runtime processes sharing conversations through Redis.

Without the section nothing changes (one process, no Redis). ``cluster/`` reads these options;
``masking.py`` hides the password in ``redis_url``. Named ``clustering`` so that no module shares a
noun with the ``cluster/`` folder.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from haip_runtime.config import base

URL_SCHEMES = ("redis", "rediss", "unix")


class ClusterConfig(base.Model):
    redis_url: str
    """Where the Redis shared by every node is: `redis://[:password@]host:port/db`, `rediss://` (TLS) or
    `unix:///path.sock`. Use `${VAR}` for the password; `check` and the logs show it masked."""
    node_id: str | None = Field(default=None, json_schema_extra={"pattern": r"^[A-Za-z0-9_.-]{1,64}$"})
    """This process's name among the nodes; default: one made at start (host name and a random part)."""
    key_prefix: str = Field(default="haip", json_schema_extra={"pattern": r"^[A-Za-z0-9_.-]{1,32}$"})
    """First part of every Redis key and channel, so that several deployments may share one Redis."""
    connect_timeout_seconds: float = Field(default=10, gt=0)
    """At start, how long to keep trying to reach Redis (with backoff) before giving up with an error."""
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    """How often a node tells Redis it is alive (and checks Redis is there); the bus's health follows."""
    node_ttl_seconds: float = Field(default=5, gt=0)
    """A node not heard from this long is no longer listed as live; its quota slots last `slot_ttl_seconds`."""
    lease_seconds: float = Field(default=10, gt=0)
    """Time to live of a run-owner lease; renewed every third of it while its holder lives. A dead node's
    transactions run again elsewhere at most this long after it died."""
    log_max_events: int = Field(default=10_000, ge=100)
    """Events kept per transaction in Redis (trimmed approximately) for nodes catching up after a gap;
    older ones are read from the durable store."""
    log_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    """...and at most about this many bytes of them: a member sending large frames must not fill Redis for
    every transaction (the oldest are trimmed first; the newest is always kept)."""
    log_idle_seconds: float = Field(default=86_400, gt=0)
    """A transaction's Redis log and sequence counter vanish this long after its last append (the next
    append continues from the durable store's last tseq)."""
    replay_max_events: int = Field(default=1000, ge=1)
    """Outbound envelopes kept per session for a resume on any node (trimmed approximately)..."""
    replay_max_age_seconds: float = Field(default=300, gt=0)
    """...none older than this..."""
    replay_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """...and at most about this many bytes of them (as `session.replay_window_bytes` bounds one node's)."""
    dedup_seconds: float = Field(default=300, gt=0)
    """How long an inbound envelope id is remembered, cluster-wide, to drop a resent duplicate."""
    slot_ttl_seconds: float = Field(default=30, gt=0)
    """A quota slot (a session, an open transaction) not refreshed this long is freed: the tolerance of
    per-user limits after a node dies."""
    part_batch_ms: float = Field(default=5, ge=0)
    """Streamed message parts wait at most this long to cross the bus together (0: each at once)..."""
    part_batch_bytes: int = Field(default=16 * 1024, ge=1)
    """...or until this many bytes wait."""
    stream_behind_ms: float = Field(default=20, ge=0)
    """A streaming agent waits while its own parts have been on their way through the bus (appended,
    then back through this node's feed to its members) longer than this: a node short of CPU then slows
    the stream, as one node without [cluster] does, instead of falling behind it (0: never waits)."""

    @field_validator("node_id", "key_prefix")
    @classmethod
    def _plain_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        most = 64 if info.field_name == "node_id" else 32
        if value is not None and not re.fullmatch(rf"[A-Za-z0-9_.-]{{1,{most}}}", value):
            raise ValueError(
                f"1 to {most} letters, digits, '_', '.' or '-' (it goes into Redis's key and channel names:"
                f" {'web-1' if info.field_name == 'node_id' else 'haip-prod'}), not {value!r}"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in URL_SCHEMES:
            # "localhost:6379" parses as the scheme "localhost": say what was written (never a password)
            if value.startswith(f"{scheme}://"):
                shown = f"{scheme}://"
            else:
                shown = "a value without one" if "@" in value else repr(value)
            raise ValueError(f"must start with redis://, rediss:// or unix:// (redis://host:6379/0), not {shown}")
        path = urlsplit(value).path
        if scheme != "unix" and path.strip("/") and not path.strip("/").isdecimal():
            raise ValueError(f"the database after the port must be a number (redis://host:6379/0), not {path!r}")
        return value

    @model_validator(mode="after")
    def _beats_fit(self) -> ClusterConfig:
        """Each lifetime kept alive by the heartbeat holds two beats at least (an operator's find: a heartbeat
        of 10 s with the 5 s node_ttl made a live node drop out between beats, the node count flap, and
        a second node under a live one's node_id start)."""
        for name in ("node_ttl_seconds", "slot_ttl_seconds"):
            if getattr(self, name) < 2 * self.heartbeat_seconds:
                raise ValueError(
                    f"{name} ({getattr(self, name):g}) must be at least twice heartbeat_seconds"
                    f" ({self.heartbeat_seconds:g}): a node beats every heartbeat_seconds to stay alive"
                )
        return self

    @property
    def numbering(self) -> str:
        """What tells this cluster's numbering apart in the durable store: its ``key_prefix``, and its Redis
        database when not 0 (an operator's find: a node on database 1 of the same Redis and PostgreSQL
        started, numbered the same conversations apart, and the store lost one side's events)."""
        return self.key_prefix if self.database == 0 else f"{self.key_prefix}@{self.database}"

    @property
    def database(self) -> int:
        """The database number in ``redis_url`` (0 unless it names one)."""
        split = urlsplit(self.redis_url)
        # ``?db=`` as redis-py reads it, over the path (a re-tester's find: ``redis://host/0?db=1`` ran on
        # database 1 while the numbering guard read 0)
        numbers = [v for k, v in parse_qsl(split.query) if k == "db" and v.isdecimal()]
        if numbers:
            return int(numbers[0])
        return 0 if split.scheme == "unix" else int(split.path.strip("/") or 0)

    @property
    def redis_password(self) -> str | None:
        """The password in ``redis_url``, if any (for the log redactor)."""
        return base.url_password(self.redis_url)

    @property
    def masked_url(self) -> str:
        """``redis_url`` with its password replaced by ``**********``."""
        return base.masked_url(self.redis_url)
