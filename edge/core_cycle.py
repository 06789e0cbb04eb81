"""The Core Cycle: a fixed-period control loop that executes accepted commands.

Commands wait in a bounded priority queue (emergency first, then FIFO). Each tick runs
up to `per_cycle` queued commands, reverts overrides that are due and steps the running
controllers. An emergency command wakes the loop at once instead of waiting for the
tick. A setpoint queued for a channel supersedes an older one still queued for it.

Exactly-once: before a device is written the journal records `executing`; the outcome
and its ack are recorded in one transaction afterwards. At start-up `recover()` settles
what a crash left behind, without writing to any device again (see `recover`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import msgspec

from config import tracing
from edge.capabilities import Channel, Device, SiteConfig
from edge.clock import ClockOffset, deadline
from edge.errors import DeviceError
from edge.frames import ack
from edge.journal import CommandMeta, CommandState, ControllerState, Journal, Override, Stored
from edge.metrics import EdgeMetrics
from edge.modbus import DevicePort
from edge.validation import (
    DEFAULT_MAX_OVERRIDE_S,
    ModePlan,
    Plan,
    Rejection,
    SchedulePlan,
    SystemPlan,
    WritePlan,
    validate,
)
from schemas.commands import Ack, CommandType, EdgeCommand
from schemas.errors import ErrorCode

log = logging.getLogger("edge.core_cycle")

_plan_encoder = msgspec.json.Encoder()
_plan_decoder = msgspec.json.Decoder(Plan)
_command_decoder = msgspec.json.Decoder(EdgeCommand)
EMERGENCY, NORMAL = 0, 1
_REVERT_RETRY_S = 5.0
_READBACK_TOLERANCE = 1e-6


class CycleState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(eq=False)
class Job:
    cmd: EdgeCommand
    plan: Plan
    rank: int
    seq: int
    received_mono: float
    deadline_mono: float | None = None  # from the gateway's `remaining_ms`
    cancelled: bool = False

    def __lt__(self, other: Job) -> bool:
        return (self.rank, self.seq) < (other.rank, other.seq)


@dataclass(frozen=True, slots=True)
class CycleSettings:
    period_ms: int = 1000
    capacity: int = 256
    emergency_reserve: int = 16  # emergencies may exceed `capacity` by this much
    per_cycle: int = 32
    skew_s: float = 60.0
    edge_id: str = ""
    max_override_s: float = DEFAULT_MAX_OVERRIDE_S


SystemHandler = Callable[[SystemPlan, EdgeCommand], Awaitable[Rejection | None]]


@dataclass
class Controllers:
    """The Core Cycle's controllers: mode and whether each runs."""

    states: dict[str, ControllerState] = field(default_factory=dict)

    def load(self, site: SiteConfig, stored: dict[str, ControllerState]) -> None:
        self.states = {
            c.name: stored.get(c.name) or ControllerState(c.name, c.default_mode, c.running)
            for c in site.controllers
        }

    def step(self) -> None:
        for state in self.states.values():
            if state.running:
                log.debug("controller.step name=%s mode=%s", state.name, state.mode)


def log_transition(command_id: str, edge_id: str, status: str, **fields: object) -> None:
    extra = "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
    log.info(
        "command.transition command_id=%s edge_id=%s status=%s%s",
        command_id,
        edge_id,
        status,
        extra,
    )


class CoreCycle:
    def __init__(
        self,
        *,
        journal: Journal,
        devices: DevicePort,
        site: Callable[[], SiteConfig],
        settings: CycleSettings,
        on_ack: Callable[[], None],
        on_system: SystemHandler,
        clock: ClockOffset | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.journal = journal
        self.clock = clock if clock is not None else ClockOffset(limit_s=math.inf)
        self.metrics = metrics
        self.devices = devices
        self.site = site
        self.settings = settings
        self.on_ack = on_ack
        self.on_system = on_system
        self.controllers = Controllers()
        self.state = CycleState.CREATED
        self._heap: list[Job] = []
        self._live = 0
        self._seq = 0
        self._queued_setpoints: dict[tuple[str, str], Job] = {}
        self._urgent = asyncio.Event()
        self._stopped = asyncio.Event()
        self._revert_retry_at: dict[str, float] = {}
        self.ticks = 0

    # -- intake ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._live

    def now(self) -> datetime:
        """Now on the gateway's timeline (what acks report as `executed_at`)."""
        return self.clock.gateway_now()

    def _depth(self, change: int) -> None:
        self._live += change
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._live)

    async def submit(self, cmd: EdgeCommand, plan: Plan, body: bytes) -> Ack:
        """Queue a validated command (ack `accepted`) or refuse it when full (`edge_busy`)."""
        meta = _meta(cmd)
        rank = EMERGENCY if cmd.priority == "emergency" else NORMAL
        limit = self.settings.capacity + (
            self.settings.emergency_reserve if rank == EMERGENCY else 0
        )
        if self._live >= limit or self.state in (CycleState.STOPPING, CycleState.STOPPED):
            answer = ack(
                cmd.command_id,
                "rejected",
                code=ErrorCode.EDGE_BUSY,
                message=(
                    f"the Core Cycle queue is full ({self._live} commands waiting); "
                    "send it again later"
                    if self.state not in (CycleState.STOPPING, CycleState.STOPPED)
                    else "the edge agent is shutting down; send it again after it restarts"
                ),
            )
            await self.journal.record(meta, body, answer)
            self._report(cmd.command_id, answer)
            return answer
        received = time.monotonic()
        answer = ack(cmd.command_id, "accepted")
        self._depth(+1)  # held while the record is made durable, so the bound holds
        try:
            await self.journal.record(meta, body, answer, plan=_plan_encoder.encode(plan))
        except BaseException:
            self._depth(-1)
            raise
        trace = tracing.trace_id(cmd.traceparent) or None
        self._report(cmd.command_id, answer, queued=self._live, trace_id=trace)
        self._seq += 1
        job = Job(
            cmd=cmd,
            plan=plan,
            rank=rank,
            seq=self._seq,
            received_mono=received,
            deadline_mono=deadline(cmd.remaining_ms, received),
        )
        if cmd.command_type is CommandType.SETPOINT and isinstance(plan, WritePlan):
            key = (plan.device_id, plan.channel)
            older = self._queued_setpoints.get(key)
            if older is not None and not older.cancelled:
                await self._supersede(older, cmd)
            self._queued_setpoints[key] = job
        heapq.heappush(self._heap, job)
        if rank == EMERGENCY:
            self._urgent.set()
        return answer

    async def _supersede(self, older: Job, newer: EdgeCommand) -> None:
        older.cancelled = True
        self._depth(-1)
        plan = older.plan
        assert isinstance(plan, WritePlan)
        await self._finish(
            older,
            ack(
                older.cmd.command_id,
                "failed",
                code=ErrorCode.SUPERSEDED,
                message=(
                    f"superseded by the newer setpoint {newer.command_id} for "
                    f"{plan.device_id}.{plan.channel} before it was executed; not written"
                ),
            ),
        )

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Tick every `period_ms` until `stop()`; emergencies are run as they arrive."""
        if self.state is not CycleState.CREATED:
            raise RuntimeError(f"Expected a new Core Cycle, but it is {self.state}")
        self.state = CycleState.RUNNING
        period_s = self.settings.period_ms / 1000
        next_tick = time.monotonic()
        try:
            while self._running():
                wait_s = next_tick - time.monotonic()
                if wait_s > 0:
                    try:
                        async with asyncio.timeout(wait_s):
                            await self._urgent.wait()
                    except TimeoutError:
                        pass
                self._urgent.clear()
                if not self._running():
                    break
                if time.monotonic() < next_tick:
                    await self._drain(emergency_only=True)
                    continue
                await self._tick()
                next_tick += period_s
                now = time.monotonic()
                if next_tick < now:
                    log.warning("core_cycle.overrun late_ms=%d", (now - next_tick) * 1000)
                    next_tick = now + period_s
        finally:
            self.state = CycleState.STOPPED
            self._stopped.set()

    def _running(self) -> bool:
        return self.state is CycleState.RUNNING

    async def stop(self) -> None:
        """Finish the command being executed, then stop; queued ones stay for recovery."""
        if self.state is CycleState.CREATED:
            self.state = CycleState.STOPPED
            return
        if self.state is CycleState.RUNNING:
            self.state = CycleState.STOPPING
            self._urgent.set()
        await self._stopped.wait()

    async def abandon_queue(self) -> None:
        """After stop(): fail what is still queued (`interrupted`, never executed)."""
        while self._heap:
            job = heapq.heappop(self._heap)
            if job.cancelled:
                continue
            self._depth(-1)
            await self._finish(
                job,
                ack(
                    job.cmd.command_id,
                    "failed",
                    code=ErrorCode.INTERRUPTED,
                    message="the edge agent stopped before executing it; it was not executed",
                ),
            )
        self._queued_setpoints.clear()

    async def _tick(self) -> None:
        self.ticks += 1
        started = time.perf_counter()
        await self._drain(emergency_only=False)
        await self._revert_due()
        self.controllers.step()
        if self.metrics is not None:
            self.metrics.cycle_seconds.observe(time.perf_counter() - started)

    async def _drain(self, *, emergency_only: bool) -> None:
        budget = self.settings.per_cycle
        while self._heap and self._running():
            job = self._heap[0]
            if job.cancelled:
                heapq.heappop(self._heap)
                continue
            if emergency_only and job.rank != EMERGENCY:
                return
            if job.rank != EMERGENCY:
                if budget <= 0:
                    return
                budget -= 1
            heapq.heappop(self._heap)
            self._depth(-1)
            if self._queued_setpoints.get(_write_key(job.plan)) is job:
                del self._queued_setpoints[_write_key(job.plan)]
            try:
                await self._execute(job)
            except Exception as exc:  # a bug must not stop the control loop
                log.exception("core_cycle.execute.crashed command_id=%s", job.cmd.command_id)
                await self._finish(
                    job,
                    ack(
                        job.cmd.command_id,
                        "failed",
                        code=ErrorCode.INTERNAL,
                        message=f"the edge agent failed while executing it: {exc!r}",
                        executed_at=self.now(),
                    ),
                )

    # -- execution ---------------------------------------------------------------------------
    async def _execute(self, job: Job) -> None:
        cmd = job.cmd
        waited_ns = round((time.monotonic() - job.received_mono) * 1e9)
        tracing.record("edge.queue", cmd.traceparent, start_ns=time.time_ns() - waited_ns)
        site = self.site()
        # Check again: the command may have expired in the queue or the config changed.
        plan = validate(
            cmd,
            site,
            self.clock.wall(),
            edge_id=self.settings.edge_id,
            skew_s=self.settings.skew_s,
            remaining_s=None if job.deadline_mono is None else job.deadline_mono - time.monotonic(),
            clock_problem=self.clock_problem(),
            max_override_s=self.settings.max_override_s,
        )
        if isinstance(plan, Rejection):
            await self._finish(
                job, ack(cmd.command_id, "failed", code=plan.code, message=plan.message)
            )
            return
        if isinstance(plan, WritePlan):
            await self._write(job, plan, site)
        elif isinstance(plan, ModePlan | SchedulePlan):
            await self._control(job, plan)
        else:
            await self._system(job, plan)

    async def _write(self, job: Job, plan: WritePlan, site: SiteConfig) -> None:
        cmd = job.cmd
        device, channel = _resolve(site, plan)
        restore: float | None = None
        if plan.override_s is not None:
            pending = self.journal.pending_override_of(plan.device_id, plan.channel)
            if pending is not None:
                restore = pending.restore_value  # back to the value before the first override
            else:
                try:
                    restore = await self._read(device, channel)
                except DeviceError as exc:
                    await self._finish(
                        job, self._failed(cmd.command_id, exc, "before the override, reading")
                    )
                    return
        await self.journal.start(cmd.command_id, prior=restore)
        log_transition(cmd.command_id, self.settings.edge_id, "executing", value=plan.value)
        started = time.time()
        try:
            with tracing.span("edge.modbus.write", cmd.traceparent, device=plan.device_id):
                await self._device_write(device, channel, plan.value)
        except DeviceError as exc:
            # A timed-out write may still land: an override then still needs its revert.
            keep_revert = restore is not None and exc.code is ErrorCode.DEVICE_TIMEOUT
            await self._finish(
                job,
                self._failed(cmd.command_id, exc),
                override=_override(cmd, plan, restore, started) if keep_revert else None,
            )
            return
        await self._finish(
            job,
            ack(cmd.command_id, "executed", executed_at=self.now()),
            override=_override(cmd, plan, restore, started),
            cancel_override_of=(plan.device_id, plan.channel),
        )

    async def _control(self, job: Job, plan: ModePlan | SchedulePlan) -> None:
        current = self.controllers.states[plan.controller]
        if isinstance(plan, ModePlan):
            new = ControllerState(current.name, plan.mode, current.running)
        else:
            new = ControllerState(current.name, current.mode, plan.run)
        await self._finish(
            job, ack(job.cmd.command_id, "executed", executed_at=self.now()), controller=new
        )
        self.controllers.states[plan.controller] = new
        log.info("controller.changed name=%s mode=%s running=%s", new.name, new.mode, new.running)

    async def _system(self, job: Job, plan: SystemPlan) -> None:
        if plan.action == "restart":
            # Ack first: the restart itself ends this process.
            await self._finish(job, ack(job.cmd.command_id, "executed", executed_at=self.now()))
            await self.on_system(plan, job.cmd)
            return
        problem = await self.on_system(plan, job.cmd)
        if problem is None:
            await self._finish(job, ack(job.cmd.command_id, "executed", executed_at=self.now()))
        else:
            answer = ack(job.cmd.command_id, "failed", code=problem.code, message=problem.message)
            await self._finish(job, answer)

    async def _finish(
        self,
        job: Job,
        answer: Ack,
        *,
        override: Override | None = None,
        controller: ControllerState | None = None,
        cancel_override_of: tuple[str, str] | None = None,
    ) -> None:
        await self.journal.finish(
            answer,
            override=override,
            controller=controller,
            cancel_override_of=cancel_override_of,
        )
        elapsed_ms = round((time.monotonic() - job.received_mono) * 1000)
        trace = tracing.trace_id(job.cmd.traceparent) or None
        self._report(job.cmd.command_id, answer, elapsed_ms=elapsed_ms, trace_id=trace)
        tracing.record(
            "edge.ack", job.cmd.traceparent, start_ns=time.time_ns(), status=answer.status
        )

    def clock_problem(self) -> str | None:
        """Why commands are refused `clock_skew`, while the clock is off past the limit."""
        offset = self.clock.offset_s
        if offset is None or not self.clock.beyond_limit:
            return None
        return (
            f"this edge's clock is {offset:+.1f} s off the gateway's, more than the "
            f"{self.clock.limit_s:g} s allowed; fix the edge's time sync (NTP), then send again"
        )

    def _failed(self, command_id: str, exc: DeviceError, doing: str = "") -> Ack:
        return _failed(command_id, exc, doing, executed_at=self.now())

    async def _read(self, device: Device, channel: Channel) -> float:
        started = time.perf_counter()
        try:
            return await self.devices.read(device, channel)
        except DeviceError as exc:
            self._count_error(device, "read", exc)
            raise
        finally:
            self._observe(device, "read", started)

    async def _device_write(self, device: Device, channel: Channel, value: float) -> None:
        started = time.perf_counter()
        try:
            await self.devices.write(device, channel, value)
        except DeviceError as exc:
            self._count_error(device, "write", exc)
            raise
        finally:
            self._observe(device, "write", started)

    def _observe(self, device: Device, operation: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.modbus_seconds.labels(device.device_id, operation).observe(
                time.perf_counter() - started
            )

    def _count_error(self, device: Device, operation: str, exc: DeviceError) -> None:
        if self.metrics is not None:
            self.metrics.modbus_errors.labels(device.device_id, operation, exc.code.value).inc()

    def _report(self, command_id: str, answer: Ack, **fields: object) -> None:
        code = None if answer.error is None else answer.error.code
        log_transition(command_id, self.settings.edge_id, answer.status, code=code, **fields)
        self.on_ack()

    # -- overrides ---------------------------------------------------------------------------
    async def _revert_due(self) -> None:
        now = time.time()
        for pending in self.journal.pending_overrides():
            if pending.revert_at > now:
                break
            if self._revert_retry_at.get(pending.command_id, 0.0) > now:
                continue
            await self._revert(pending)

    async def _revert(self, pending: Override) -> None:
        site = self.site()
        device = site.device(pending.device_id)
        channel = device.channel(pending.channel) if device is not None else None
        if device is None or channel is None:
            detail = f"{pending.device_id}.{pending.channel} is no longer in the config"
            await self.journal.settle_override(pending.command_id, "failed", detail)
            log.error("override.revert.failed command_id=%s reason=%s", pending.command_id, detail)
            return
        try:
            await self._device_write(device, channel, pending.restore_value)
        except DeviceError as exc:
            self._revert_retry_at[pending.command_id] = time.time() + _REVERT_RETRY_S
            log.warning(
                "override.revert.retrying command_id=%s code=%s error=%s",
                pending.command_id,
                exc.code.value,
                exc.message,
            )
            return
        self._revert_retry_at.pop(pending.command_id, None)
        late_s = time.time() - pending.revert_at
        detail = f"restored {pending.restore_value:g} {channel.unit} ({late_s:.3f} s after due)"
        await self.journal.settle_override(pending.command_id, "reverted", detail)
        log.info(
            "override.reverted command_id=%s device_id=%s channel=%s value=%g late_ms=%d",
            pending.command_id,
            pending.device_id,
            pending.channel,
            pending.restore_value,
            late_s * 1000,
        )

    # -- start-up ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Settle what the last run left unfinished; never write a device twice.

        * accepted but not started: failed `interrupted` (not executed: executing it late,
          after the cloud has timed it out, would surprise the operator);
        * executing (the write may or may not have reached the device): the channel is
          read back; equal to the commanded value -> `executed`, otherwise or unreadable
          -> failed `outcome_unknown`. An override whose write may have landed keeps its
          revert at the original time.
        """
        self.controllers.load(self.site(), self.journal.controllers())
        for stored in self.journal.unfinished():
            if stored.state is CommandState.ACCEPTED:
                await self._settle_failed(
                    stored,
                    ErrorCode.INTERRUPTED,
                    "the edge agent stopped before executing it; it was not executed",
                )
            else:
                await self._settle_executing(stored)

    async def _settle_executing(self, stored: Stored) -> None:
        plan = None if stored.plan is None else _plan_decoder.decode(stored.plan)
        cmd = _command_decoder.decode(stored.body)
        if not isinstance(plan, WritePlan):
            await self._settle_failed(
                stored,
                ErrorCode.INTERRUPTED,
                "the edge agent stopped while executing it; not repeated",
            )
            return
        started = self._started_at(stored)
        override = _override(cmd, plan, stored.prior, started)
        site = self.site()
        try:
            device, channel = _resolve(site, plan)
            now_value = await self._read(device, channel)
        except (DeviceError, LookupError) as exc:
            await self._settle_failed(
                stored,
                ErrorCode.OUTCOME_UNKNOWN,
                "the edge agent stopped during the write and cannot read the channel back "
                f"({exc}); not repeated: check the device and send again if still wanted",
                override=override,
            )
            return
        if not math.isclose(now_value, plan.value, rel_tol=_READBACK_TOLERANCE, abs_tol=1e-9):
            await self._settle_failed(
                stored,
                ErrorCode.OUTCOME_UNKNOWN,
                f"the edge agent stopped during the write; {plan.channel} now reads "
                f"{now_value:g}, not {plan.value:g}; not repeated: send again if still wanted",
            )
            return
        answer = ack(stored.command_id, "executed", executed_at=self.now())
        await self.journal.finish(
            answer,
            override=override,
            cancel_override_of=(plan.device_id, plan.channel),
            detail=f"confirmed after restart: {plan.channel} reads {now_value:g}",
        )
        self._report(stored.command_id, answer, recovered=True)

    async def _settle_failed(
        self, stored: Stored, code: ErrorCode, message: str, *, override: Override | None = None
    ) -> None:
        """Close a command the last run left unfinished as failed, and say so."""
        answer = ack(stored.command_id, "failed", code=code, message=message)
        await self.journal.finish(answer, override=override)
        self._report(stored.command_id, answer, recovered=True)

    def _started_at(self, stored: Stored) -> float:
        entries = self.journal.events_of(stored.command_id, "executing")
        return entries[-1] if entries else time.time()


def _meta(cmd: EdgeCommand) -> CommandMeta:
    return CommandMeta(
        command_id=cmd.command_id,
        command_type=cmd.command_type.value,
        priority=cmd.priority,
        source=cmd.source,
    )


def _write_key(plan: Plan) -> tuple[str, str]:
    return (plan.device_id, plan.channel) if isinstance(plan, WritePlan) else ("", "")


def _resolve(site: SiteConfig, plan: WritePlan) -> tuple[Device, Channel]:
    device = site.device(plan.device_id)
    channel = None if device is None else device.channel(plan.channel)
    if device is None or channel is None:
        raise LookupError(f"{plan.device_id}.{plan.channel} is not in config {site.version!r}")
    return device, channel


def _override(
    cmd: EdgeCommand, plan: WritePlan, restore: float | None, started: float
) -> Override | None:
    if plan.override_s is None or restore is None:
        return None
    return Override(
        command_id=cmd.command_id,
        device_id=plan.device_id,
        channel=plan.channel,
        restore_value=restore,
        revert_at=started + plan.override_s,
    )


def _failed(command_id: str, exc: DeviceError, doing: str, *, executed_at: datetime) -> Ack:
    prefix = f"{doing} " if doing else ""
    return ack(
        command_id,
        "failed",
        code=exc.code,
        message=f"{prefix}{exc.message}",
        executed_at=executed_at,
    )
