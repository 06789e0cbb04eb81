"""A counting variant of the simulated BMS: every accepted write is recorded with its time.

The fault-injection suite proves "at most one device write per command" and "no write
after expiry" from what the device itself saw, not from what the agent says it did.
Each accepted write appends one JSON line to the record file before the answer leaves:

    {"t_ms": 1764460800123, "address": 0, "words": [0, 1234], "active_power_w": 1234}

`t_ms` is the device host's wall clock (ms since the Unix epoch). Lines are written with
one `write()` on an O_APPEND descriptor, so a reader never sees half a line and a
killed agent cannot lose a line the device already wrote.

`--hold-write N` withholds the answer to the Nth accepted write (1-based): the value
takes effect and is recorded, but the agent never hears back (a write whose answer was
lost), which lets a test kill the agent "after the Modbus write" deterministically.

Run it as `python -m edge.recording_device --port P --record FILE [--hold-write N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edge.simulator import BmsSimulator, BmsState

log = logging.getLogger("edge.recording_device")


class RecordingBms(BmsSimulator):
    """`BmsSimulator` that appends every accepted write to `record_path`."""

    def __init__(
        self,
        record_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hold_write: int = 0,
        state: BmsState | None = None,
    ) -> None:
        super().__init__(host, port, state=state)
        self.record_path = record_path
        self.hold_write = hold_write
        self._fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def _accepted(self, address: int, words: list[int]) -> bool:
        line = {
            "t_ms": time.time_ns() // 1_000_000,
            "address": address,
            "words": words,
            "active_power_w": self.active_power_w,
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())
        if len(self.state.writes) != self.hold_write:
            return False
        log.info("recording_device.holding_answer write=%d", self.hold_write)
        return True  # the write takes effect, its answer never leaves

    async def stop(self) -> None:
        await super().stop()
        os.close(self._fd)


def read_record(path: Path) -> list[dict[str, int | list[int]]]:
    """Every write the device recorded, oldest first."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    device = RecordingBms(args.record, args.host, args.port, hold_write=args.hold_write)
    await device.serve_until(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge.recording_device",
        description="The simulated BMS, recording every accepted write to a JSON-lines file.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--record", type=Path, required=True, help="JSON-lines file to append")
    parser.add_argument(
        "--hold-write", type=int, default=0, help="never answer the Nth accepted write (0: off)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
