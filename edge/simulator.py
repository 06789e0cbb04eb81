"""The demo site's simulated BMS (`dispatch simulate-device`), a real pymodbus TCP server.

Unit id 1. Holding 0-1: SetActivePower, int32 W, big-endian, high word first (positive
charges the battery); holding 2: MinSoc, uint16 %; input 0: Soc, uint16 %. Writes
outside the device's limits are refused with Modbus exception 3 (illegal data value).
Soc drifts with the active power (capacity `capacity_wh`). Holding 3-63 are spare
uint16 registers without limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

log = logging.getLogger("edge.simulator")

UNIT_ID = 1
HOLDING_COUNT = 64  # 0-1 SetActivePower, 2 MinSoc, 3-63 spare (free for tests)
_INT32 = ModbusClientMixin.DATATYPE.INT32
_READ_INPUT = 4
_WRITES = frozenset({6, 16, 23})


@dataclass
class BmsState:
    """What the simulated battery knows; tests read it to see what reached the device."""

    power_limit_w: int = 100_000
    capacity_wh: float = 200_000.0
    soc_percent: float = 50.0
    writes: list[tuple[int, list[int]]] = field(default_factory=list)
    frozen: bool = False  # when set, requests get no answer (a device that hangs)
    hold_write_answers: bool = False  # when set, writes take effect but get no answer
    _last_drift: float = field(default_factory=time.monotonic)


class BmsSimulator:
    """The simulated BMS server: `await start()` returns the port it listens on."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, state: BmsState | None = None):
        self.host = host
        self.port = port
        self.state = state or BmsState()
        self._holding = [0] * HOLDING_COUNT
        self._released = asyncio.Event()
        self._written = asyncio.Event()
        device = SimDevice(
            id=UNIT_ID,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=HOLDING_COUNT, values=0, datatype=DataType.REGISTERS)],
                [
                    SimData(
                        0,
                        count=4,
                        values=round(self.state.soc_percent),
                        datatype=DataType.REGISTERS,
                    )
                ],
            ),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=(host, port))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self._task = asyncio.create_task(self._server.serve_forever(), name="bms-simulator")
        for _ in range(500):
            transport = getattr(self._server, "transport", None)
            if transport is not None and transport.sockets:
                self.port = int(transport.sockets[0].getsockname()[1])
                log.info("simulator.started host=%s port=%d unit_id=%d", self.host, self.port, 1)
                return self.port
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        raise RuntimeError(f"the simulated BMS did not start listening on {self.host}:{self.port}")

    async def stop(self) -> None:
        self.release()
        await self._server.shutdown()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def serve_until(self, stop: asyncio.Event) -> None:
        await self.start()
        await stop.wait()
        await self.stop()

    def release(self) -> None:
        """Answer again (ends `frozen` and `hold_write_answers`)."""
        self.state.frozen = False
        self.state.hold_write_answers = False
        self._released.set()

    @property
    def active_power_w(self) -> int:
        value = ModbusClientMixin.convert_from_registers(self._holding[0:2], _INT32)
        assert isinstance(value, int)
        return value

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds, re-checked after every accepted write."""
        while not predicate():
            self._written.clear()
            await self._written.wait()

    def holding(self, address: int) -> int:
        return self._holding[address]

    @property
    def min_soc_percent(self) -> int:
        return self._holding[2]

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        state = self.state
        if state.frozen:
            await self._hang()
        if function_code == _READ_INPUT:
            self._drift(registers)
            return None
        if function_code not in _WRITES or values is None:
            return None
        words = [int(v) for v in values]
        after = list(registers)
        offset = address - start_address
        after[offset : offset + count] = words
        refusal = self._refusal(after)
        if refusal is not None:
            log.info("simulator.write.refused address=%d values=%s", address, words)
            return refusal
        state.writes.append((address, words))
        self._holding = after[:HOLDING_COUNT]
        self._written.set()
        withhold = await self._accepted(address, words)
        if state.hold_write_answers or withhold:
            registers[offset : offset + count] = words  # the write takes effect...
            await self._hang()  # ...but its answer never leaves
        return None

    async def _accepted(self, address: int, words: list[int]) -> bool:
        """Each accepted write, before its answer leaves: True withholds the answer (until
        `release`). A variant records the write here (edge/recording_device.py)."""
        return False

    def _refusal(self, holding: list[int]) -> ExcCodes | None:
        power = ModbusClientMixin.convert_from_registers(holding[0:2], _INT32)
        assert isinstance(power, int)
        if abs(power) > self.state.power_limit_w or holding[2] > 100:
            return ExcCodes.ILLEGAL_VALUE
        return None

    def _drift(self, inputs: list[int]) -> None:
        now = time.monotonic()
        state = self.state
        elapsed_s, state._last_drift = now - state._last_drift, now
        delta = self.active_power_w * elapsed_s / 3600 / state.capacity_wh * 100
        state.soc_percent = min(100.0, max(0.0, state.soc_percent + delta))
        inputs[0] = round(state.soc_percent)

    async def _hang(self) -> None:
        self._released.clear()
        await self._released.wait()
