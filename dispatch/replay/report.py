"""The comparison: per command recorded vs replayed status, error code and latency.

Where the two differ, the first event at which their lifecycles part is named, with
its offset from the command's issue in each run ("recorded: delivered at +0.21 s;
replay: failed (superseded) at +0.15 s: a newer setpoint ... (cmd_x) replaced this
one"). A human table by default, a JSON object with `--json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dispatch.replay.window import Outcome, Recorded, Step, iso, iso_ms
from schemas.commands import EdgeCommand


def request(cmd: EdgeCommand) -> str:
    target = f"{cmd.target.device_id}/{cmd.target.channel}"
    unit = f" {cmd.unit}" if cmd.unit else ""
    return f"{cmd.command_type.value} {target}={cmd.value}{unit}"


def latency_ms(steps: tuple[Step, ...], outcome: Outcome) -> int | None:
    """From issue to the first event with the outcome's status."""
    if not steps:
        return None
    end = next((s for s in steps if s.status == outcome.status), None)
    return None if end is None else end.at_ms - steps[0].at_ms


def _at(step: Step, t0: int) -> str:
    code = f" ({step.error_code})" if step.error_code else ""
    return f"{step.status}{code} at +{(step.at_ms - t0) / 1000:.2f} s"


@dataclass(frozen=True, slots=True)
class Parting:
    """The first event where the recorded and replayed lifecycles differ."""

    index: int
    recorded: Step | None
    replayed: Step | None
    text: str

    @classmethod
    def find(cls, recorded: tuple[Step, ...], replayed: tuple[Step, ...]) -> Parting | None:
        for i in range(max(len(recorded), len(replayed))):
            r = recorded[i] if i < len(recorded) else None
            p = replayed[i] if i < len(replayed) else None
            if (
                r is not None
                and p is not None
                and (r.status, r.error_code)
                == (
                    p.status,
                    p.error_code,
                )
            ):
                continue
            return cls(i, r, p, _parting_text(recorded, replayed, r, p))
        return None


def _parting_text(
    recorded: tuple[Step, ...], replayed: tuple[Step, ...], r: Step | None, p: Step | None
) -> str:
    r0 = recorded[0].at_ms if recorded else 0
    p0 = replayed[0].at_ms if replayed else 0
    if r is not None:
        rec = f"recorded: {_at(r, r0)}"
    else:
        last = recorded[-1].status if recorded else "nothing"
        rec = f"recorded: nothing after {last}"
    if p is not None:
        rep = f"replay: {_at(p, p0)}" + (f": {p.message}" if p.message else "")
    elif replayed:
        rep = f"replay: still {replayed[-1].status}, nothing more happened"
    else:
        rep = "replay: never admitted"
    return f"{rec}; {rep}"


@dataclass(frozen=True, slots=True)
class Row:
    recorded: Recorded
    replayed: Outcome
    steps: tuple[Step, ...] = ()

    @property
    def same(self) -> bool:
        return self.recorded.outcome == self.replayed

    @property
    def parting(self) -> Parting | None:
        return Parting.find(self.recorded.steps, self.steps)

    def json(self) -> dict[str, Any]:
        r, o = self.recorded, self.replayed
        parting = self.parting
        return {
            "command_id": r.command.command_id,
            "issued_at": iso_ms(r.issued_ms),
            "request": request(r.command),
            "recorded": {
                "status": r.outcome.status,
                "error_code": r.outcome.error_code,
                "latency_ms": latency_ms(r.steps, r.outcome),
                "lifecycle": [s.status for s in r.steps],
            },
            "replayed": {
                "status": o.status,
                "error_code": o.error_code,
                "latency_ms": latency_ms(self.steps, o),
                "lifecycle": [s.status for s in self.steps],
            },
            "same": self.same,
            "parted": None if parting is None else parting.text,
        }


@dataclass
class Report:
    edge_id: str
    start: datetime
    end: datetime
    speed: float
    sandbox: str
    rows: list[Row] = field(default_factory=list)
    source: str = "ledger"  # where the recorded window was read
    notes: list[str] = field(default_factory=list)  # gates the sandbox did not reach

    @property
    def different(self) -> int:
        return sum(1 for row in self.rows if not row.same)

    def lines(self) -> list[str]:
        head = (
            f"replay of edge {self.edge_id} from {iso(self.start)} to {iso(self.end)}: "
            f"{len(self.rows)} commands (recorded in the {self.source}) at speed "
            f"{self.speed:g} in sandbox {self.sandbox}"
        )
        widths = (24, 24, 40, 28, 28, 16)
        titles = ("COMMAND", "ISSUED (RECORDED)", "REQUEST", "RECORDED", "REPLAYED", "LATENCY MS")
        out = [head, " ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)) + " SAME"]
        for row in self.rows:
            r = row.recorded
            cells = (
                r.command.command_id,
                iso_ms(r.issued_ms),
                request(r.command),
                r.outcome.text(),
                row.replayed.text(),
                f"{_ms(latency_ms(r.steps, r.outcome))} / {_ms(latency_ms(row.steps, row.replayed))}",
            )
            mark = "=" if row.same else "DIFFERENT"
            out.append(
                " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " " + mark
            )
        for row in self.rows:
            parting = row.parting
            if not row.same and parting is not None:
                out.append(f"  {row.recorded.command.command_id}: {parting.text}")
        out.extend(f"  note: {note}" for note in self.notes)
        same = len(self.rows) - self.different
        out.append(
            f"{same} of {len(self.rows)} commands replayed with the recorded outcome"
            + (f"; {self.different} differ" if self.different else "")
        )
        return out

    def json(self) -> dict[str, Any]:
        return {
            "edge_id": self.edge_id,
            "from": iso(self.start),
            "to": iso(self.end),
            "speed": self.speed,
            "sandbox": self.sandbox,
            "source": self.source,
            "same": len(self.rows) - self.different,
            "different": self.different,
            "notes": self.notes,
            "commands": [row.json() for row in self.rows],
        }


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)
