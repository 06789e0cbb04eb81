"""Every Redis key, stream and group name: nothing else formats a key.

Edges map onto a fixed number of partitions. Every key that one lifecycle transition
touches (the command's state, its edge's delivery stream, the partition's lifecycle
log and deadline indexes) carries the partition's hash tag `{pN}`, so a transition is
one atomic script even on Redis Cluster. Identifiers are validated by the schemas
before they reach this module; `check_id` guards against anything that slipped past.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from dataclasses import dataclass

from schemas.identifiers import KEY_PART

SAFE_ID = re.compile(KEY_PART)  # always used with fullmatch: `$` would let a final "\n" pass

EDGE_GROUP = "edge"  # consumer group on each edge's delivery stream (consumer = edge id)
PROJECTOR_GROUP = "projector"  # consumer group on each partition's lifecycle log
VERDICT_GROUP = "verdicts"


class UnsafeKeyPart(ValueError):
    """A value that is not a safe identifier was about to become part of a Redis key."""


@functools.lru_cache(maxsize=65_536)
def check_id(value: str) -> str:
    if not SAFE_ID.fullmatch(value):
        raise UnsafeKeyPart(f"refusing to build a Redis key from {value[:80]!r}")
    return value


def opaque_part(value: str) -> str:
    """A key part for free-form names (user ids): itself if safe, else a digest."""
    if SAFE_ID.fullmatch(value):
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=65_536)
def partition_of(edge_id: str, partitions: int) -> int:
    """Stable edge -> partition mapping (CRC-32, like Redis Cluster's own hashing spirit)."""
    return zlib.crc32(edge_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment namespace (tests and replay use their own)."""

    namespace: str = "dispatch"
    partitions: int = 16

    def __post_init__(self) -> None:
        check_id(self.namespace)
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions must be 1..1024, got {self.partitions}")

    # -- per partition -----------------------------------------------------------------
    def tag(self, partition: int) -> str:
        return f"{self.namespace}:{{p{partition}}}"

    def log(self, partition: int) -> str:
        """The partition's lifecycle log: every event of every command of its edges."""
        return f"{self.tag(partition)}:log"

    def wake(self, partition: int) -> str:
        """Control notes for gateways (an edge session replaced elsewhere)."""
        return f"{self.tag(partition)}:wake"

    def deadlines(self, partition: int) -> str:
        """ZSET command_id -> ack deadline (ms) of routed, unacknowledged commands."""
        return f"{self.tag(partition)}:deadlines"

    def expiries(self, partition: int) -> str:
        """ZSET command_id -> expiry (ms) of commands not yet delivered."""
        return f"{self.tag(partition)}:expiries"

    def inflight(self, partition: int) -> str:
        """HASH `edge_id|entry id` -> command id of unsettled delivery entries (names a
        command whose entry vanished)."""
        return f"{self.tag(partition)}:inflight"

    def edge_streams(self, partition: int) -> str:
        """SET of the partition's edges that have a delivery stream (for retention)."""
        return f"{self.tag(partition)}:streams"

    def request(self, partition: int, request_id: str) -> str:
        """STRING: a script's reply kept ~30 s, so a pipeline rerun after a lost reply
        returns it instead of running the script twice (ledger/lua/common.lua)."""
        return f"{self.tag(partition)}:req:{check_id(request_id)}"

    def projector_lease(self, partition: int) -> str:
        """STRING: the projector process holding this partition (expires unless renewed)."""
        return f"{self.tag(partition)}:projector-lease"

    # -- per edge / per command (partition derived from the edge) ------------------------
    def partition(self, edge_id: str) -> int:
        return partition_of(edge_id, self.partitions)

    def edge_stream(self, edge_id: str) -> str:
        return f"{self.tag(self.partition(edge_id))}:edge:{check_id(edge_id)}"

    def presence(self, edge_id: str) -> str:
        """STRING `gateway_id|session_id` with a TTL while the edge is connected."""
        return f"{self.tag(self.partition(edge_id))}:online:{check_id(edge_id)}"

    def latest(self, edge_id: str) -> str:
        """HASH device/channel -> newest queued setpoint command id (for coalescing)."""
        return f"{self.tag(self.partition(edge_id))}:latest:{check_id(edge_id)}"

    def command(self, edge_id: str, command_id: str) -> str:
        return f"{self.tag(self.partition(edge_id))}:cmd:{check_id(command_id)}"

    def command_prefix(self, partition: int) -> str:
        """Prefix Lua scripts append a command id to (same slot as the partition)."""
        return f"{self.tag(partition)}:cmd:"

    def edge_stream_prefix(self, partition: int) -> str:
        return f"{self.tag(partition)}:edge:"

    # -- global (not part of any transition) ---------------------------------------------
    def command_index(self, command_id: str) -> str:
        """STRING command_id -> edge_id: finds a command's partition by id alone."""
        return f"{self.namespace}:cmdidx:{check_id(command_id)}"

    def audit(self) -> str:
        """Rejections that name no admissible edge (malformed input, failed logins)."""
        return f"{self.namespace}:{{audit}}:log"

    def edges(self) -> str:
        """SET of enrolled edge ids."""
        return f"{self.namespace}:edges"

    # Access control state shares the `{auth}` hash tag: a change and its version bump
    # are one MULTI, also on Redis Cluster.
    def grants(self, user: str) -> str:
        """HASH edge_id (or `*`) -> comma-separated permissions."""
        return f"{self.namespace}:{{auth}}:grants:{opaque_part(user)}"

    def group(self, name: str) -> str:
        """SET of the edges in a site group (grants on `group:NAME` cover them)."""
        return f"{self.namespace}:{{auth}}:group:{check_id(name)}"

    def grants_version(self) -> str:
        """Counter bumped by every grant/revoke: gateways poll it to drop cached grants."""
        return f"{self.namespace}:{{auth}}:grants-version"

    def revoked_tokens(self) -> str:
        """ZSET jti -> token expiry (s): revoked tokens until they would expire anyway."""
        return f"{self.namespace}:{{auth}}:revoked"

    def revoked_version(self) -> str:
        """Counter bumped by every token revocation: gateways poll it to reload the list."""
        return f"{self.namespace}:{{auth}}:revoked-version"

    def projectors(self) -> str:
        """ZSET projector process -> last heartbeat (ms): who shares the partitions."""
        return f"{self.namespace}:projectors"

    def meta(self) -> str:
        """HASH deployment facts that must not change under a running system."""
        return f"{self.namespace}:meta"

    def ratelimit(self, scope: str, who: str) -> str:
        """STRING: a GCRA theoretical arrival time (ms) for one scope (user, edge, global).

        Every limiter key shares the `{rl}` hash tag so one script checks the user, the
        edge and the global ceiling together and consumes all or nothing, also on Redis
        Cluster; the price is that all limiter traffic lands on one shard.
        """
        return f"{self.namespace}:{{rl}}:{check_id(scope)}:{opaque_part(who)}"

    def edge_config(self, edge_id: str) -> str:
        """STRING: the versioned capability config the cloud serves to that edge."""
        return f"{self.namespace}:edgecfg:{check_id(edge_id)}"

    def all_partitions(self) -> range:
        return range(self.partitions)
