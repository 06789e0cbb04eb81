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
from collections.abc import Callable
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


class _PerPartition:
    """A key each partition has: `keys.NAME(partition)`, built once per partition."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self._built: dict[tuple[str, int], tuple[str, ...]] = {}

    def __get__(self, keys: Keys, owner: object = None) -> Callable[[int], str]:
        scope = (keys.namespace, keys.partitions)
        built = self._built.get(scope)
        if built is None:
            built = tuple(f"{keys.tag(p)}:{self.suffix}" for p in keys.all_partitions())
            self._built[scope] = built
        return built.__getitem__


class _PerEdge:
    """A key each edge has, in its partition's slot: `keys.NAME(edge_id)`."""

    def __init__(self, infix: str) -> None:
        self.infix = infix

    def __get__(self, keys: Keys, owner: object = None) -> Callable[[str], str]:
        return functools.partial(keys.of_edge, self.infix)


class _Global:
    """A key of the whole namespace: `keys.NAME()`; `slot` is its hash tag, which keys
    changed in one MULTI share (Redis Cluster)."""

    def __init__(self, name: str, *, slot: str = "") -> None:
        self.suffix = f"{{{slot}}}:{name}" if slot else name

    def __get__(self, keys: Keys, owner: object = None) -> Callable[[], str]:
        return f"{keys.namespace}:{self.suffix}".__str__  # a call that answers the key


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment namespace (tests and replay use their own).

    Each key is declared once below, with what it holds; the families above build them."""

    namespace: str = "dispatch"
    partitions: int = 16

    def __post_init__(self) -> None:
        check_id(self.namespace)
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions must be 1..1024, got {self.partitions}")

    def tag(self, partition: int) -> str:
        return f"{self.namespace}:{{p{partition}}}"

    def all_partitions(self) -> range:
        return range(self.partitions)

    def partition(self, edge_id: str) -> int:
        return partition_of(edge_id, self.partitions)

    def of_edge(self, infix: str, edge_id: str) -> str:
        return f"{self.tag(self.partition(edge_id))}:{infix}:{check_id(edge_id)}"

    # -- per partition: keys.NAME(partition) -------------------------------------------
    # The partition's lifecycle log: every event of every command of its edges.
    log = _PerPartition("log")
    # Control notes for gateways (an edge session replaced elsewhere).
    wake = _PerPartition("wake")
    # ZSET command_id -> ack deadline (ms) of routed, unacknowledged commands.
    deadlines = _PerPartition("deadlines")
    # ZSET command_id -> expiry (ms) of commands not yet delivered.
    expiries = _PerPartition("expiries")
    # HASH `edge_id|entry id` -> command id of unsettled delivery entries (names a command
    # whose entry vanished).
    inflight = _PerPartition("inflight")
    # SET of the partition's edges that have a delivery stream (for retention).
    edge_streams = _PerPartition("streams")
    # STRING: the projector process holding this partition (expires unless renewed).
    projector_lease = _PerPartition("projector-lease")
    # Prefixes Lua scripts append a command id / an edge id to (the partition's slot).
    command_prefix = _PerPartition("cmd:")
    edge_stream_prefix = _PerPartition("edge:")

    def request(self, partition: int, request_id: str) -> str:
        """STRING: a script's reply kept ~30 s, so a pipeline rerun after a lost reply
        returns it instead of running the script twice (ledger/lua/common.lua)."""
        return f"{self.tag(partition)}:req:{check_id(request_id)}"

    # -- per edge / per command: keys.NAME(edge_id), in the edge's partition ------------
    # STREAM of the commands handed to the edge (its consumer group acks them).
    edge_stream = _PerEdge("edge")
    # STRING `gateway_id|session_id` with a TTL while the edge is connected.
    presence = _PerEdge("online")
    # HASH device/channel -> newest queued setpoint command id (for coalescing).
    latest = _PerEdge("latest")

    def command(self, edge_id: str, command_id: str) -> str:
        """HASH: one command's state (status, entry, deliveries, times)."""
        return f"{self.tag(self.partition(edge_id))}:cmd:{check_id(command_id)}"

    # -- global (not part of any transition): keys.NAME() ------------------------------
    # Rejections that name no admissible edge (malformed input, failed logins).
    audit = _Global("log", slot="audit")
    # SET of enrolled edge ids.
    edges = _Global("edges")
    # Access control state shares the `{auth}` hash tag: a change and its version bump
    # are one MULTI, also on Redis Cluster. Counter bumped by every grant/revoke: gateways
    # poll it to drop cached grants.
    grants_version = _Global("grants-version", slot="auth")
    # ZSET jti -> token expiry (s): revoked tokens until they would expire anyway.
    revoked_tokens = _Global("revoked", slot="auth")
    # Counter bumped by every token revocation: gateways poll it to reload the list.
    revoked_version = _Global("revoked-version", slot="auth")
    # ZSET projector process -> last heartbeat (ms): who shares the partitions.
    projectors = _Global("projectors")
    # HASH deployment facts that must not change under a running system.
    meta = _Global("meta")

    def command_index(self, command_id: str) -> str:
        """STRING command_id -> edge_id: finds a command's partition by id alone."""
        return f"{self.namespace}:cmdidx:{check_id(command_id)}"

    def grants(self, user: str) -> str:
        """HASH edge_id (or `*`) -> comma-separated permissions (the `{auth}` tag)."""
        return f"{self.namespace}:{{auth}}:grants:{opaque_part(user)}"

    def group(self, name: str) -> str:
        """SET of the edges in a site group (grants on `group:NAME` cover them)."""
        return f"{self.namespace}:{{auth}}:group:{check_id(name)}"

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
