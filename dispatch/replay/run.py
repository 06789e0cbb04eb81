"""The run: read the window, start the sandbox, perform the schedule, compare.

Each action of the schedule waits for its gates (the sandbox's log tailed and folded
per command), then for the recorded spacing since the previous action divided by the
speed, then happens. A gate the sandbox does not reach within the ack timeout plus
`GATE_SLACK_S` is passed over and named in the report's notes, so a replay that
diverges still finishes and says where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from config.ledger import LedgerConfig
from config.settings import Settings
from dispatch.replay.report import Report, Row
from dispatch.replay.sandbox import POLL_S, Sandbox
from dispatch.replay.schedule import Action, Kind, Plan, body, plan, reached
from dispatch.replay.window import (
    Outcome,
    ReplayError,
    Step,
    Window,
    iso,
    log_covers,
    outcome_of,
    read_audit,
    read_ledger,
)
from ledger import lifecycle
from ledger.connection import AnyRedis, connect
from ledger.errors import LedgerError
from ledger.lifecycle import CommandState
from ledger.records import EVENT_DECODER
from ledger.store import Ledger
from ledger.tasks import cancel_and_wait
from schemas.events import Event

log = logging.getLogger("dispatch.replay")

GATE_SLACK_S = 5.0
LINK_TIMEOUT_S = 15.0  # for the sandbox edge to drop off or come back


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    edge_id: str
    start: datetime
    end: datetime
    speed: float = 1.0
    settle_s: float | None = None
    modbus: tuple[str, ...] = ()
    cycle_period_ms: int | None = None
    config: bytes | None = None
    keep_sandbox: bool = False


@dataclass
class Tail:
    """The sandbox's partition log, folded per command as it grows."""

    ledger: Ledger
    edge_id: str
    cursor: str = "0-0"
    states: dict[str, CommandState] = field(default_factory=dict)
    events: dict[str, list[Event]] = field(default_factory=dict)

    async def poll(self) -> None:
        stream = self.ledger.keys.log(self.ledger.keys.partition(self.edge_id))
        while True:
            rows: Any = await self.ledger.redis.xrange(stream, f"({self.cursor}", "+", count=500)
            for entry, fields in rows:
                self.cursor = entry.decode()
                raw = fields.get(b"e")
                if raw is None:
                    continue
                event = EVENT_DECODER.decode(raw)
                cid = event.command_id
                state = self.states.get(cid) or CommandState(command_id=cid, edge_id=event.edge_id)
                self.states[cid] = lifecycle.fold(state, event)
                self.events.setdefault(cid, []).append(event)
            if len(rows) < 500:
                return

    def steps(self, command_id: str) -> tuple[Step, ...]:
        return tuple(Step.of(e) for e in self.events.get(command_id, ()))


@contextlib.asynccontextmanager
async def _ledger(redis: AnyRedis, config: LedgerConfig, url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger(redis, config, url=url)
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()


async def read(live: Ledger, settings: Settings, options: ReplayOptions) -> Window:
    start_ms = int(options.start.timestamp() * 1000)
    end_ms = int(options.end.timestamp() * 1000)
    if await log_covers(live, options.edge_id, start_ms):
        window = await read_ledger(live, options.edge_id, start_ms, end_ms)
    else:
        # Retention trimmed the log past the window: the audit tables hold it.
        window = await read_audit(settings, options.edge_id, options.start, options.end)
    if not window.commands:
        raise ReplayError(
            f"no commands for edge {options.edge_id!r} were issued between "
            f"{iso(options.start)} and {iso(options.end)} in namespace "
            f"{settings.namespace!r} (read from the {window.source})"
        )
    return window


async def replay(live_settings: Settings, options: ReplayOptions) -> Report:
    redis = connect(live_settings.redis_url, cluster=live_settings.redis_cluster)
    try:
        async with _ledger(redis, live_settings.ledger(), live_settings.redis_url) as live:
            window = await read(live, live_settings, options)
            schedule = plan(window)
            sandbox = Sandbox(
                live_settings,
                options.edge_id,
                list(options.modbus),
                options.cycle_period_ms,
                options.config,
            )
            report = Report(
                options.edge_id,
                options.start,
                options.end,
                options.speed,
                sandbox.namespace,
                source=window.source,
            )
            config = replace(live_settings.ledger(), namespace=sandbox.namespace)
            try:
                async with _ledger(redis, config, live_settings.redis_url) as ledger:
                    log.info(
                        "replay.sandbox.starting namespace=%s workdir=%s commands=%d actions=%d",
                        sandbox.namespace,
                        sandbox.workdir,
                        len(window.commands),
                        len(schedule.actions),
                    )
                    started = time.monotonic()
                    await sandbox.start(ledger, live, schedule.holds)
                    log.info(
                        "replay.sandbox.ready elapsed_ms=%d", (time.monotonic() - started) * 1000
                    )
                    runner = Runner(ledger, sandbox, schedule, options, live_settings, report)
                    await runner.run(window)
            finally:
                stopping = time.monotonic()
                await sandbox.stop(redis, keep=options.keep_sandbox)
                log.info(
                    "replay.sandbox.stopped elapsed_ms=%d", (time.monotonic() - stopping) * 1000
                )
            return report
    finally:
        await redis.aclose()


@dataclass
class Runner:
    ledger: Ledger
    sandbox: Sandbox
    schedule: Plan
    options: ReplayOptions
    live: Settings
    report: Report
    refused: dict[str, Outcome] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tail = Tail(self.ledger, self.options.edge_id)
        self.gate_timeout_s = self.live.ack_timeout_ms / 1000 + GATE_SLACK_S

    async def run(self, window: Window) -> None:
        verdicts = asyncio.create_task(self._verdicts())
        try:
            issued = {r.command.command_id: r.issued_ms for r in window.commands}
            prev: tuple[int, float] | None = None  # (recorded ms, monotonic s) of the last action
            for action in self.schedule.actions:
                await self._gates(action)
                if prev is not None:
                    due = prev[1] + (action.at_ms - prev[0]) / 1000 / self.options.speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self._perform(action, window, issued)
                prev = (action.at_ms, time.monotonic())
            await self._settle(window)
        finally:
            await cancel_and_wait([verdicts])
        await self.tail.poll()
        for r in window.commands:
            cid = r.command.command_id
            outcome = self.refused.get(cid) or outcome_of(self.tail.events.get(cid, ()))
            self.report.rows.append(Row(r, outcome or Outcome("unknown"), self.tail.steps(cid)))

    async def _gates(self, action: Action) -> None:
        deadline = time.monotonic() + self.gate_timeout_s
        while True:
            self.sandbox.check_alive()
            await self.tail.poll()
            missing = [
                g
                for g in action.gates
                if g.command_id not in self.refused
                and not reached(self.tail.states.get(g.command_id), g)
            ]
            if not missing:
                return
            if time.monotonic() >= deadline:
                note = (
                    f"{action.text()} went ahead without "
                    f"{', '.join(g.text() for g in missing)}: the sandbox did not get there "
                    f"within {self.gate_timeout_s:g} s"
                )
                log.warning("replay.gate.passed_over %s", note)
                self.report.notes.append(note)
                return
            await asyncio.sleep(POLL_S)

    async def _perform(self, action: Action, window: Window, issued: dict[str, int]) -> None:
        sandbox, relay = self.sandbox, self.sandbox.relay
        assert relay is not None
        cid = action.command_id
        if action.kind is Kind.SUBMIT:
            command = next(r.command for r in window.commands if r.command.command_id == cid)
            submit = body(command, issued[cid], int(time.time() * 1000))
            status, reply = await asyncio.to_thread(sandbox.post, "/api/commands", submit)
            if status >= 400:
                err = reply.get("error") or {}
                self.refused[cid] = Outcome("rejected", err.get("code"))
            log.info("replay.command.submitted command_id=%s http_status=%d", cid, status)
        elif action.kind is Kind.CANCEL:
            status, _ = await asyncio.to_thread(sandbox.post, f"/api/commands/{cid}/cancel")
            log.info("replay.command.cancel command_id=%s http_status=%d", cid, status)
        elif action.kind is Kind.OFFLINE:
            await relay.cut()

            async def offline() -> bool:
                return not await sandbox.online(self.ledger)

            await sandbox.until(offline, "the sandbox edge to drop off", None, LINK_TIMEOUT_S)
        elif action.kind is Kind.ONLINE:
            relay.restore()
            await sandbox.until(
                lambda: sandbox.online(self.ledger),
                "the sandbox edge to reconnect",
                None,
                LINK_TIMEOUT_S,
            )
        else:
            await relay.release(cid)
        log.info("replay.action.done action=%s", action.text())

    async def _settle(self, window: Window) -> None:
        settle_s = self.options.settle_s
        if settle_s is None:
            settle_s = self.live.ack_timeout_ms / 1000 + 10
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            await self.tail.poll()
            if all(self._settled(r.command.command_id, r.outcome) for r in window.commands):
                return
            await asyncio.sleep(POLL_S)

    def _settled(self, command_id: str, recorded: Outcome) -> bool:
        if command_id in self.refused:
            return True
        state = self.tail.states.get(command_id)
        if state is None or state.status is None:
            return False
        if state.status in lifecycle.FINAL:
            return True
        # A verdict is the end when the recording had nothing after it either.
        return state.status in lifecycle.VERDICTS and recorded.status == state.status.value

    async def _verdicts(self) -> None:
        """The sandbox has no projector: its ack timeouts and expiries are reached here."""
        partition = self.ledger.keys.partition(self.options.edge_id)
        while True:
            with contextlib.suppress(LedgerError):
                await self.ledger.reach_verdicts(partition, actor="replay")
            await asyncio.sleep(POLL_S)
