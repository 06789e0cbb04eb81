"""The pure validator: command + capabilities + now -> a plan to execute, or a rejection.

No I/O. Every rejection carries the ErrorCode of the first check that failed and a
message that quotes the value and says what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from msgspec import Struct

from config.durations import DAY_S, HOUR_S
from edge.capabilities import RAW_LIMITS, Channel, DataType, Device, SiteConfig
from schemas.commands import CORE_DEVICE, SYSTEM_CHANNEL, CommandType, EdgeCommand, Target
from schemas.errors import ErrorCode

# Units the validator converts between: unit -> (base unit, factor to the base). Each base
# unit takes the SI prefixes devices use for it; time also comes in minutes and hours.
_PREFIXES = {"": 1.0, "k": 1e3, "M": 1e6, "m": 1e-3}
UNITS: dict[str, tuple[str, float]] = {
    prefix + base: (base, _PREFIXES[prefix])
    for base, prefixes in (
        ("W", "kM"),
        ("Wh", "kM"),
        ("var", "k"),
        ("VA", "k"),
        ("V", "km"),
        ("A", "m"),
        ("Hz", ""),
        ("%", ""),
        ("s", ""),
    )
    for prefix in ("", *prefixes)
} | {"min": ("s", 60.0), "h": ("s", float(HOUR_S))}
# Relative tolerance when a converted value must land on a whole raw register value.
_INTEGRAL_TOLERANCE = 1e-6


class WritePlan(Struct, frozen=True, kw_only=True, tag="write"):
    """Write `value` (in the channel's unit) to a device channel; an override reverts later."""

    device_id: str
    channel: str
    value: float
    override_s: int | None = None


class ModePlan(Struct, frozen=True, kw_only=True, tag="mode"):
    controller: str
    mode: str


class SchedulePlan(Struct, frozen=True, kw_only=True, tag="schedule"):
    controller: str
    run: bool


class SystemPlan(Struct, frozen=True, kw_only=True, tag="system"):
    action: Literal["restart", "sync_config"]


Plan = WritePlan | ModePlan | SchedulePlan | SystemPlan


class Rejection(Struct, frozen=True):
    code: ErrorCode
    message: str


DEFAULT_MAX_OVERRIDE_S = DAY_S


def validate(
    cmd: EdgeCommand,
    site: SiteConfig,
    now: datetime,
    *,
    edge_id: str,
    skew_s: float,
    remaining_s: float | None = None,
    clock_problem: str | None = None,
    max_override_s: float = DEFAULT_MAX_OVERRIDE_S,
) -> Plan | Rejection:
    """Check a command against the site's capabilities; the first failed check wins.

    `remaining_s`: the lifetime left by the edge's monotonic clock, from the gateway's
    `remaining_ms` (absent from older gateways: then `expires_at` + `skew_s` on the wall
    clock `now`). `clock_problem`: why the edge's clock cannot be trusted (offset past
    the limit), which refuses every command but `system` with `clock_skew`.
    """
    if cmd.target.edge_id != edge_id:
        return Rejection(
            ErrorCode.WRONG_EDGE,
            f"command is for edge {cmd.target.edge_id!r} but this is {edge_id!r}",
        )
    kind = cmd.command_type
    if clock_problem is not None and kind is not CommandType.SYSTEM:
        return Rejection(ErrorCode.CLOCK_SKEW, clock_problem)
    expired = _expired(cmd, now, skew_s, remaining_s)
    if expired is not None:
        return expired
    if kind in (CommandType.SETPOINT, CommandType.CONFIG_OVERRIDE):
        return _write(cmd, site, max_override_s)
    if kind is CommandType.MODE_CHANGE:
        return _mode(cmd, site)
    if kind is CommandType.SCHEDULER_CONTROL:
        return _schedule(cmd, site)
    return _system(cmd)


def _expired(
    cmd: EdgeCommand, now: datetime, skew_s: float, remaining_s: float | None
) -> Rejection | None:
    if remaining_s is not None:
        if remaining_s >= 0:
            return None
        return Rejection(
            ErrorCode.EXPIRED,
            f"command expired {-remaining_s:.3f} s ago by the lifetime the gateway handed "
            f"over (expires_at {cmd.expires_at.isoformat()}); send a new command",
        )
    if now - (cmd.expires_at + timedelta(seconds=skew_s)) <= timedelta(0):
        return None
    return Rejection(
        ErrorCode.EXPIRED,
        f"command expired at {cmd.expires_at.isoformat()} (now {now.isoformat()}, "
        f"clock-skew tolerance {skew_s:g} s); send a new command",
    )


def _write(cmd: EdgeCommand, site: SiteConfig, max_override_s: float) -> Plan | Rejection:
    target = cmd.target
    if target.device_id == CORE_DEVICE:
        return Rejection(
            ErrorCode.WRONG_TARGET,
            f"a {cmd.command_type.value} writes a device channel; 'core' is not a device",
        )
    device = site.device(target.device_id)
    channel = None if device is None else device.channel(target.channel)
    if device is None or channel is None:
        return _unknown_target(site, target, device)
    if not channel.writable:
        return Rejection(ErrorCode.NOT_WRITABLE, f"{device.device_id}.{channel.name} is read-only")
    if cmd.command_type is CommandType.CONFIG_OVERRIDE and (
        cmd.duration_sec is None or cmd.duration_sec <= 0
    ):
        return Rejection(
            ErrorCode.INVALID_COMMAND,
            "a config_override needs a positive `duration_sec` (how long it lasts)",
        )
    if cmd.command_type is CommandType.CONFIG_OVERRIDE and cmd.duration_sec is not None:
        limit = channel.max_override_s if channel.max_override_s is not None else max_override_s
        if cmd.duration_sec > limit:
            return Rejection(
                ErrorCode.OUT_OF_RANGE,
                f"override duration {cmd.duration_sec} s exceeds the maximum {limit:g} s "
                f"for {device.device_id}.{channel.name}; send a shorter override, or a "
                "setpoint to change the value for good",
            )
    if cmd.command_type is CommandType.SETPOINT and cmd.duration_sec is not None:
        return Rejection(
            ErrorCode.INVALID_COMMAND,
            "`duration_sec` applies to config_override only; send a config_override",
        )
    value = cmd.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Rejection(
            ErrorCode.WRONG_TYPE,
            f"channel {channel.name} takes a number, got {value!r}",
        )
    if isinstance(value, float) and not math.isfinite(value):
        return Rejection(ErrorCode.WRONG_TYPE, f"value {value!r} is not finite")
    converted = _convert(value, cmd.unit, channel)
    if isinstance(converted, Rejection):
        return converted
    problem = _range_problem(converted, channel)
    if problem is not None:
        return problem
    override_s = cmd.duration_sec if cmd.command_type is CommandType.CONFIG_OVERRIDE else None
    return WritePlan(
        device_id=device.device_id, channel=channel.name, value=converted, override_s=override_s
    )


def _convert(value: float, unit: str | None, channel: Channel) -> float | Rejection:
    if unit is None or unit == channel.unit:
        return float(value)
    have, want = UNITS.get(unit), UNITS.get(channel.unit)
    if have is None or want is None or have[0] != want[0]:
        return Rejection(
            ErrorCode.WRONG_UNIT,
            f"unit {unit!r} does not convert to channel {channel.name}'s unit "
            f"{channel.unit!r}; send the value in {channel.unit!r}",
        )
    return float(value) * have[1] / want[1]


def _range_problem(value: float, channel: Channel) -> Rejection | None:
    low = channel.min if channel.min is not None else -math.inf
    high = channel.max if channel.max is not None else math.inf
    if not low <= value <= high:
        return Rejection(
            ErrorCode.OUT_OF_RANGE,
            f"{value:g} {channel.unit} is outside {channel.name}'s limits "
            f"{_fmt(channel.min)} … {_fmt(channel.max)} {channel.unit}",
        )
    raw = value / channel.scale
    raw_low, raw_high = RAW_LIMITS[channel.data_type]
    if not raw_low <= raw <= raw_high:
        return Rejection(
            ErrorCode.OUT_OF_RANGE,
            f"{value:g} {channel.unit} does not fit {channel.name}'s {channel.data_type} register",
        )
    if channel.data_type is not DataType.FLOAT32:
        whole = round(raw)
        if abs(raw - whole) > _INTEGRAL_TOLERANCE * max(1.0, abs(raw)):
            return Rejection(
                ErrorCode.WRONG_TYPE,
                f"{value:g} {channel.unit} is not a multiple of {channel.name}'s resolution "
                f"{channel.scale:g} {channel.unit}",
            )
    return None


def _unknown_target(site: SiteConfig, target: Target, device: Device | None) -> Rejection:
    if device is None:
        known = _names(d.device_id for d in site.devices)
        where = f"config {site.version!r}"
        return Rejection(
            ErrorCode.UNKNOWN_DEVICE, f"{where} has no device {target.device_id!r} ({known})"
        )
    known = _names(c.name for c in device.channels)
    return Rejection(
        ErrorCode.UNKNOWN_CHANNEL,
        f"device {device.device_id!r} has no channel {target.channel!r} ({known})",
    )


def _names(known: Iterable[str]) -> str:
    return ", ".join(known) or "none known"


def _fmt(limit: float | None) -> str:
    return "unbounded" if limit is None else f"{limit:g}"


def _controller_target(cmd: EdgeCommand, site: SiteConfig) -> Rejection | None:
    target = cmd.target
    if target.device_id != CORE_DEVICE:
        return Rejection(
            ErrorCode.WRONG_TARGET,
            f"a {cmd.command_type.value} addresses device 'core' and a controller as channel, "
            f"not device {target.device_id!r}",
        )
    if site.controller(target.channel) is None:
        known = _names(c.name for c in site.controllers)
        return Rejection(
            ErrorCode.UNKNOWN_CONTROLLER,
            f"config {site.version!r} has no controller {target.channel!r} ({known})",
        )
    return _no_duration(cmd)


def _no_duration(cmd: EdgeCommand) -> Rejection | None:
    """Controller and system commands act at once: a `duration_sec` is a mistake."""
    if cmd.duration_sec is None:
        return None
    return Rejection(
        ErrorCode.INVALID_COMMAND,
        f"`duration_sec` does not apply to {cmd.command_type.value}",
    )


def _mode(cmd: EdgeCommand, site: SiteConfig) -> Plan | Rejection:
    problem = _controller_target(cmd, site)
    if problem is not None:
        return problem
    controller = site.controller(cmd.target.channel)
    assert controller is not None
    if not isinstance(cmd.value, str):
        return Rejection(
            ErrorCode.WRONG_TYPE,
            f"a mode_change value is a mode name ({', '.join(controller.modes)}), "
            f"got {cmd.value!r}",
        )
    if cmd.value not in controller.modes:
        return Rejection(
            ErrorCode.UNKNOWN_MODE,
            f"controller {controller.name!r} has no mode {cmd.value!r} "
            f"(modes: {', '.join(controller.modes)})",
        )
    return ModePlan(controller=controller.name, mode=cmd.value)


def _schedule(cmd: EdgeCommand, site: SiteConfig) -> Plan | Rejection:
    problem = _controller_target(cmd, site)
    if problem is not None:
        return problem
    if cmd.value not in ("start", "stop") or not isinstance(cmd.value, str):
        return Rejection(
            ErrorCode.WRONG_TYPE,
            f"a scheduler_control value is 'start' or 'stop', got {cmd.value!r}",
        )
    return SchedulePlan(controller=cmd.target.channel, run=cmd.value == "start")


def _system(cmd: EdgeCommand) -> Plan | Rejection:
    target = cmd.target
    if target.device_id != CORE_DEVICE or target.channel != SYSTEM_CHANNEL:
        return Rejection(
            ErrorCode.WRONG_TARGET,
            "a system command addresses device 'core', channel 'system', "
            f"not {target.device_id!r}/{target.channel!r}",
        )
    problem = _no_duration(cmd)
    if problem is not None:
        return problem
    if cmd.value == "restart" and isinstance(cmd.value, str):
        return SystemPlan(action="restart")
    if cmd.value == "sync_config" and isinstance(cmd.value, str):
        return SystemPlan(action="sync_config")
    return Rejection(
        ErrorCode.WRONG_TYPE,
        f"a system command value is 'restart' or 'sync_config', got {cmd.value!r}",
    )
