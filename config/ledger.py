"""What the ledger is configured with: shared by the settings that build it and the
ledger that reads it, so the settings need nothing above the ground floor."""

from __future__ import annotations

from dataclasses import dataclass

from config.durations import DAY_S, HOUR_S


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    namespace: str = "dispatch"
    partitions: int = 16
    ack_timeout_ms: int = 10_000
    default_expiry_s: int = DAY_S
    state_ttl_s: int = 7 * DAY_S
    presence_ttl_ms: int = 30_000
    delivery_batch: int = 100
    # Tests only: shifts the scripts' clock (Redis TIME cannot be advanced). Every
    # process of a namespace must use the same value; production leaves it at 0.
    clock_offset_ms: int = 0


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    log_retain_s: int = DAY_S  # keep at least this much of each log for replay
    edge_retain_s: int = HOUR_S  # and of each edge's delivery stream
    interval_s: float = 60.0  # how often the projector runs retention

    def __post_init__(self) -> None:
        if self.log_retain_s < 0 or self.edge_retain_s < 0 or self.interval_s <= 0:
            raise ValueError(
                f"retention needs log_retain_s >= 0, edge_retain_s >= 0 and interval_s > 0; "
                f"got {self.log_retain_s}, {self.edge_retain_s}, {self.interval_s}"
            )
