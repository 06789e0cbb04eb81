"""Device I/O: the port the Core Cycle uses, and its pymodbus (Modbus TCP) implementation.

Engineering value = raw register value x channel scale. Every request has a deadline of
`timeout_s x (retries + 1)` plus a margin; a device that refuses (Modbus exception), does
not answer, or reads back something else raises DeviceError with the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edge.capabilities import REGISTER_COUNT, Channel, DataType, Device
from edge.errors import DeviceError
from schemas.errors import ErrorCode

log = logging.getLogger("edge.modbus")

_DATATYPE = {
    DataType.INT16: ModbusClientMixin.DATATYPE.INT16,
    DataType.UINT16: ModbusClientMixin.DATATYPE.UINT16,
    DataType.INT32: ModbusClientMixin.DATATYPE.INT32,
    DataType.UINT32: ModbusClientMixin.DATATYPE.UINT32,
    DataType.FLOAT32: ModbusClientMixin.DATATYPE.FLOAT32,
}
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
_DEADLINE_MARGIN_S = 0.5


class DevicePort(Protocol):
    """What the Core Cycle needs from devices (injected; pymodbus in production)."""

    async def read(self, device: Device, channel: Channel) -> float: ...

    async def write(self, device: Device, channel: Channel, value: float) -> None:
        """Write and, where the channel is readable and `verify` is set, read back."""
        ...

    async def close(self) -> None: ...


def encode(channel: Channel, value: float) -> list[int]:
    """Registers for an engineering value (in the channel's unit)."""
    raw = value / channel.scale
    datatype = _DATATYPE[channel.data_type]
    number: int | float = raw if channel.data_type is DataType.FLOAT32 else round(raw)
    registers: list[int] = ModbusClientMixin.convert_to_registers(
        number, datatype, word_order=channel.word_order
    )
    return registers


def decode(channel: Channel, registers: list[int]) -> float:
    """The engineering value of a channel's registers."""
    raw = ModbusClientMixin.convert_from_registers(
        registers, _DATATYPE[channel.data_type], word_order=channel.word_order
    )
    assert isinstance(raw, int | float)
    value = float(raw) * channel.scale
    return value if channel.data_type is DataType.FLOAT32 else round(value, 9)


class ModbusDevices:
    """Modbus TCP devices through pymodbus, one client and one request at a time per device."""

    def __init__(self) -> None:
        self._clients: dict[str, tuple[tuple[str, int], AsyncModbusTcpClient]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def read(self, device: Device, channel: Channel) -> float:
        return decode(channel, await self._read_registers(device, channel))

    async def write(self, device: Device, channel: Channel, value: float) -> None:
        registers = encode(channel, value)
        what = f"write {value:g} {channel.unit} to {device.device_id}.{channel.name}"

        def request(client: AsyncModbusTcpClient) -> Awaitable[Any]:
            if len(registers) == 1:
                return client.write_register(
                    channel.address, registers[0], device_id=device.unit_id
                )
            return client.write_registers(channel.address, registers, device_id=device.unit_id)

        await self._call(device, what, request)
        if not (channel.readable and channel.verify):
            return
        back = await self._read_registers(device, channel)
        if back != registers:
            raise DeviceError(
                ErrorCode.READBACK_MISMATCH,
                f"{device.device_id}.{channel.name} reads back {decode(channel, back):g} "
                f"{channel.unit} after writing {value:g}; the device did not take the value",
            )

    async def close(self) -> None:
        for _, client in self._clients.values():
            client.close()
        self._clients.clear()

    async def _read_registers(self, device: Device, channel: Channel) -> list[int]:
        count = REGISTER_COUNT[channel.data_type]
        what = f"read {device.device_id}.{channel.name}"

        def request(client: AsyncModbusTcpClient) -> Awaitable[Any]:
            if channel.register == "input":
                return client.read_input_registers(
                    channel.address, count=count, device_id=device.unit_id
                )
            return client.read_holding_registers(
                channel.address, count=count, device_id=device.unit_id
            )

        response = await self._call(device, what, request)
        registers = list(response.registers)
        if len(registers) != count:
            raise DeviceError(
                ErrorCode.DEVICE_ERROR,
                f"{what}: expected {count} registers, the device sent {len(registers)}",
            )
        return registers

    async def _call(
        self,
        device: Device,
        what: str,
        request: Callable[[AsyncModbusTcpClient], Awaitable[Any]],
    ) -> Any:
        deadline_s = device.timeout_s * (device.retries + 1) + _DEADLINE_MARGIN_S
        lock = self._locks.setdefault(device.device_id, asyncio.Lock())
        async with lock:
            try:
                async with asyncio.timeout(deadline_s):
                    client = await self._client(device)
                    response = await request(client)
            except TimeoutError:
                self._drop(device)
                raise DeviceError(
                    ErrorCode.DEVICE_TIMEOUT,
                    f"{what}: {device.host}:{device.port} did not answer within {deadline_s:g} s",
                ) from None
            except ModbusIOException as exc:
                self._drop(device)
                raise DeviceError(
                    ErrorCode.DEVICE_TIMEOUT,
                    f"{what}: no answer from {device.host}:{device.port} "
                    f"after {device.retries + 1} tries ({exc})",
                ) from None
            except (ConnectionException, OSError) as exc:
                self._drop(device)
                raise DeviceError(
                    ErrorCode.DEVICE_ERROR,
                    f"{what}: cannot reach {device.host}:{device.port} ({exc}); "
                    "check the device and the --modbus address",
                ) from None
            except ModbusException as exc:
                self._drop(device)
                raise DeviceError(ErrorCode.DEVICE_ERROR, f"{what}: {exc}") from None
        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = _EXCEPTION_NAMES.get(code, "unknown")
            raise DeviceError(
                ErrorCode.DEVICE_ERROR,
                f"{what}: the device refused with Modbus exception {code} ({name})",
            )
        return response

    async def _client(self, device: Device) -> AsyncModbusTcpClient:
        address = (device.host, device.port)
        entry = self._clients.get(device.device_id)
        if entry is not None and entry[0] != address:
            self._drop(device)
            entry = None
        if entry is None:
            client = AsyncModbusTcpClient(
                device.host,
                port=device.port,
                timeout=device.timeout_s,
                retries=device.retries,
                reconnect_delay=0,  # reconnect on the next request, not in the background
            )
            entry = (address, client)
            self._clients[device.device_id] = entry
        client = entry[1]
        if not client.connected and not await client.connect():
            self._drop(device)
            raise DeviceError(
                ErrorCode.DEVICE_ERROR,
                f"cannot connect to {device.device_id} at {device.host}:{device.port}; "
                "check the device and the --modbus address",
            )
        return client

    def _drop(self, device: Device) -> None:
        entry = self._clients.pop(device.device_id, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                entry[1].close()
