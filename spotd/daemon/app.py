"""Composition root: builds every part, runs them in one TaskGroup, and shuts down in order.

startup (store check, crash recovery, socket, restore on boot, metrics) → READY=1 → main loop (monitors,
watchdog, watcher) → SIGTERM: last-chance checkpoint under ``policy.shutdown_grace`` → drain → close.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from spotd.aws.imds import ImdsClient
from spotd.config import Config
from spotd.daemon.coordinator import Coordinator
from spotd.daemon.ipc import IpcServer
from spotd.daemon.monitors import MaintenanceMonitor, Monitor, MonitorLoop, RebalanceMonitor, SpotMonitor
from spotd.daemon.systemd import Notifier, watchdog_loop
from spotd.errors import EXIT_FAILURE, EXIT_OK, DaemonAlreadyRunning, ImdsError, RestoreError, StoreError
from spotd.events import InstanceIdentity, Notice, Phase
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, Manifest, open_store
from spotd.store.marker import read_disk_marker, write_disk_marker

__all__ = ["Daemon", "run_daemon"]

log = get_logger("spotd.app")

#: How long boot may spend retrying an unreachable store before giving up (systemd restarts us).
RESTORE_ATTEMPTS = 3


class Daemon:
    __slots__ = (
        "_config",
        "_coordinator",
        "_executor",
        "_imds",
        "_ipc",
        "_metrics",
        "_metrics_runner",
        "_notifier",
        "_stop",
        "_store",
        "metrics_port",
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
        self._notifier = notifier or Notifier()
        self._executor = ThreadPoolExecutor(
            max_workers=config.store.concurrency + 4, thread_name_prefix="spotd-io"
        )
        self._stop = asyncio.Event()
        self._imds: ImdsClient | None = None
        self._ipc: IpcServer | None = None
        self._store: CheckpointStore | None = None
        self._coordinator: Coordinator | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port: int | None = None

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
        self._imds = ImdsClient(
            endpoint=cfg.imds.endpoint,
            timeout_s=cfg.imds.timeout,
            token_ttl_s=cfg.imds.token_ttl,
            allow_v1=cfg.imds.allow_v1,
            metrics=self._metrics,
        )
        identity = await self._identity()
        # Building a boto3 client takes ~0.5 s of CPU: not on the loop.
        self._store = await asyncio.to_thread(open_store, cfg, executor=self._executor, metrics=self._metrics)
        imds = self._imds
        self._coordinator = Coordinator(
            config=cfg, store=self._store, metrics=self._metrics, identity=identity, imds_up=lambda: imds.up
        )
        coordinator = self._coordinator
        await asyncio.to_thread(Path(cfg.checkpoint_dir).mkdir, parents=True, exist_ok=True)
        self._ipc = IpcServer(
            path=cfg.socket.path, handler=coordinator, metrics=self._metrics, group=cfg.socket.group
        )
        coordinator.attach(self._ipc)
        await self._ipc.start()
        await self._start_metrics()
        coordinator.set_phase(Phase.DOWNLOADING)
        self._notifier.status("checking the checkpoint store")
        try:
            await self._store.check_access()
            aborted = await self._store.recover()
            if aborted:
                log.warning("store.recovered", aborted_uploads=aborted)
            await self._restore_on_boot(coordinator)
        except (StoreError, OSError) as exc:
            log.error(
                "startup.store_failed",
                error=str(exc),
                fix="check store.uri, credentials and the IAM policy (docs/iam-policy.json); "
                "systemd retries spotd, and the training unit waits for it",
            )
            return EXIT_FAILURE
        coordinator.set_phase(Phase.TRAINING)
        self._notifier.ready(f"watching IMDS; socket {cfg.socket.path}")
        log.info(
            "daemon.ready",
            socket=cfg.socket.path,
            metrics_port=self.metrics_port,
            instance_id=identity.instance_id,
            store=self._store.uri,
        )
        monitors: list[Monitor] = [
            SpotMonitor(imds=self._imds),
            RebalanceMonitor(imds=self._imds),
            MaintenanceMonitor(imds=self._imds, lead_s=cfg.policy.maintenance_lead, metrics=self._metrics),
        ]
        loop_ = MonitorLoop(
            monitors=monitors,
            interval_s=cfg.imds.poll_interval,
            on_notice=self._on_notice,
            metrics=self._metrics,
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(loop_.run(), name="monitors")]
            interval = self._notifier.watchdog_interval()
            if interval:
                tasks.append(
                    tg.create_task(watchdog_loop(self._notifier, interval_s=interval), name="watchdog")
                )
            if cfg.sync.mode == "watch":
                tasks.append(tg.create_task(self._watch(coordinator), name="watch"))
            await self._stop.wait()
            log.info("daemon.stopping", phase=coordinator.phase.value)
            self._notifier.stopping()
            self._notifier.extend_timeout(cfg.policy.shutdown_grace * 1.5 + 5.0)
            # Stop watching IMDS first: the shutdown notice below is the last one we act on.
            for task in tasks:
                task.cancel()
        await coordinator.last_chance(grace_s=cfg.policy.shutdown_grace)
        await coordinator.drain(grace_s=max(1.0, cfg.policy.shutdown_grace / 2))
        return EXIT_OK

    async def _on_notice(self, notice: Notice) -> None:
        assert self._coordinator is not None
        await self._coordinator.handle_notice(notice)

    async def _identity(self) -> InstanceIdentity:
        assert self._imds is not None
        try:
            async with asyncio.timeout(max(3.0, 3 * self._config.imds.timeout)):
                identity = await self._imds.identity()
        except (TimeoutError, ImdsError) as exc:
            log.warning("imds.identity_unavailable", error=str(exc) or type(exc).__name__)
            identity = InstanceIdentity()
        if identity.life_cycle not in ("spot", "unknown"):
            log.warning(
                "instance.not_spot",
                life_cycle=identity.life_cycle,
                note="spot interruption notices will not come; rebalance and maintenance still watched",
            )
        return identity

    async def _restore_on_boot(self, coordinator: Coordinator) -> None:
        cfg = self._config
        assert self._store is not None
        manifests: list[Manifest] = await self._store.list()
        if manifests:
            coordinator.set_last_durable(manifests[0])
        if not cfg.policy.restore_on_start:
            log.info("restore.skipped", reason="policy.restore_on_start = false")
            return
        if not manifests:
            log.info("restore.nothing", store=self._store.uri)
            return
        newest = manifests[0]
        on_disk = await asyncio.to_thread(read_disk_marker, Path(cfg.checkpoint_dir))
        if on_disk is not None and on_disk >= newest.name:
            log.info("restore.up_to_date", name=on_disk)
            return
        self._notifier.status(f"restoring {newest.name}")
        # A large checkpoint may take longer than TimeoutStartSec allows by default.
        self._notifier.extend_timeout(600.0)
        started = time.monotonic()
        last_error: Exception | None = None
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            try:
                result = await self._store.restore(Path(cfg.checkpoint_dir))
                break
            except RestoreError:
                raise
            except (StoreError, OSError) as exc:
                last_error = exc
                log.warning("restore.retry", attempt=attempt, error=str(exc))
                await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        else:
            raise RestoreError(f"restore failed after {RESTORE_ATTEMPTS} attempts: {last_error}")
        seconds = time.monotonic() - started
        self._metrics.restore_seconds.observe(seconds)
        await asyncio.to_thread(write_disk_marker, Path(cfg.checkpoint_dir), result.manifest)
        log.info(
            "restore.done",
            name=result.manifest.name,
            step=result.manifest.step,
            files=result.files,
            bytes=result.bytes,
            seconds=round(seconds, 3),
            skipped=list(result.skipped),
        )

    async def _watch(self, coordinator: Coordinator) -> None:
        from spotd.daemon.watch import Watcher

        async def ready(path: Path) -> None:
            await coordinator.commit_path(path, trainer="watch")

        watcher = Watcher(
            checkpoint_dir=Path(self._config.checkpoint_dir),
            settle_s=self._config.sync.settle,
            on_ready=ready,
        )
        await watcher.run()

    async def _start_metrics(self) -> None:
        listen = self._config.metrics.listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port))
        await site.start()
        self._metrics_runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.metrics_port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("metrics.listening", host=host, port=self.metrics_port)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle_health(self, request: web.Request) -> web.Response:
        """503 when IMDS has not answered for 3 poll intervals: the daemon would not see a notice."""
        status: dict[str, Any] = self._coordinator.status() if self._coordinator else {"phase": "Starting"}
        imds = self._imds
        limit = 3 * self._config.imds.poll_interval
        last_ok = imds.last_ok if imds else None
        age = None if last_ok is None else time.monotonic() - last_ok
        healthy = age is not None and age <= max(limit, self._config.imds.timeout * 3)
        body = {
            "ok": healthy,
            "imds_last_ok_seconds_ago": None if age is None else round(age, 3),
            "phase": status.get("phase"),
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _close(self) -> None:
        if self._ipc is not None:
            await self._ipc.close(grace_s=1.0)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
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
