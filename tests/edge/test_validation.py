"""The pure validator: each check names its cause; 1,000 random commands never crash it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.capabilities import SiteConfig, decode_config
from edge.errors import ConfigError
from edge.frames import BadFrame, Notice, decode_frame
from edge.validation import ModePlan, Rejection, SchedulePlan, SystemPlan, WritePlan, validate
from schemas.commands import CommandType, EdgeCommand
from schemas.errors import ErrorCode

from edge_testkit import EDGE_ID, command, demo_config

NOW = datetime(2026, 2, 15, 14, 30, tzinfo=UTC)
SITE = decode_config(demo_config())


def check(body: dict[str, Any], *, now: datetime = NOW, skew_s: float = 5) -> Any:
    body = {**body, "timestamp": NOW.isoformat()}
    body.setdefault("expires_at", (NOW + timedelta(seconds=300)).isoformat())
    cmd = msgspec.convert(body, EdgeCommand)
    return validate(cmd, SITE, now, edge_id=EDGE_ID, skew_s=skew_s)


def setpoint(**kw: Any) -> dict[str, Any]:
    body = command("cmd_1", **kw)
    body.pop("expires_at")
    return body


def test_the_spec_example_becomes_a_write_plan() -> None:
    assert check(setpoint()) == WritePlan(
        device_id="bms_main", channel="SetActivePower", value=50000.0
    )


def test_kilowatts_convert_to_watts() -> None:
    plan = check(setpoint(value=50, unit="kW"))
    assert isinstance(plan, WritePlan)
    assert plan.value == 50000.0


def test_a_value_without_unit_is_taken_in_the_channel_unit() -> None:
    assert isinstance(check(setpoint(value=-100000, unit=None)), WritePlan)


@pytest.mark.parametrize(
    ("overrides", "code", "needle"),
    [
        ({"edge_id": "other_edge"}, ErrorCode.WRONG_EDGE, "other_edge"),
        ({"device_id": "inverter_9"}, ErrorCode.UNKNOWN_DEVICE, "inverter_9"),
        ({"channel": "Voltage"}, ErrorCode.UNKNOWN_CHANNEL, "Voltage"),
        ({"channel": "Soc", "unit": "%", "value": 10}, ErrorCode.NOT_WRITABLE, "read-only"),
        ({"value": "fast"}, ErrorCode.WRONG_TYPE, "'fast'"),
        ({"value": True}, ErrorCode.WRONG_TYPE, "True"),
        ({"unit": "A"}, ErrorCode.WRONG_UNIT, "'A'"),
        ({"unit": "furlong"}, ErrorCode.WRONG_UNIT, "furlong"),
        ({"value": 100001}, ErrorCode.OUT_OF_RANGE, "100001"),
        ({"value": 101, "unit": "kW"}, ErrorCode.OUT_OF_RANGE, "101000"),
        ({"value": 0.5}, ErrorCode.WRONG_TYPE, "resolution"),
        ({"channel": "MinSoc", "unit": "%", "value": 101}, ErrorCode.OUT_OF_RANGE, "0 … 100"),
        ({"device_id": "core"}, ErrorCode.WRONG_TARGET, "core"),
    ],
)
def test_each_failed_check_names_its_cause(
    overrides: dict[str, Any], code: ErrorCode, needle: str
) -> None:
    verdict = check(setpoint(**overrides))
    assert isinstance(verdict, Rejection)
    assert verdict.code is code
    assert needle in verdict.message


def test_expiry_allows_the_clock_skew_tolerance() -> None:
    body = setpoint()
    body["expires_at"] = (NOW - timedelta(seconds=4)).isoformat()
    assert isinstance(check(body, skew_s=5), WritePlan)
    verdict = check(body, skew_s=3)
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.EXPIRED
    assert "expired at" in verdict.message


def test_config_override_needs_a_duration() -> None:
    body = setpoint(command_type="config_override", channel="MinSoc", unit="%", value=15)
    verdict = check(body)
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.INVALID_COMMAND
    body["duration_sec"] = 3600
    assert check(body) == WritePlan(
        device_id="bms_main", channel="MinSoc", value=15.0, override_s=3600
    )


def test_mode_change_scheduler_control_and_system() -> None:
    core = {"device_id": "core", "unit": None}
    assert check(
        setpoint(command_type="mode_change", channel="peak_shaving", value="enabled", **core)
    ) == ModePlan(controller="peak_shaving", mode="enabled")
    verdict = check(
        setpoint(command_type="mode_change", channel="peak_shaving", value="turbo", **core)
    )
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.UNKNOWN_MODE
    assert "disabled, enabled" in verdict.message
    verdict = check(setpoint(command_type="mode_change", channel="cooling", value="on", **core))
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.UNKNOWN_CONTROLLER
    assert check(
        setpoint(command_type="scheduler_control", channel="balancing", value="stop", **core)
    ) == SchedulePlan(controller="balancing", run=False)
    verdict = check(setpoint(command_type="scheduler_control", value="start"))
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.WRONG_TARGET
    assert check(
        setpoint(command_type="system", channel="system", value="sync_config", **core)
    ) == SystemPlan(action="sync_config")
    verdict = check(setpoint(command_type="system", channel="system", value="reboot", **core))
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.WRONG_TYPE


# -- 1,000 random commands ------------------------------------------------------------------
names = st.sampled_from(
    ["bms_main", "core", "system", "SetActivePower", "MinSoc", "Soc", "peak_shaving",
     "balancing", "x", "inverter_9"]
)  # fmt: skip
values = st.one_of(
    st.integers(min_value=-(10**13), max_value=10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["enabled", "disabled", "start", "stop", "restart", "sync_config", "", "x"]),
    st.text(max_size=20),
)
commands = st.builds(
    lambda kind, edge, device, channel, value, unit, priority, duration, expires_in: {
        "command_id": "cmd_random",
        "command_type": kind,
        "target": {"edge_id": edge, "device_id": device, "channel": channel},
        "value": value,
        "unit": unit,
        "expiry_sec": 300,
        "source": "fuzz",
        "priority": priority,
        "duration_sec": duration,
        "expires_at": (NOW + timedelta(seconds=expires_in)).isoformat(),
    },
    st.sampled_from([t.value for t in CommandType]),
    st.sampled_from([EDGE_ID, EDGE_ID, "elsewhere"]),
    names,
    names,
    values,
    st.one_of(st.none(), st.sampled_from(["W", "kW", "MW", "%", "A", "kWh", "", "bananas"])),
    st.sampled_from(["normal", "emergency"]),
    st.one_of(st.none(), st.integers(min_value=-10, max_value=10**6)),
    st.integers(min_value=-1000, max_value=1000),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands)
def test_random_commands_never_crash_and_every_rejection_names_its_cause(
    body: dict[str, Any],
) -> None:
    if body["unit"] is None:
        del body["unit"]
    if body["duration_sec"] is None:
        del body["duration_sec"]
    verdict = check(body)
    assert isinstance(verdict, WritePlan | ModePlan | SchedulePlan | SystemPlan | Rejection)
    if isinstance(verdict, Rejection):
        assert verdict.code in set(ErrorCode)
        assert len(verdict.message) > 10
    elif isinstance(verdict, WritePlan):
        channel = SITE.device(verdict.device_id).channel(verdict.channel)  # type: ignore[union-attr]
        assert channel is not None and channel.writable
        assert channel.min is not None and channel.max is not None
        assert channel.min <= verdict.value <= channel.max


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.dictionaries(st.text(max_size=12), st.integers() | st.text(max_size=8),
                                 max_size=6).map(msgspec.json.encode)))  # fmt: skip
def test_random_frames_are_classified_never_raised(raw: bytes) -> None:
    assert isinstance(decode_frame(raw), EdgeCommand | Notice | BadFrame)


def test_frames() -> None:
    assert isinstance(decode_frame(b'{"type":"ack_refused","command_id":"c1"}'), Notice)
    bad = decode_frame(b'{"command_id":"c1","command_type":"dance"}')
    assert isinstance(bad, BadFrame)
    assert bad.command_id == "c1"
    assert isinstance(decode_frame(b"[1,2"), BadFrame)
    cmd = decode_frame(msgspec.json.encode({"delivery": 2, **command("c9")}))
    assert isinstance(cmd, EdgeCommand)
    assert cmd.delivery == 2


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"\$\.devices\[0\]\.port"):
        decode_config(b'{"version":"1","edge_id":"e","devices":[{"device_id":"d","port":0}]}')
    with pytest.raises(ConfigError, match=r"min 5\.0 is above max 1\.0"):
        decode_config(
            b'{"version":"1","edge_id":"e","devices":[{"device_id":"d","channels":'
            b'[{"name":"c","data_type":"int16","address":0,"min":5,"max":1}]}]}'
        )
    with pytest.raises(ConfigError, match="not JSON"):
        decode_config(b"{")
    site: SiteConfig = SITE.with_address("bms_main", "10.0.0.5", 502)
    assert site.device("bms_main").port == 502  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="does not have"):
        SITE.with_address("nope", "h", 1)


def test_an_override_longer_than_the_maximum_is_out_of_range() -> None:
    body = command("ov", "config_override", channel="MinSoc", value=15, unit="%",
                   duration_sec=10 * 365 * 86400)  # fmt: skip
    body.pop("expires_at")
    verdict = check(body)
    assert isinstance(verdict, Rejection)
    assert verdict.code is ErrorCode.OUT_OF_RANGE
    assert "exceeds the maximum 86400 s for bms_main.MinSoc" in verdict.message
    assert isinstance(check({**body, "duration_sec": 86400}), WritePlan)
    # The agent's maximum is a setting; a channel may set a stricter (or looser) one.
    cmd = msgspec.convert({**body, "timestamp": NOW.isoformat(),
                           "expires_at": (NOW + timedelta(seconds=300)).isoformat()},
                          EdgeCommand)  # fmt: skip
    short = validate(cmd, SITE, NOW, edge_id=EDGE_ID, skew_s=5, max_override_s=3600)
    assert isinstance(short, Rejection) and "maximum 3600 s" in short.message
    raw = msgspec.json.decode(demo_config())
    raw["devices"][0]["channels"][1]["max_override_s"] = 60
    site = decode_config(msgspec.json.encode(raw))
    per_channel = validate(
        msgspec.structs.replace(cmd, duration_sec=61), site, NOW, edge_id=EDGE_ID, skew_s=5
    )
    assert isinstance(per_channel, Rejection) and "maximum 60 s" in per_channel.message


def test_expiry_follows_the_handed_over_lifetime_not_the_wall_clock() -> None:
    body = setpoint(expiry_sec=30)
    body["expires_at"] = (NOW + timedelta(seconds=30)).isoformat()
    cmd = msgspec.convert({**body, "timestamp": NOW.isoformat()}, EdgeCommand)
    ahead = NOW + timedelta(minutes=5)  # the edge's wall clock is 5 min ahead
    assert isinstance(validate(cmd, SITE, ahead, edge_id=EDGE_ID, skew_s=5), Rejection)
    plan = validate(cmd, SITE, ahead, edge_id=EDGE_ID, skew_s=5, remaining_s=29.9)
    assert isinstance(plan, WritePlan)
    late = validate(cmd, SITE, NOW, edge_id=EDGE_ID, skew_s=5, remaining_s=-0.5)
    assert isinstance(late, Rejection) and late.code is ErrorCode.EXPIRED
    assert "expired 0.500 s ago" in late.message
    # A clock beyond the limit refuses control, but not `system` (sync_config must work).
    skewed = validate(cmd, SITE, NOW, edge_id=EDGE_ID, skew_s=5, clock_problem="off by 300 s")
    assert isinstance(skewed, Rejection) and skewed.code is ErrorCode.CLOCK_SKEW
    sync = msgspec.convert(
        {**command("s1", "system", device_id="core", channel="system", value="sync_config",
                   unit=None), "timestamp": NOW.isoformat()},
        EdgeCommand,
    )  # fmt: skip
    assert isinstance(
        validate(sync, SITE, NOW, edge_id=EDGE_ID, skew_s=5, clock_problem="off"), SystemPlan
    )


def test_unparseable_frames_still_name_their_command() -> None:
    nan = b'{"command_id":"nan_1","command_type":"setpoint","value":NaN}'
    bad = decode_frame(nan)
    assert isinstance(bad, BadFrame) and bad.command_id == "nan_1"
    assert "not valid JSON" in bad.message
    cut = decode_frame(b'{"delivery":1, "command_id" : "cut_1", "command_type": "setp')
    assert isinstance(cut, BadFrame) and cut.command_id == "cut_1"
    long_id = decode_frame(msgspec.json.encode(command("x" * 300)))
    assert isinstance(long_id, BadFrame) and long_id.command_id is None
    assert isinstance(decode_frame(b"garbage"), BadFrame)
    wrong = decode_frame(b'{"command_id":"wt_1","command_type":"setpoint","target":"bms"}')
    assert isinstance(wrong, BadFrame) and wrong.command_id == "wt_1"
    trailing = decode_frame(b'{"command_id":"cmd_1\\n","command_type":"x"')
    assert isinstance(trailing, BadFrame) and trailing.command_id is None
