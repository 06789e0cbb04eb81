"""The edge agent's exceptions: one base, each message says what was wrong and what to do."""

from __future__ import annotations

from schemas.errors import ErrorCode


class EdgeError(Exception):
    """Base of every error the edge agent raises on purpose."""


class ConfigError(EdgeError):
    """A capability config or an agent setting is missing or malformed."""


class DeviceError(EdgeError):
    """A device refused, did not answer, or answered something unexpected."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StateDirBusy(EdgeError):
    """Another agent process holds the state directory."""
