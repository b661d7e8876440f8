"""Composition root: builds every part, runs them in one TaskGroup, and shuts down in order.

startup (identity, store check and crash recovery, socket, metrics, restore on boot: :mod:`.boot`) →
READY=1 → main loop (monitors, watchdog, watcher) → SIGTERM: last-chance checkpoint under
``policy.shutdown_grace`` → drain → close, in the reverse order of start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from spotd import __version__
from spotd.aws.ec2 import Ec2
from spotd.aws.imds import ImdsClient
from spotd.aws.pricing import PriceBook
from spotd.aws.session import ClientSettings
from spotd.config import Config
from spotd.daemon import boot
from spotd.daemon.coordinator import Coordinator
from spotd.daemon.costs import price_settings
from spotd.daemon.http import MetricsServer
from spotd.daemon.ipc import IpcServer
from spotd.daemon.job import Finisher, Job, clear_marker, exceeded, marker_path, watch_budgets
from spotd.daemon.monitors import MaintenanceMonitor, Monitor, MonitorLoop, RebalanceMonitor, SpotMonitor
from spotd.daemon.sinks import Sinks
from spotd.daemon.sinks.ledger import LedgerSink
from spotd.daemon.sinks.webhook import WebhookSink
from spotd.daemon.systemd import Notifier, watchdog_loop
from spotd.daemon.watch import Watcher, step_from_name
from spotd.errors import EXIT_FAILURE, EXIT_OK, DaemonAlreadyRunning, DiskFull, StoreError
from spotd.events import InstanceIdentity, Notice, Phase, SessionEventKind, region_of_zone
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, open_store
from spotd.store.ledger import Ledger, session_name
from spotd.store.marker import read_disk_marker
from spotd.store.pacing import warn_if_stalling

__all__ = ["Daemon", "run_daemon"]

log = get_logger("spotd.app")


class Daemon:
    __slots__ = (
        "_config",
        "_coordinator",
        "_executor",
        "_http",
        "_imds",
        "_ipc",
        "_metrics",
        "_notifier",
        "_prices",
        "_sinks",
        "_started",
        "_stop",
        "_store",
    )

    def __init__(
        self,
        *,
        config: Config,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._config = config
        self._metrics = Metrics(registry=registry)
        self._metrics.info.labels(version=__version__, sync_mode=config.sync.mode).set(1)
        self._notifier = notifier or Notifier()
        self._executor = ThreadPoolExecutor(
            max_workers=config.store.concurrency + 4, thread_name_prefix="spotd-io"
        )
        self._stop = asyncio.Event()
        self._imds: ImdsClient | None = None
        self._ipc: IpcServer | None = None
        self._store: CheckpointStore | None = None
        self._coordinator: Coordinator | None = None
        self._http: MetricsServer | None = None
        self._sinks: Sinks | None = None
        self._prices: PriceBook | None = None
        self._started = datetime.now(UTC)

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (``metrics.listen`` may ask for port 0), None while not listening."""
        return None if self._http is None else self._http.port

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        cfg = self._config
        log.info("config.loaded", **cfg.as_dict())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            return await self._run()
        except DaemonAlreadyRunning as exc:
            log.error("daemon.already_running", error=str(exc))
            return EXIT_FAILURE
        finally:
            # Handlers stay until everything is closed: a second SIGTERM must not kill a half-closed daemon.
            await self._close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        cfg = self._config
        imds = self._imds = ImdsClient(
            endpoint=cfg.imds.endpoint,
            timeout_s=cfg.imds.timeout,
            token_ttl_s=cfg.imds.token_ttl,
            allow_v1=cfg.imds.allow_v1,
            metrics=self._metrics,
        )
        identity = await boot.identify(imds, timeout_s=max(3.0, 3 * cfg.imds.timeout))
        # Building a boto3 client takes ~0.5 s of CPU: not on the loop.
        store = self._store = await asyncio.to_thread(
            open_store, cfg, executor=self._executor, metrics=self._metrics
        )
        if cfg.store.uri.startswith("s3://"):
            warn_if_stalling(cfg.store.background_niceness)
        job, sinks = self._job(store, identity)
        coordinator = self._coordinator = Coordinator(
            config=cfg,
            store=store,
            metrics=self._metrics,
            identity=identity,
            imds_up=lambda: imds.up,
            sinks=sinks,
        )
        region = cfg.ec2.region or region_of_zone(identity.availability_zone)
        finisher = Finisher(
            config=cfg,
            job=job,
            control=coordinator,
            store=store,
            sinks=sinks,
            identity=identity,
            ec2=lambda: Ec2(
                settings=ClientSettings(endpoint_url=cfg.ec2.endpoint_url, region=region),
                executor=self._executor,
            ),
            marker=marker_path(cfg),
        )
        coordinator.attach_finisher(finisher)
        await asyncio.to_thread(Path(cfg.checkpoint_dir).mkdir, parents=True, exist_ok=True)
        self._ipc = IpcServer(
            path=cfg.socket.path, handler=coordinator, metrics=self._metrics, group=cfg.socket.group
        )
        coordinator.attach(self._ipc)
        await self._ipc.start()
        if cfg.metrics.listen:
            self._http = MetricsServer(
                listen=cfg.metrics.listen,
                registry=self._metrics.registry,
                phase=lambda: coordinator.phase.value,
                imds_last_ok=lambda: imds.last_ok,
                poll_interval_s=cfg.imds.poll_interval,
                imds_timeout_s=cfg.imds.timeout,
            )
            await self._http.start()
        coordinator.set_phase(Phase.DOWNLOADING)
        self._notifier.status("checking the checkpoint store")
        boot_started = time.monotonic()
        try:
            at_boot = await boot.retry_at_boot(
                lambda: self._from_the_store(store, job=job, finisher=finisher, sinks=sinks),
                notifier=self._notifier,
                wait_s=cfg.policy.boot_store_wait,
            )
        except (StoreError, OSError) as exc:
            log.error(
                "startup.store_failed",
                error=str(exc),
                fix=exc.fix if isinstance(exc, DiskFull) else boot.BOOT_STORE_FIX,
                waited_seconds=round(time.monotonic() - boot_started, 1),
            )
            return EXIT_FAILURE
        coordinator.set_last_durable(at_boot.newest)
        if not finisher.ended:
            coordinator.set_phase(Phase.TRAINING)
        self._notifier.ready(f"watching IMDS; socket {cfg.socket.path}")
        log.info(
            "daemon.ready",
            socket=cfg.socket.path,
            metrics_port=self.metrics_port,
            instance_id=identity.instance_id,
            store=store.uri,
        )
        ledger_sink = next(s for s in sinks.sinks if isinstance(s, LedgerSink))
        monitors: list[Monitor] = [
            SpotMonitor(imds=imds),
            RebalanceMonitor(imds=imds),
            MaintenanceMonitor(imds=imds, lead_s=cfg.policy.maintenance_lead, metrics=self._metrics),
        ]
        loop_ = MonitorLoop(
            monitors=monitors,
            interval_s=cfg.imds.poll_interval,
            on_notice=self._on_notice,
            on_withdrawn=coordinator.handle_withdrawn,
            metrics=self._metrics,
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(loop_.run(), name="monitors"),
                tg.create_task(ledger_sink.heartbeats(), name="heartbeat"),
                tg.create_task(job.figures_loop(interval_s=1.0), name="job-figures"),
                tg.create_task(watch_budgets(job, finisher, cfg), name="budgets"),
            ]
            interval = self._notifier.watchdog_interval()
            if interval:
                tasks.append(
                    tg.create_task(watchdog_loop(self._notifier, interval_s=interval), name="watchdog")
                )
            watching: asyncio.Task[None] | None = None
            if cfg.sync.mode == "watch":
                watcher = self._watcher(coordinator, committed=at_boot.committed_on_disk)
                # The watcher answers notices in the trainer's place: attached before it first scans.
                coordinator.attach_watcher(watcher)
                watching = tg.create_task(watcher.run(), name="watch")
            await self._stop.wait()
            log.info("daemon.stopping", phase=coordinator.phase.value)
            self._notifier.stopping()
            self._notifier.extend_timeout(cfg.policy.shutdown_grace * 1.5 + 5.0)
            # Stop watching IMDS first: the shutdown notice below is the last one we act on.
            for task in tasks:
                task.cancel()
            # The watcher goes on through the last chance: a commit it has under way finishes (the
            # last-chance flush waits for it) rather than being cut off and uploaded again.
            await coordinator.last_chance(grace_s=cfg.policy.shutdown_grace)
            if watching is not None:
                watching.cancel()
        await coordinator.drain(grace_s=max(1.0, cfg.policy.shutdown_grace / 2))
        # on_complete (cancel, terminate) may still be on its way to EC2: it is why the job ended this way.
        await finisher.wait(timeout_s=15.0)
        sinks.emit(SessionEventKind.END, phase=coordinator.phase.value)
        return EXIT_OK

    async def _from_the_store(
        self, store: CheckpointStore, *, job: Job, finisher: Finisher, sinks: Sinks
    ) -> boot.StoreAtBoot:
        """What boot asks of the store, in order; :func:`boot.retry_at_boot` runs it again on trouble."""
        cfg = self._config
        await boot.prepare_store(store)
        past = await job.load()
        if past.end is not None:
            # A persistent request relaunched an instance for a job that is done: no restore, no training.
            await finisher.ended_at_boot(past.end)
        elif (reason := exceeded(job, cfg, now=datetime.now(UTC))) is not None:
            # Past a stopping condition already (max_wait while no capacity): stop before training starts.
            log.warning("job.budget_exceeded", reason=reason, at="boot")
            await finisher.finish(status=Phase.STOPPED, reason=reason)
        else:
            await asyncio.to_thread(clear_marker, cfg)
            return await self._restore(store, sinks)
        return boot.StoreAtBoot(newest=None)

    async def _restore(self, store: CheckpointStore, sinks: Sinks) -> boot.StoreAtBoot:
        """Restore on boot (:mod:`.boot`), recorded in the ledger: what, whether it downloaded, how long."""
        cfg = self._config
        on_disk = await asyncio.to_thread(read_disk_marker, Path(cfg.checkpoint_dir))
        restore_started = datetime.now(UTC)
        at_boot = await boot.restore_on_start(
            store,
            checkpoint_dir=Path(cfg.checkpoint_dir),
            enabled=cfg.policy.restore_on_start,
            notifier=self._notifier,
        )
        newest = at_boot.newest
        now_on_disk = await asyncio.to_thread(read_disk_marker, Path(cfg.checkpoint_dir))
        sinks.emit(
            SessionEventKind.RESTORED,
            name=None if newest is None else newest.name,
            step=None if newest is None else newest.step,
            bytes=0 if newest is None else newest.total_bytes,
            downloaded=now_on_disk is not None and now_on_disk != on_disk,
            seconds=round((datetime.now(UTC) - restore_started).total_seconds(), 3),
        )
        return at_boot

    def _job(self, store: CheckpointStore, identity: InstanceIdentity) -> tuple[Job, Sinks]:
        """The job's ledger for this session, and the sinks the coordinator tells what happens."""
        cfg = self._config
        ledger = Ledger.of_store(store)
        region = cfg.ec2.region or region_of_zone(identity.availability_zone)
        writer = ledger.writer(
            session=session_name(identity.instance_id, self._started), identity=identity, region=region
        )
        ledger_sink = LedgerSink(writer=writer, metrics=self._metrics)
        # Two tries and a short connect: the figures are looked up again at the next refresh anyway.
        self._prices = PriceBook(
            settings=price_settings(cfg, request_attempts=2, connect_timeout_s=2.0), executor=self._executor
        )
        known = "unknown" not in (identity.instance_type, identity.availability_zone)
        job = Job(
            config=cfg,
            ledger=ledger,
            sink=ledger_sink,
            metrics=self._metrics,
            prices=self._prices if known else None,
        )
        webhooks: list[WebhookSink] = []
        if cfg.notify.webhook:
            webhooks.append(
                WebhookSink(
                    url=cfg.notify.webhook,
                    metrics=self._metrics,
                    job_id=cfg.job_id,
                    identity=identity,
                    template=cfg.notify.template,
                    timeout_s=cfg.notify.timeout,
                    phase=lambda: self._coordinator.phase.value if self._coordinator else "",
                )
            )
        sinks = self._sinks = Sinks(sinks=[ledger_sink, *webhooks])
        sinks.emit(
            SessionEventKind.BOOT,
            at=self._started,
            version=__version__,
            pid=os.getpid(),
            store=store.uri,
        )
        return job, sinks

    async def _on_notice(self, notice: Notice) -> None:
        assert self._coordinator is not None
        await self._coordinator.handle_notice(notice)

    def _watcher(self, coordinator: Coordinator, *, committed: Collection[str]) -> Watcher:
        """Watch mode; ``committed`` names what checkpoint_dir holds that the store already has."""

        async def ready(path: Path) -> None:
            await coordinator.commit_path(path, trainer="watch", step=step_from_name(path.name))

        return Watcher(
            checkpoint_dir=Path(self._config.checkpoint_dir),
            settle_s=self._config.sync.settle,
            on_ready=ready,
            committed=committed,
        )

    async def _close(self) -> None:
        if self._sinks is not None:
            # The session's last records (its end) are worth a moment, not a stuck shutdown.
            await self._sinks.close(grace_s=3.0)
        if self._prices is not None:
            await self._prices.close()
        if self._ipc is not None:
            await self._ipc.close(grace_s=1.0)
        if self._http is not None:
            await self._http.close()
        if self._imds is not None:
            await self._imds.close()
        if self._store is not None:
            await self._store.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("daemon.stopped")


def run_daemon(config: Config) -> int:
    """Blocking entry point for ``spotd run``."""
    started = datetime.now(UTC)
    daemon = Daemon(config=config)
    code = asyncio.run(daemon.run())
    log.info(
        "daemon.exit",
        code=code,
        ran_seconds=round((datetime.now(UTC) - started).total_seconds(), 1),
        pid=os.getpid(),
    )
    return code
