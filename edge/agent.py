"""The edge agent: wires the cloud link, validation, the Core Cycle, devices and journal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from config import tracing
from config.durations import DAY_S
from config.sections import same_named
from edge.capabilities import (
    ConfigSource,
    SiteConfig,
    check_edge,
    decode_config,
    fetch_config,
    read_cached,
    shipped_config,
    write_cached,
)
from edge.clock import ClockOffset, WallClock
from edge.core_cycle import CoreCycle, CycleSettings, log_transition
from edge.errors import ConfigError
from edge.frames import BadFrame, Notice, ack, decode_frame, utc_now
from edge.journal import JOURNAL_FILE, CommandMeta, Journal, StateLock
from edge.link import CLOSE_TIMEOUT_S, Link, LinkSettings
from edge.metrics import EdgeMetrics
from edge.modbus import DevicePort, ModbusDevices
from edge.validation import DEFAULT_MAX_OVERRIDE_S, Rejection, SystemPlan, validate
from schemas.commands import Ack, EdgeCommand
from schemas.errors import ErrorCode
from schemas.identifiers import is_edge_id

log = logging.getLogger("edge.agent")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RESTART = 75  # a `system restart` command asked for a fresh process (EX_TEMPFAIL)
HALF_OPEN_BOUND_S = 30.0
_FLUSH_ON_STOP_S = 2.0
_UNRECORDED_FIRST_S = 0.5  # ack_unrecorded: resend after 0.5 s, doubling up to 5 s
_UNRECORDED_MAX_S = 5.0
_ack_decoder = msgspec.json.Decoder(Ack)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything `dispatch edge` is told; refuses bad combinations when built."""

    edge_id: str
    gateway_url: str
    token: str
    state_dir: Path
    config_file: Path | None = None
    modbus: tuple[tuple[str, str, int], ...] = ()
    cycle_period_ms: int = 1000
    queue_capacity: int = 256
    per_cycle: int = 32
    clock_skew_s: float = 60.0
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    ack_resend_window_s: float = 60.0
    # With a gateway that confirms acks (ack_recorded): unconfirmed final acks this
    # young are sent again after every reconnect and restart.
    ack_retention_s: float = DAY_S
    config_fetch_timeout_s: float = 5.0
    max_override_s: float = DEFAULT_MAX_OVERRIDE_S
    max_clock_offset_s: float = 30.0
    metrics_port: int | None = None  # serve /metrics (0 picks a free port); None: off

    def __post_init__(self) -> None:
        if not is_edge_id(self.edge_id):
            raise ConfigError(
                f"edge id {self.edge_id!r} is not valid: use 1-64 letters, digits, '_', '.', '-'"
            )
        if urlsplit(self.gateway_url).scheme not in ("ws", "wss"):
            raise ConfigError(
                f"--gateway {self.gateway_url!r} is not a ws:// or wss:// URL; "
                "give it like ws://127.0.0.1:8000"
            )
        if not self.token:
            raise ConfigError(
                "no edge credential: pass --token or set DISPATCH_EDGE_TOKEN "
                f"(print one with `dispatch token --edge {self.edge_id}`)"
            )
        for name in ("cycle_period_ms", "queue_capacity", "per_cycle", "ping_interval_s",
                     "ping_timeout_s", "backoff_initial_s", "backoff_max_s",
                     "config_fetch_timeout_s", "max_override_s",
                     "max_clock_offset_s", "ack_retention_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ping_interval_s + self.ping_timeout_s + CLOSE_TIMEOUT_S > HALF_OPEN_BOUND_S:
            raise ConfigError(
                f"ping interval {self.ping_interval_s:g} s + ping timeout "
                f"{self.ping_timeout_s:g} s + close timeout {CLOSE_TIMEOUT_S:g} s exceed "
                f"{HALF_OPEN_BOUND_S:g} s: a half-open "
                "connection would go unnoticed too long; lower them"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port} is not 0-65535")
        if self.clock_skew_s < 0:
            raise ConfigError(f"clock skew tolerance must be >= 0, got {self.clock_skew_s}")

    @property
    def ws_url(self) -> str:
        return f"{self.gateway_url.rstrip('/')}/ws/edge/{self.edge_id}"


class Agent:
    """`await Agent(settings).run()` until `stop()`; returns the process exit code."""

    def __init__(
        self,
        settings: AgentSettings,
        devices: DevicePort | None = None,
        *,
        wall: WallClock = utc_now,
    ) -> None:
        self.settings = settings
        self.clock = ClockOffset(limit_s=settings.max_clock_offset_s, wall=wall)
        self.metrics = EdgeMetrics()
        self.metrics_port: int | None = None
        self._unrecorded: dict[tuple[str, str | None], int] = {}
        self._confirming = False  # the gateway sends ack_recorded (seen now or in the journal)
        self._resends: set[asyncio.Task[None]] = set()
        self.devices: DevicePort = devices if devices is not None else ModbusDevices()
        self.config_source: ConfigSource | None = None
        self.exit_code = EXIT_OK
        self._site: SiteConfig | None = None
        self._stop = asyncio.Event()
        self._acks = asyncio.Event()
        self._lost_at: float | None = None
        self._journal: Journal | None = None
        self._core: CoreCycle | None = None
        self._link: Link | None = None
        self.ready = asyncio.Event()

    # -- public ------------------------------------------------------------------------------
    @property
    def site(self) -> SiteConfig:
        if self._site is None:
            raise RuntimeError("Expected a loaded capability config, but there is none yet")
        return self._site

    @property
    def core(self) -> CoreCycle:
        assert self._core is not None
        return self._core

    @property
    def link(self) -> Link:
        assert self._link is not None
        return self._link

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        settings = self.settings
        lock = StateLock(settings.state_dir)
        lock.acquire()
        journal = self._journal = Journal(
            settings.state_dir / JOURNAL_FILE, on_commit=self._committed
        )
        try:
            self._confirming = journal.confirms_acks()
            if settings.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve(settings.metrics_port)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot serve /metrics on 127.0.0.1:{settings.metrics_port}: {exc}; "
                        "pick a free --metrics-port"
                    ) from None
                log.info("edge.metrics.serving port=%d path=/metrics", self.metrics_port)
            await self._load_initial_config()
            core = self._core = CoreCycle(
                journal=journal,
                devices=self.devices,
                site=lambda: self.site,
                settings=same_named(
                    CycleSettings,
                    settings,
                    period_ms=settings.cycle_period_ms,
                    capacity=settings.queue_capacity,
                    skew_s=settings.clock_skew_s,
                    defaults=("emergency_reserve",),
                ),
                on_ack=self._acks.set,
                on_system=self._system,
                clock=self.clock,
                metrics=self.metrics,
            )
            await core.recover()
            # Acks sent just before the last stop may never have arrived: send them again.
            await self._resend_unconfirmed(time.time())
            link = same_named(
                LinkSettings, settings, url=settings.ws_url, defaults=("open_timeout_s", "stable_s")
            )
            self._link = Link(link, self)
            return await self._serve()
        finally:
            with contextlib.suppress(Exception):
                await self.devices.close()
            journal.close()
            self.metrics.close()
            lock.release()

    async def _serve(self) -> int:
        tasks = [
            asyncio.create_task(self.core.run(), name="core-cycle"),
            asyncio.create_task(self.link.run(), name="link"),
            asyncio.create_task(self._pump(), name="ack-pump"),
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        log.info(
            "edge.agent.started edge_id=%s config_version=%s config_source=%s state_dir=%s",
            self.settings.edge_id,
            self.site.version,
            self.config_source,
            self.settings.state_dir,
        )
        self.ready.set()
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                log.error("edge.agent.crashed task=%s error=%r", task.get_name(), task.exception())
                self.exit_code = EXIT_FAILED
        await self._shutdown(tasks)
        stopper.cancel()
        log.info(
            "edge.agent.stopped edge_id=%s exit_code=%d", self.settings.edge_id, self.exit_code
        )
        return self.exit_code

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        await self.core.stop()
        await self.core.abandon_queue()
        # Give queued acks a moment to leave while the session is still up.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_ON_STOP_S):
                while self.link.is_open and self._journal_unsent() > 0:
                    self._acks.set()
                    await asyncio.sleep(0.02)
        await self.link.close()
        for task in [*tasks, *self._resends]:
            task.cancel()
        await asyncio.gather(*tasks, *self._resends, return_exceptions=True)

    def _journal_unsent(self) -> int:
        assert self._journal is not None
        return self._journal.unsent_count()

    # -- link handler ------------------------------------------------------------------------
    async def on_open(self) -> None:
        journal = self._journal
        assert journal is not None
        if self._lost_at is not None:
            again = await self._resend_unconfirmed(self._lost_at)
            if again:
                log.info("edge.acks.resending count=%d", again)
        await self._refresh_config()
        self._acks.set()

    def on_close(self) -> None:
        self._lost_at = time.time()
        for task in self._resends:  # the reconnect resends what is still unconfirmed
            task.cancel()

    async def _resend_unconfirmed(self, lost_at: float) -> int:
        """Queue again the final acks that may not have reached the ledger.

        A gateway that confirms acks (it has sent `ack_recorded`): every final ack it has
        not confirmed, up to `ack_retention_s` old. An older gateway: those sent in the
        `ack_resend_window_s` before the loss (an ack counts as forwarded once sent).
        """
        journal = self._journal
        assert journal is not None
        settings = self.settings
        unrecorded_since = time.time() - settings.ack_retention_s if self._confirming else None
        return await journal.resend_since(
            lost_at - settings.ack_resend_window_s, unrecorded_since=unrecorded_since
        )

    async def on_message(self, data: str | bytes) -> None:
        """Answer one gateway frame; no frame can stop the link."""
        body = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        frame = decode_frame(body)
        try:
            if isinstance(frame, Notice):
                await self._notice(frame)
            elif isinstance(frame, BadFrame):
                await self._bad_frame(frame, body)
            else:
                await self._command(frame, body)
        except Exception as exc:  # a bug or a journal failure: answer if we can, go on
            command_id = frame.command_id if not isinstance(frame, Notice) else None
            log.exception(
                "edge.frame.failed command_id=%s error=%r excerpt=%r", command_id, exc, body[:200]
            )
            if isinstance(frame, EdgeCommand) and await self._refuse_untaken(frame, exc):
                return
            self.metrics.frames_unanswerable.inc()

    async def _refuse_untaken(self, cmd: EdgeCommand, exc: Exception) -> bool:
        """Refuse (`internal`) a command whose handling raised, when that is safe: only if
        the journal positively holds nothing of it, so it was never queued and will never
        be written. One the journal holds is answered from there by the pump; one it cannot
        read stays unanswered here (a wrong `rejected` could hide a device write) and the
        gateway's verdict reports it. True when the gateway was answered."""
        journal = self._journal
        assert journal is not None
        try:
            taken = journal.lookup(cmd.command_id) is not None
        except Exception:
            log.exception("edge.frame.unanswered command_id=%s: journal unreadable", cmd.command_id)
            return False
        if taken:
            self._acks.set()
            return True
        answer = ack(
            cmd.command_id,
            "rejected",
            code=ErrorCode.INTERNAL,
            message=(
                f"the edge agent failed to take this command ({exc}); it was not queued and "
                "will not be written: check the edge's log, then send it again"
            ),
        )
        # Not journaled: the journal may be what failed, and a redelivery is taken afresh.
        if not await self.link.send(_encode(answer).decode()):
            return False
        self.metrics.frames_rejected.inc()
        log_transition(cmd.command_id, self.settings.edge_id, "rejected", code=ErrorCode.INTERNAL)
        return True

    async def _notice(self, notice: Notice) -> None:
        journal = self._journal
        assert journal is not None
        error = notice.error
        command_id = notice.command_id
        if notice.type == "ack_recorded" and command_id is not None:
            self._confirming = True
            self._unrecorded.pop((command_id, notice.status), None)
            await journal.mark_recorded(command_id, notice.status, "recorded")
            self._update_awaiting()
            return
        if notice.type == "ack_unrecorded" and command_id is not None:
            self._confirming = True
            key = (command_id, notice.status)
            attempt = self._unrecorded.get(key, 0)
            self._unrecorded[key] = attempt + 1
            delay = min(_UNRECORDED_FIRST_S * 2**attempt, _UNRECORDED_MAX_S)
            log.warning(
                "edge.ack.unrecorded command_id=%s status=%s resend_in_s=%.1f code=%s message=%r",
                command_id,
                notice.status,
                delay,
                None if error is None else error.code,
                None if error is None else error.message,
            )
            task = asyncio.create_task(self._resend_later(command_id, notice.status, delay))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)
            return
        if notice.type == "ack_refused" and command_id is not None:
            self._unrecorded.pop((command_id, notice.status), None)
            await journal.mark_recorded(command_id, notice.status, "refused")
            self.metrics.acks_refused.inc()
            self._update_awaiting()
        log.warning(
            "edge.notice type=%s command_id=%s code=%s message=%r status=%s",
            notice.type,
            command_id,
            None if error is None else error.code,
            None if error is None else error.message,
            notice.status,
        )

    async def _resend_later(self, command_id: str, status: str | None, delay_s: float) -> None:
        await asyncio.sleep(delay_s)  # the backoff itself, not a synchronisation
        journal = self._journal
        assert journal is not None
        if await journal.requeue(command_id, status):
            self._acks.set()

    async def _bad_frame(self, frame: BadFrame, body: bytes) -> None:
        journal = self._journal
        assert journal is not None
        if frame.command_id is None:
            self.metrics.frames_unanswerable.inc()
            log.error(
                "edge.frame.unanswerable error=%r excerpt=%r: no valid command id in it, so no "
                "ack can answer it; the gateway's audit will show the command timed out",
                frame.message,
                body[:200],
            )
            return
        if journal.lookup(frame.command_id) is not None:
            await journal.resend(frame.command_id, 0)
            self._acks.set()
            return
        answer = ack(
            frame.command_id,
            "rejected",
            code=ErrorCode.INVALID_COMMAND,
            message=f"the edge could not read this command: {frame.message}",
        )
        meta = CommandMeta(frame.command_id, "unknown", "unknown", "unknown")
        await journal.record(meta, body, answer)
        self.metrics.frames_rejected.inc()
        log_transition(
            frame.command_id,
            self.settings.edge_id,
            "rejected",
            code=answer.error.code if answer.error else None,
        )
        self._acks.set()

    async def _command(self, cmd: EdgeCommand, body: bytes) -> None:
        journal = self._journal
        assert journal is not None
        if cmd.sent_at is not None:
            self.metrics.clock_offset.set(self.clock.observe(cmd.sent_at, self.clock.wall()))
        stored = await journal.resend(cmd.command_id, cmd.delivery)
        if stored is not None:
            # Known id (a redelivery): answer from the journal, never execute again.
            log.info(
                "command.duplicate command_id=%s delivery=%d state=%s",
                cmd.command_id,
                cmd.delivery,
                stored.state,
            )
            self._acks.set()
            return
        with tracing.span("edge.validate", cmd.traceparent, command_id=cmd.command_id):
            verdict = validate(
                cmd,
                self.site,
                self.clock.wall(),
                edge_id=self.settings.edge_id,
                skew_s=self.settings.clock_skew_s,
                remaining_s=None if cmd.remaining_ms is None else cmd.remaining_ms / 1000,
                clock_problem=self.core.clock_problem(),
                max_override_s=self.settings.max_override_s,
            )
        if isinstance(verdict, Rejection):
            answer = ack(cmd.command_id, "rejected", code=verdict.code, message=verdict.message)
            meta = CommandMeta(cmd.command_id, cmd.command_type.value, cmd.priority, cmd.source)
            await journal.record(meta, body, answer)
            log_transition(
                cmd.command_id, self.settings.edge_id, "rejected", code=verdict.code.value
            )
            self._acks.set()
            return
        await self.core.submit(cmd, verdict, body)

    # -- acks --------------------------------------------------------------------------------
    async def _pump(self) -> None:
        """Send the journal's unsent acks, in order, whenever a session is open."""
        journal = self._journal
        assert journal is not None
        while True:
            await self._acks.wait()
            self._acks.clear()
            while self.link.is_open:
                batch = journal.unsent(100)
                if not batch:
                    break
                sent: list[int] = []
                for entry in batch:
                    if not await self.link.send(self._stamped(entry.ack)):
                        break
                    sent.append(entry.seq)
                await journal.mark_sent(sent)
                self._update_awaiting()
                if len(sent) < len(batch):
                    break

    def _stamped(self, stored: bytes) -> str:
        """The ack as stored, carrying the clock offset measured now."""
        offset_ms = self.clock.offset_ms
        if offset_ms is None:
            return stored.decode()
        answer = msgspec.structs.replace(_ack_decoder.decode(stored), clock_offset_ms=offset_ms)
        return _encode(answer).decode()

    def _update_awaiting(self) -> None:
        journal = self._journal
        assert journal is not None
        self.metrics.acks_awaiting.set(
            journal.awaiting_count(time.time() - self.settings.ack_retention_s)
            if self._confirming
            else journal.unsent_count()
        )

    def _committed(self, seconds: float, writes: int) -> None:
        # Called on the journal's writer thread; prometheus-client metrics are thread-safe.
        self.metrics.fsync_seconds.observe(seconds)
        self.metrics.commit_writes.observe(writes)

    # -- config ------------------------------------------------------------------------------
    async def _load_initial_config(self) -> None:
        """--config FILE, else the cache, else the cloud, else the shipped config."""
        settings = self.settings
        raw: bytes | None = None
        if settings.config_file is not None:
            try:
                raw = settings.config_file.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read --config {settings.config_file}: {exc}") from None
            self._adopt(raw, ConfigSource.FILE, cache=True)
            return
        raw = read_cached(settings.state_dir)
        if raw is not None:
            try:
                self._adopt(raw, ConfigSource.CACHE, cache=False)
                return
            except ConfigError as exc:
                log.warning("edge.config.cache_unusable error=%s", exc)
        cloud_problem = ""
        try:
            raw = await self._fetch_cloud_config()
        except ConfigError as exc:
            cloud_problem = str(exc)
            log.warning("edge.config.fetch_failed error=%s", exc)
        if raw is not None:
            self._adopt(raw, ConfigSource.CLOUD, cache=True)
            return
        raw = shipped_config(settings.edge_id)
        if raw is not None:
            self._adopt(raw, ConfigSource.SHIPPED, cache=False)
            return
        raise ConfigError(
            f"no capability config for edge {settings.edge_id!r}: none cached in "
            f"{settings.state_dir}, none from the gateway ({cloud_problem or 'it has none'}), "
            "none shipped with the agent; pass --config FILE"
        )

    def _adopt(self, raw: bytes, source: ConfigSource, *, cache: bool) -> SiteConfig:
        site = check_edge(decode_config(raw), self.settings.edge_id, source.value)
        for device_id, host, port in self.settings.modbus:
            site = site.with_address(device_id, host, port)
        if cache:
            write_cached(self.settings.state_dir, raw)
        previous = self._site
        self._site = site
        self.config_source = source
        if self._core is not None:
            assert self._journal is not None
            self._core.controllers.load(site, self._journal.controllers())
        log.info(
            "edge.config.loaded version=%s source=%s previous=%s",
            site.version,
            source.value,
            None if previous is None else previous.version,
        )
        return site

    async def _fetch_cloud_config(self) -> bytes | None:
        settings = self.settings
        return await fetch_config(
            settings.gateway_url, settings.edge_id, settings.token, settings.config_fetch_timeout_s
        )

    async def _refresh_config(self) -> None:
        """At connect: take the cloud's config if its version differs."""
        try:
            raw = await self._fetch_cloud_config()
            if raw is None:
                return
            fresh = decode_config(raw)
            if fresh.version != self.site.version:
                self._adopt(raw, ConfigSource.CLOUD, cache=True)
        except ConfigError as exc:
            log.warning("edge.config.refresh_failed error=%s", exc)

    async def _system(self, plan: SystemPlan, cmd: EdgeCommand) -> Rejection | None:
        if plan.action == "restart":
            log.info("edge.agent.restart_requested command_id=%s", cmd.command_id)
            self.exit_code = EXIT_RESTART
            self._stop.set()
            return None
        try:
            raw = await self._fetch_cloud_config()
            if raw is None:
                return Rejection(
                    ErrorCode.CONFIG_SYNC_FAILED,
                    "the gateway has no config for this edge (HTTP 404); kept the old one",
                )
            self._adopt(raw, ConfigSource.CLOUD, cache=True)
        except ConfigError as exc:
            return Rejection(
                ErrorCode.CONFIG_SYNC_FAILED,
                f"{exc}; kept version {self.site.version!r}",
            )
        return None
