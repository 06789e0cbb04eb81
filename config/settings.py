"""Deployment settings from `DISPATCH_*` environment variables (flags override them).

Settings are validated when built: a bad value fails at start-up with a message naming
the variable, the value and what to do, never later in the middle of a command.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.durations import DAY_S
from config.ledger import LedgerConfig, RetentionConfig
from config.sections import same_named

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/test"
MIN_SECRET_BYTES = 32
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
# The ledger and retention settings default to what their configs default to.
_LEDGER = LedgerConfig()
_RETENTION = RetentionConfig()


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and says what to do."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    redis_cluster: bool = False  # DISPATCH_REDIS_CLUSTER=1: the URL names a cluster node
    database_url: str = DEFAULT_DATABASE_URL
    jwt_secret: str = ""
    namespace: str = _LEDGER.namespace
    partitions: int = _LEDGER.partitions
    host: str = "127.0.0.1"
    port: int = 8000
    # The ledger's timings (config/ledger.py holds their defaults).
    ack_timeout_ms: int = _LEDGER.ack_timeout_ms
    default_expiry_s: int = _LEDGER.default_expiry_s
    state_ttl_s: int = _LEDGER.state_ttl_s
    presence_ttl_ms: int = _LEDGER.presence_ttl_ms
    max_message_bytes: int = 64 * 1024
    clock_skew_s: int = 60
    allowed_origins: tuple[str, ...] = ()
    jwt_issuer: str = ""
    jwt_audience: str = ""
    gateway_id: str = ""
    # User tokens: HS256 with DISPATCH_JWT_SECRET (Django SimpleJWT) and/or RS256/ES256
    # with public keys from a JWKS file or URL.
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwks_file: str = ""
    jwks_url: str = ""
    jwks_ttl_s: int = 300
    jwks_min_refresh_s: int = 10  # unknown key ids fetch the set again at most this often
    jwt_leeway_s: int = 10
    jwt_max_lifetime_s: int = 7 * DAY_S
    # Edge credentials are HS256 with their own secret (default: DISPATCH_JWT_SECRET), so
    # whoever holds the users' signing key need not be able to impersonate edges.
    edge_jwt_secret: str = ""
    edge_max_lifetime_s: int = 2 * 366 * DAY_S
    # Commands per second and burst, per user, per edge and for the whole deployment
    # (0 per second switches that scope off).
    rate_user_per_s: float = 20.0
    rate_user_burst: int = 40
    rate_edge_per_s: float = 20.0
    rate_edge_burst: int = 40
    rate_global_per_s: float = 2000.0
    rate_global_burst: int = 4000
    # Frames queued for one client before it counts as too slow and is disconnected.
    outbox_frames: int = 1000
    # Kernel send buffer per connection in bytes (0: the kernel autotunes, up to MiBs).
    socket_send_buffer_bytes: int = 0
    # Handshake limits (docs/security.md, "Handshake limits"). Request heads: longest
    # request or header line, whole head, header count, and the time to send it all.
    http_max_line_bytes: int = 8192
    http_max_head_bytes: int = 32 * 1024
    http_max_headers: int = 100
    handshake_timeout_s: float = 10.0
    # Refused handshakes per client address before it is answered 429 (0/s: off), and the
    # window in which its throttled refusals are summarised by one audit entry.
    handshake_refusals_per_s: float = 1.0
    handshake_refusal_burst: int = 30
    handshake_summary_window_s: float = 60.0
    # Dashboard connections one user may hold on one gateway (0: no cap).
    max_sockets_per_user: int = 16
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated
    # addresses or networks, `*` for any); none by default, so clients cannot pose as
    # another address in the audit.
    forwarded_allow_ips: tuple[str, ...] = ()
    # The `kid` HS256 user tokens may carry (empty: an HS256 token with any `kid` is
    # refused, as SimpleJWT sets none).
    jwt_key_id: str = ""
    # Retention (docs/operations.md): kept at least this long even when acknowledged.
    retain_log_s: int = _RETENTION.log_retain_s
    retain_edge_s: int = _RETENTION.edge_retain_s
    retention_interval_s: int = int(_RETENTION.interval_s)
    # Audit projection (docs/audit.md): the writer role's own login (else the admin URL
    # plus SET ROLE), the prefix of the roles, and how long events are kept.
    projector_database_url: str = ""
    db_role_prefix: str = ""
    audit_retention_days: int = 400
    # Observability (docs/operations.md "Metrics"): the lifecycle step metrics and the
    # gateway's transition log lines (which need them), how often each
    # gateway reads Redis for the fleet gauges, and per-edge series for the N edges with
    # the longest queues / largest clock offsets (0: no per-edge series at all).
    metrics_lifecycle: bool = True
    log_transitions: bool = True  # one `command.transition` line per lifecycle event
    metrics_interval_s: float = 15.0
    metrics_top_edges: int = 0
    # The projector's own Prometheus endpoint (127.0.0.1:PORT/metrics; 0 = not served):
    # quarantined log entries are counted there (docs/audit.md).
    projector_metrics_port: int = 0
    # How often the projector compares the logs it holds with the audit tables (besides
    # at start and after a Redis restart or failover; docs/audit.md "Reconciliation").
    reconcile_interval_s: float = 30.0
    # The hot path (docs/protocol.md, docs/performance.md). A frame the ledger cannot
    # handle within `ledger_wait_s` (Redis down or slow) is answered `unavailable` then.
    ledger_wait_s: float = 2.0
    # Commands handed to one edge and not yet accepted by it; the rest waits in Redis.
    edge_inflight: int = 32
    # Commands one dashboard session follows (sent or subscribed) at most; oldest go first.
    follow_limit: int = 10_000

    def __post_init__(self) -> None:
        for name, scheme in (
            ("redis_url", ("redis", "rediss", "unix")),
            ("database_url", ("postgresql", "postgres")),
            ("projector_database_url", ("postgresql", "postgres")),
        ):
            value = getattr(self, name)
            if name == "projector_database_url" and not value:
                continue
            if urlsplit(value).scheme not in scheme:
                raise SettingsError(
                    f"DISPATCH_{name.upper()}={value!r} is not a {scheme[0]}:// URL; "
                    f"set it like {DEFAULT_REDIS_URL if name == 'redis_url' else DEFAULT_DATABASE_URL}"
                )
        positive = (
            "partitions",
            "port",
            "ack_timeout_ms",
            "default_expiry_s",
            "state_ttl_s",
            "presence_ttl_ms",
            "max_message_bytes",
            "retention_interval_s",
            "audit_retention_days",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(
                    f"DISPATCH_{name.upper()} must be positive, got {getattr(self, name)}"
                )
        if not 0 < self.reconcile_interval_s < float("inf"):
            raise SettingsError(
                f"DISPATCH_RECONCILE_INTERVAL_S={self.reconcile_interval_s} must be a positive "
                "number of seconds"
            )
        if not 0 < self.metrics_interval_s < float("inf"):
            raise SettingsError(
                f"DISPATCH_METRICS_INTERVAL_S={self.metrics_interval_s} must be a positive number of seconds"
            )
        if not 0 <= self.metrics_top_edges <= 1000:
            raise SettingsError(
                f"DISPATCH_METRICS_TOP_EDGES={self.metrics_top_edges} must be 0..1000: it bounds "
                "how many per-edge series /metrics carries"
            )
        if not 0 <= self.projector_metrics_port <= 65535:
            raise SettingsError(
                f"DISPATCH_PROJECTOR_METRICS_PORT={self.projector_metrics_port} must be a port "
                "(1-65535), or 0 to serve no metrics"
            )
        if self.port > 65535:
            raise SettingsError(f"DISPATCH_PORT must be at most 65535, got {self.port}")
        if self.socket_send_buffer_bytes < 0:
            raise SettingsError("DISPATCH_SOCKET_SEND_BUFFER_BYTES must be 0 (auto) or positive")
        for name in (
            "jwks_ttl_s",
            "jwks_min_refresh_s",
            "jwt_max_lifetime_s",
            "edge_max_lifetime_s",
            "outbox_frames",
            "edge_inflight",
            "follow_limit",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(
                    f"DISPATCH_{name.upper()} must be positive, got {getattr(self, name)}"
                )
        if not 0 <= self.jwt_leeway_s <= 300:
            raise SettingsError(
                f"DISPATCH_JWT_LEEWAY_S={self.jwt_leeway_s} must be between 0 and 300 seconds; "
                "a leeway is for clock skew, not for extending tokens"
            )
        if not 0 < self.ledger_wait_s <= 60:
            raise SettingsError(
                f"DISPATCH_LEDGER_WAIT_S={self.ledger_wait_s} must be above 0 and at most 60 "
                "seconds (how long a frame may wait for Redis before it is answered unavailable)"
            )
        self._check_algorithms()
        self._check_rates()
        self._check_handshake_limits()

    def _check_algorithms(self) -> None:
        unknown = [a for a in self.jwt_algorithms if a not in JWT_ALGORITHMS]
        if unknown or not self.jwt_algorithms:
            raise SettingsError(
                f"DISPATCH_JWT_ALGORITHMS={','.join(self.jwt_algorithms)!r} is not accepted; "
                f"use a comma-separated subset of {', '.join(JWT_ALGORITHMS)} ('none' never is)"
            )
        asymmetric = [a for a in self.jwt_algorithms if a != "HS256"]
        if asymmetric and not (self.jwks_file or self.jwks_url):
            raise SettingsError(
                f"DISPATCH_JWT_ALGORITHMS includes {', '.join(asymmetric)} but neither "
                "DISPATCH_JWKS_FILE nor DISPATCH_JWKS_URL is set; say where the public keys are"
            )
        if self.jwks_file and self.jwks_url:
            raise SettingsError("set DISPATCH_JWKS_FILE or DISPATCH_JWKS_URL, not both")
        if self.jwks_url and urlsplit(self.jwks_url).scheme not in ("https", "http"):
            raise SettingsError(f"DISPATCH_JWKS_URL={self.jwks_url!r} is not an http(s) URL")

    def _check_rates(self) -> None:
        for scope in ("user", "edge", "global"):
            per_s = getattr(self, f"rate_{scope}_per_s")
            burst = getattr(self, f"rate_{scope}_burst")
            if not (per_s >= 0 and per_s < float("inf")):  # also refuses NaN
                raise SettingsError(
                    f"DISPATCH_RATE_{scope.upper()}_PER_S={per_s} must be a finite number >= 0 "
                    "(0 switches the limit off)"
                )
            if per_s > 0 and burst < 1:
                raise SettingsError(
                    f"DISPATCH_RATE_{scope.upper()}_BURST={burst} must be at least 1 "
                    f"while DISPATCH_RATE_{scope.upper()}_PER_S is {per_s}"
                )

    def _check_handshake_limits(self) -> None:
        if not 1024 <= self.http_max_line_bytes <= 8192:
            raise SettingsError(
                f"DISPATCH_HTTP_MAX_LINE_BYTES={self.http_max_line_bytes} must be between 1024 "
                "and 8192 (the WebSocket layer refuses longer lines itself)"
            )
        if self.http_max_head_bytes < self.http_max_line_bytes:
            raise SettingsError(
                f"DISPATCH_HTTP_MAX_HEAD_BYTES={self.http_max_head_bytes} must be at least "
                f"DISPATCH_HTTP_MAX_LINE_BYTES ({self.http_max_line_bytes})"
            )
        if not 8 <= self.http_max_headers <= 128:
            raise SettingsError(
                f"DISPATCH_HTTP_MAX_HEADERS={self.http_max_headers} must be between 8 and 128"
            )
        if not 0 < self.handshake_timeout_s <= 300:
            raise SettingsError(
                f"DISPATCH_HANDSHAKE_TIMEOUT_S={self.handshake_timeout_s} must be above 0 and "
                "at most 300 seconds"
            )
        per_s = self.handshake_refusals_per_s
        if not (per_s >= 0 and per_s < float("inf")) or (
            per_s > 0 and self.handshake_refusal_burst < 1
        ):
            raise SettingsError(
                f"DISPATCH_HANDSHAKE_REFUSALS_PER_S={per_s} must be a finite number >= 0 "
                "(0 switches the throttle off), with DISPATCH_HANDSHAKE_REFUSAL_BURST >= 1"
            )
        if not self.handshake_summary_window_s > 0:
            raise SettingsError("DISPATCH_HANDSHAKE_SUMMARY_WINDOW_S must be positive")
        if self.max_sockets_per_user < 0:
            raise SettingsError("DISPATCH_MAX_SOCKETS_PER_USER must be 0 (no cap) or positive")

    @property
    def edge_secret(self) -> str:
        """The key edge credentials are signed and checked with."""
        return self.edge_jwt_secret or self.jwt_secret

    def ledger(self) -> LedgerConfig:
        return same_named(LedgerConfig, self, defaults=("delivery_batch", "clock_offset_ms"))

    def retention(self) -> RetentionConfig:
        for name in ("retain_log_s", "retain_edge_s"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"DISPATCH_{name.upper()} must be 0 or more, got {getattr(self, name)}"
                )
        return RetentionConfig(
            log_retain_s=self.retain_log_s,
            edge_retain_s=self.retain_edge_s,
            interval_s=self.retention_interval_s,
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"DISPATCH_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            parse = _PARSERS.get(str(f.type))
            if parse is not None:
                values[f.name] = parse(f"DISPATCH_{f.name.upper()}", raw)
            elif f.type == "tuple[str, ...]":
                values[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
            else:
                values[f.name] = raw
        if not values.get("jwt_secret"):
            values["jwt_secret"] = load_secret(env)
        elif len(values["jwt_secret"].encode()) < MIN_SECRET_BYTES:
            print(
                f"dispatch: warning: DISPATCH_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes; "
                "HS256 tokens signed with it can be brute-forced. Use a long random secret.",
                file=sys.stderr,
            )
        edge_secret = values.get("edge_jwt_secret", "")
        if edge_secret and len(edge_secret.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"DISPATCH_EDGE_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes; "
                "use a long random secret"
            )
        return cls(**values)


def _number(kind: type[int] | type[float], what: str) -> Callable[[str, str], Any]:
    def parse(name: str, raw: str) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not {what}") from None

    return parse


def _flag(name: str, raw: str) -> bool:
    if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise SettingsError(f"{name}={raw!r} is not a yes/no value (use 1 or 0)")
    return raw.lower() in ("1", "true", "yes")


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "int": _number(int, "a whole number"),
    "float": _number(float, "a number"),
    "bool": _flag,
}


def secret_file(env: Mapping[str, str]) -> Path:
    if env.get("DISPATCH_JWT_SECRET_FILE"):
        return Path(env["DISPATCH_JWT_SECRET_FILE"])
    state = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "dispatch" / "jwt-secret"


def load_secret(env: Mapping[str, str]) -> str:
    """The signing secret: DISPATCH_JWT_SECRET, else a file (created for development)."""
    path = secret_file(env)
    if path.exists():
        secret = path.read_text().strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        print(
            f"dispatch: DISPATCH_JWT_SECRET is not set; generated a development secret in {path}. "
            "Set DISPATCH_JWT_SECRET in production.",
            file=sys.stderr,
        )
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise SettingsError(
            f"the JWT secret in {path} is shorter than {MIN_SECRET_BYTES} bytes; "
            "use a longer random secret (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    return secret
