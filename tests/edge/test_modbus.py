"""The Modbus adapter against a real pymodbus server (the simulated BMS)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from pymodbus.client import AsyncModbusTcpClient

from edge.capabilities import Channel, DataType, Device, decode_config
from edge.errors import DeviceError
from edge.modbus import ModbusDevices, decode, encode
from edge.simulator import BmsSimulator, BmsState
from schemas.errors import ErrorCode

from edge_testkit import demo_config
from support import free_port


def demo_device(port: int, **changes: object) -> Device:
    site = decode_config(demo_config()).with_address("bms_main", "127.0.0.1", port)
    device = site.device("bms_main")
    assert device is not None
    if changes:
        device = msgspec.structs.replace(device, **changes)
    return device


def channel(device: Device, name: str) -> Channel:
    found = device.channel(name)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("data_type", "word_order", "scale", "value", "registers"),
    [
        (DataType.INT32, "big", 1.0, 50000, [0, 50000]),
        (DataType.INT32, "little", 1.0, 50000, [50000, 0]),
        (DataType.INT32, "big", 1.0, -1, [0xFFFF, 0xFFFF]),
        (DataType.UINT32, "big", 1.0, 70000, [1, 4464]),
        (DataType.INT16, "big", 0.1, -12.5, [0xFF83]),
        (DataType.UINT16, "big", 10.0, 500, [50]),
        (DataType.FLOAT32, "big", 1.0, -1.5, [0xBFC0, 0]),
        (DataType.FLOAT32, "little", 1.0, -1.5, [0, 0xBFC0]),
    ],
)
def test_encode_decode_types_scales_and_word_orders(
    data_type: DataType, word_order: str, scale: float, value: float, registers: list[int]
) -> None:
    ch = Channel(
        name="c",
        data_type=data_type,
        address=0,
        word_order=word_order,
        scale=scale,  # type: ignore[arg-type]
    )
    assert encode(ch, value) == registers
    assert decode(ch, registers) == pytest.approx(value)


async def test_write_reads_back_from_an_independent_client(bms: BmsSimulator) -> None:
    device = demo_device(bms.port)
    devices = ModbusDevices()
    try:
        await devices.write(device, channel(device, "SetActivePower"), 50000)
        await devices.write(device, channel(device, "MinSoc"), 15)
        assert await devices.read(device, channel(device, "Soc")) == 50
    finally:
        await devices.close()
    client = AsyncModbusTcpClient("127.0.0.1", port=bms.port, timeout=2)
    await client.connect()
    try:
        response = await client.read_holding_registers(0, count=3, device_id=1)
        assert response.registers == [0, 50000, 15]
        assert client.convert_from_registers(response.registers[:2], client.DATATYPE.INT32) == 50000
    finally:
        client.close()


async def test_a_refused_write_is_a_device_error_naming_the_modbus_exception() -> None:
    simulator = BmsSimulator(state=BmsState(power_limit_w=40_000))
    port = await simulator.start()
    device = demo_device(port)
    devices = ModbusDevices()
    try:
        with pytest.raises(DeviceError) as caught:
            await devices.write(device, channel(device, "SetActivePower"), 50000)
        assert caught.value.code is ErrorCode.DEVICE_ERROR
        assert "Modbus exception 3 (illegal data value)" in caught.value.message
        assert simulator.active_power_w == 0
    finally:
        await devices.close()
        await simulator.stop()


async def test_a_device_that_stops_answering_times_out_within_the_budget(
    bms: BmsSimulator,
) -> None:
    device = demo_device(bms.port, timeout_s=0.3, retries=1)
    devices = ModbusDevices()
    sp = channel(device, "SetActivePower")
    try:
        await devices.write(device, sp, 1000)
        bms.state.frozen = True
        started = time.monotonic()
        with pytest.raises(DeviceError) as caught:
            await devices.write(device, sp, 2000)
        elapsed = time.monotonic() - started
        assert caught.value.code is ErrorCode.DEVICE_TIMEOUT
        assert elapsed < 0.3 * 2 + 0.5 + 0.3
        bms.release()
        await asyncio.sleep(0)
        await devices.write(device, sp, 3000)  # answers again: the adapter recovers
        assert await devices.read(device, sp) == 3000
    finally:
        await devices.close()


async def test_an_absent_device_is_a_device_error_with_the_address() -> None:
    port = free_port()
    device = demo_device(port, timeout_s=0.3, retries=0)
    devices = ModbusDevices()
    try:
        with pytest.raises(DeviceError) as caught:
            await devices.read(device, channel(device, "Soc"))
        assert f"127.0.0.1:{port}" in caught.value.message
    finally:
        await devices.close()
