"""Deployment settings from `DISPATCH_*` environment variables (flags override them).

Settings are validated when built: a bad value fails at start-up with a message naming
the variable, the value and what to do, never later in the middle of a command.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ledger.store import LedgerConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/test"
MIN_SECRET_BYTES = 32


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and says what to do."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    jwt_secret: str = ""
    namespace: str = "dispatch"
    partitions: int = 16
    host: str = "127.0.0.1"
    port: int = 8000
    ack_timeout_ms: int = 10_000
    default_expiry_s: int = 86_400
    state_ttl_s: int = 7 * 86_400
    presence_ttl_ms: int = 30_000
    max_message_bytes: int = 64 * 1024
    clock_skew_s: int = 60
    allowed_origins: tuple[str, ...] = ()
    jwt_issuer: str = ""
    jwt_audience: str = ""
    gateway_id: str = ""
    # Audit projection (docs/audit.md): the writer role's own login (else the admin URL
    # plus SET ROLE), the prefix of the roles, and how long events are kept.
    projector_database_url: str = ""
    db_role_prefix: str = ""
    audit_retention_days: int = 400

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
            "audit_retention_days",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(
                    f"DISPATCH_{name.upper()} must be positive, got {getattr(self, name)}"
                )
        if self.port > 65535:
            raise SettingsError(f"DISPATCH_PORT must be at most 65535, got {self.port}")

    def ledger(self) -> LedgerConfig:
        return LedgerConfig(
            namespace=self.namespace,
            partitions=self.partitions,
            ack_timeout_ms=self.ack_timeout_ms,
            default_expiry_s=self.default_expiry_s,
            state_ttl_s=self.state_ttl_s,
            presence_ttl_ms=self.presence_ttl_ms,
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
            if f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(
                        f"DISPATCH_{f.name.upper()}={raw!r} is not a whole number"
                    ) from None
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
        return cls(**values)


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
