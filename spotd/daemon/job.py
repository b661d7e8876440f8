"""The job across instances, as this daemon sees it: the ledger read at boot plus this session's records.

:class:`Job` answers what the rest of the daemon asks about the job (its history so far, the training seconds
the budgets count, when it first started) and keeps the job figures on /metrics current: counts at once,
costs every :data:`COST_REFRESH_S` (they take EC2 and Price List calls). :class:`Finisher` ends the job:
Completed (``finished`` from a trainer, ``spotd complete``) or Stopped (a stopping condition), then
``policy.on_complete``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from spotd.aws.ec2 import Ec2
from spotd.aws.pricing import PriceBook
from spotd.config import Config
from spotd.daemon.costs import price_history
from spotd.daemon.episode import Episode
from spotd.daemon.sinks import Sinks
from spotd.daemon.sinks.ledger import LedgerSink
from spotd.errors import AwsError, StoreError
from spotd.events import InstanceIdentity, Notice, NoticeKind, Phase, SessionEventKind, format_time
from spotd.logs import get_logger
from spotd.metrics import JobFigures, Metrics
from spotd.store import CheckpointStore, Manifest
from spotd.store.base import BaseStore
from spotd.store.history import JobHistory, summarize
from spotd.store.ledger import JobEnd, Ledger, LedgerView
from spotd.store.output import upload_output

__all__ = [
    "COST_REFRESH_S",
    "MARKER",
    "MAX_RUN_EXCEEDED",
    "MAX_WAIT_EXCEEDED",
    "Finisher",
    "Job",
    "JobControl",
    "clear_marker",
    "exceeded",
    "job_notice",
    "marker_path",
    "watch_budgets",
]

log = get_logger("spotd.job")

#: How often the job's cost figures are looked up again while the daemon runs.
COST_REFRESH_S: Final = 300.0
#: The file beside the socket that says the job ended (the training unit's ConditionPathExists=!).
MARKER: Final = "job-ended"
#: How long the job's last records and messages may take to go out before on_complete ends the instance.
ON_COMPLETE_FLUSH_S: Final = 10.0


class Job:
    """The job's history: ``load()`` once at boot, then ``history()`` whenever asked."""

    __slots__ = ("_config", "_costed", "_ledger", "_metrics", "_prices", "_prior", "_sink", "_wall")

    def __init__(
        self,
        *,
        config: Config,
        ledger: Ledger,
        sink: LedgerSink,
        metrics: Metrics,
        prices: PriceBook | None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._sink = sink
        self._metrics = metrics
        self._prices = prices
        self._wall = wall
        self._prior = LedgerView(job_id=config.job_id, records=(), heartbeats={}, end=None)
        self._costed: JobHistory | None = None

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def session(self) -> str:
        return self._sink.session

    @property
    def prior(self) -> LedgerView:
        return self._prior

    async def load(self) -> LedgerView:
        """Read what earlier sessions recorded; a store that cannot be read leaves the job's past unknown
        (logged: budgets then count this session only) rather than stopping the daemon."""
        try:
            view = await self._ledger.read()
        except (StoreError, OSError) as exc:
            log.warning(
                "ledger.read_failed",
                error=str(exc),
                note="earlier sessions unknown: policy.max_run and the job metrics count this session only",
            )
            return self._prior
        self._prior = view
        log.info(
            "ledger.loaded",
            sessions=len(view.sessions()),
            records=len(view.records),
            unreadable=len(view.unreadable),
            ended=None if view.end is None else view.end.status.value,
        )
        self.update_figures()
        return view

    def history(self) -> JobHistory:
        """The job so far, this session included, without costs."""
        return summarize(self._sink.view(self._prior), now=self._wall())

    def training_seconds(self) -> float:
        return self.history().training_seconds

    def first_started_at(self) -> datetime:
        started = self.history().first_started_at
        return started or self._wall()

    def update_figures(self) -> None:
        """The job figures on /metrics: counts from the history now, costs as last looked up."""
        history = self.history()
        costed = self._costed
        savings = None if costed is None or costed.savings_percent is None else costed.savings_percent / 100
        self._metrics.job_figures = JobFigures(
            sessions=len(history.sessions),
            interruptions=history.interruptions,
            training_seconds=history.training_seconds,
            cost_dollars=None if costed is None else costed.cost_usd,
            on_demand_cost_dollars=None if costed is None else costed.on_demand_cost_usd,
            savings_ratio=savings,
            lost_work_dollars=None if costed is None else costed.lost_work_usd,
            budgets_remaining=self.budgets_remaining(history),
        )

    def budgets_remaining(self, history: JobHistory) -> tuple[tuple[str, float], ...]:
        policy = self._config.policy
        out: list[tuple[str, float]] = []
        if policy.max_run:
            out.append(("max_run", policy.max_run - history.training_seconds))
        if policy.max_wait:
            started = history.first_started_at or self._wall()
            out.append(("max_wait", policy.max_wait - (self._wall() - started).total_seconds()))
        return tuple(out)

    async def refresh_costs(self) -> JobHistory | None:
        """Look the prices up again; None when prices are not looked up here."""
        if self._prices is None:
            return None
        costed = await price_history(self.history(), self._prices)
        if costed.cost_usd is not None:
            self._costed = costed
        self.update_figures()
        return costed

    async def figures_loop(self, *, interval_s: float = 1.0, cost_every_s: float = COST_REFRESH_S) -> None:
        """Keep the job figures current until cancelled: counts every ``interval_s``, costs less often."""
        next_cost = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self._prices is not None and loop.time() >= next_cost:
                next_cost = loop.time() + cost_every_s
                try:
                    await self.refresh_costs()
                except Exception as exc:  # a price lookup never stops the daemon
                    log.warning("costs.refresh_failed", error=repr(exc))
            self.update_figures()
            await asyncio.sleep(interval_s)


def job_notice(*, reason: str, now: datetime, within_s: float) -> Notice:
    """The job ends (``spotd complete``, a stopping condition): a final notice of the job's own, so every
    trainer saves and stops; its deadline is ``within_s`` away (less the usual margin)."""
    return Notice(
        kind=NoticeKind.JOB,
        action=reason,
        key=f"job:{reason}",
        detected_at=now,
        final=True,
        not_after=now + timedelta(seconds=within_s),
        detail={"reason": reason},
    )


class JobControl(Protocol):
    """What ending the job needs of the coordinator."""

    @property
    def phase(self) -> Phase: ...
    @property
    def last_durable(self) -> Manifest | None: ...
    def set_phase(self, phase: Phase) -> None: ...
    def trainer_count(self) -> int: ...
    async def handle_notice(self, notice: Notice) -> Episode | None: ...


class Finisher:
    """Ends the job once: the final checkpoint, the output, END.json (conditional), the marker the training
    unit checks, then ``policy.on_complete``. A second end (a stopping condition racing ``finished``) gets
    the answer of the first."""

    __slots__ = (
        "_bg",
        "_config",
        "_control",
        "_ec2",
        "_ended",
        "_identity",
        "_job",
        "_lock",
        "_marker",
        "_sinks",
        "_store",
        "_wall",
    )

    def __init__(
        self,
        *,
        config: Config,
        job: Job,
        control: JobControl,
        store: CheckpointStore,
        sinks: Sinks,
        identity: InstanceIdentity,
        ec2: Callable[[], Ec2],
        marker: Path,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._job = job
        self._control = control
        self._store = store
        self._sinks = sinks
        self._identity = identity
        self._ec2 = ec2
        self._marker = marker
        self._wall = wall
        self._lock = asyncio.Lock()
        self._ended: dict[str, Any] | None = None
        self._bg: set[asyncio.Task[Any]] = set()

    @property
    def ended(self) -> bool:
        return self._ended is not None

    async def finish(
        self, *, status: Phase, reason: str, step: int | None = None, ask_trainers: bool = False
    ) -> dict[str, Any]:
        """End the job as ``status`` (Completed, or Stopped for a stopping condition) and answer what
        happened; ``ok`` False (and the job goes on) when ``step``'s checkpoint is not durable."""
        async with self._lock:
            if self._ended is not None:
                return self._ended
            previous = self._control.phase
            if step is not None:
                newest = self._control.last_durable
                if newest is None or newest.step is None or newest.step < step:
                    return {
                        "ok": False,
                        "status": previous.value,
                        "message": f"the newest durable checkpoint is at step "
                        f"{None if newest is None else newest.step}, not {step}: report the final "
                        "checkpoint with saved() and wait_durable() before finished()",
                    }
            log.info("job.finishing", status=status.value, reason=reason, step=step)
            self._sinks.emit(SessionEventKind.FINISHING, status=status.value, reason=reason)
            if ask_trainers and self._control.trainer_count():
                episode = await self._control.handle_notice(
                    job_notice(reason=reason, now=self._wall(), within_s=self._config.policy.drill_timeout)
                )
                if episode is not None:
                    # Its watcher settles it by the notice's own time, whatever the trainers do: then every
                    # final save has an outcome, and the newest durable one is the job's last.
                    await episode.settled.wait()
            self._control.set_phase(Phase.UPLOADING)
            output = await self._upload_output()
            newest = self._control.last_durable
            end = JobEnd(
                job_id=self._config.job_id,
                status=status,
                reason=reason,
                at=self._wall(),
                session=self._job.session,
                instance_id=self._identity.instance_id,
                checkpoint=None if newest is None else newest.name,
                step=None if newest is None else newest.step,
                output=output,
            )
            try:
                end, ours = await self._job.ledger.mark_ended(end)
            except (StoreError, OSError) as exc:
                log.error(
                    "job.end_not_recorded",
                    error=str(exc),
                    fix="the store refused END.json; the job is not marked ended, so a new instance would "
                    "train it again: check the store and run `spotd complete` again",
                )
                self._control.set_phase(previous)
                return {"ok": False, "status": previous.value, "message": f"writing END.json failed: {exc}"}
            self._sinks.emit(SessionEventKind.ENDED, at=end.at, **_fields(end), ours=ours)
            await self.mark_ended_here(end)
            answer = {"ok": True, **end.to_dict(), "on_complete": self._config.policy.on_complete}
            self._ended = answer
            log.info("job.ended", **answer)
            self._spawn(self._on_complete())
            return answer

    async def mark_ended_here(self, end: JobEnd) -> None:
        """This instance knows the job ended: the phase says so and the training unit will not start."""
        await asyncio.to_thread(_write_marker, self._marker, end)
        self._control.set_phase(end.status)

    async def ended_at_boot(self, end: JobEnd) -> None:
        """A new instance booted for a job that already ended (a persistent request relaunched it)."""
        log.warning(
            "job.already_ended",
            status=end.status.value,
            reason=end.reason,
            at=format_time(end.at),
            note="nothing restored; the training unit will not start (ConditionPathExists in its unit)",
        )
        self._sinks.emit(SessionEventKind.ENDED, **_fields(end), already=True)
        await self.mark_ended_here(end)
        self._ended = {"ok": True, **end.to_dict(), "on_complete": self._config.policy.on_complete}
        self._spawn(self._on_complete())

    async def _upload_output(self) -> str | None:
        directory = self._config.output.dir
        if not directory or not isinstance(self._store, BaseStore):
            return None
        try:
            return await upload_output(self._store, Path(directory), instance_id=self._identity.instance_id)
        except (StoreError, OSError) as exc:
            log.error(
                "output.upload_failed", dir=directory, error=str(exc), fix="check the store; the job ends"
            )
            self._sinks.emit(SessionEventKind.UPLOAD_FAILED, trainer="output", error=str(exc))
            return None

    async def _on_complete(self) -> None:
        """``policy.on_complete``, after the job's last records and messages had their moment to go out."""
        action = self._config.policy.on_complete
        if action == "none":
            return
        await self._sinks.flush(timeout_s=ON_COMPLETE_FLUSH_S)
        instance_id = self._identity.instance_id
        if instance_id == "unknown":
            log.error("job.on_complete_skipped", action=action, reason="the instance id is unknown (no IMDS)")
            return
        ec2 = self._ec2()
        try:
            done: dict[str, Any] = {"action": action, "instance_id": instance_id}
            if action == "cancel-request":
                # Cancel first: terminating an instance of a persistent request makes EC2 launch another.
                request = await ec2.spot_request_of(instance_id)
                if request is not None:
                    done["request_id"] = request.request_id
                    done["request_state"] = await ec2.cancel_spot_request(request.request_id)
                done["instance_state"] = await ec2.terminate(instance_id)
            elif action == "terminate":
                done["instance_state"] = await ec2.terminate(instance_id)
            elif action == "stop":
                done["instance_state"] = await ec2.stop(instance_id)
            log.info("job.on_complete", **done)
        except AwsError as exc:
            log.error("job.on_complete_failed", action=action, instance_id=instance_id, error=str(exc))
        finally:
            await ec2.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def wait(self, *, timeout_s: float) -> None:
        """Give what ``finish`` started (the on_complete call) ``timeout_s`` to finish."""
        if self._bg:
            await asyncio.wait(set(self._bg), timeout=timeout_s)


#: SageMaker's words for the stopping conditions, the reasons a Stopped job gives.
MAX_RUN_EXCEEDED: Final = "MaxRuntimeExceeded"
MAX_WAIT_EXCEEDED: Final = "MaxWaitTimeExceeded"


def exceeded(job: Job, config: Config, *, now: datetime) -> str | None:
    """The stopping condition the job is past, if any: ``policy.max_run`` (training seconds over every
    session) or ``policy.max_wait`` (seconds since the job first started, waiting included)."""
    policy = config.policy
    if not (policy.max_run or policy.max_wait):
        return None
    history = job.history()
    if policy.max_run and history.training_seconds >= policy.max_run:
        return MAX_RUN_EXCEEDED
    started = history.first_started_at
    if policy.max_wait and started is not None and (now - started).total_seconds() >= policy.max_wait:
        return MAX_WAIT_EXCEEDED
    return None


async def watch_budgets(
    job: Job,
    finisher: Finisher,
    config: Config,
    *,
    interval_s: float = 1.0,
    wall: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Stop the job (a final checkpoint, Stopped with the reason, on_complete) once a stopping condition is
    exceeded; returns when the job ended. Checked every ``interval_s``: a budget overruns by at most that."""
    if not (config.policy.max_run or config.policy.max_wait):
        return
    while not finisher.ended:
        reason = exceeded(job, config, now=wall())
        if reason is not None:
            log.warning(
                "job.budget_exceeded",
                reason=reason,
                max_run=config.policy.max_run,
                max_wait=config.policy.max_wait,
                training_seconds=round(job.training_seconds(), 3),
            )
            await finisher.finish(status=Phase.STOPPED, reason=reason, ask_trainers=True)
            return
        await asyncio.sleep(interval_s)


def marker_path(cfg: Config) -> Path:
    """Where the daemon says the job ended, for the training unit's ``ConditionPathExists=!``: beside the
    socket (``/run/spotd/job-ended``, systemd's RuntimeDirectory, so gone at every stop and reboot)."""
    return Path(cfg.socket.path).parent / MARKER


def clear_marker(cfg: Config) -> None:
    """A job that has not ended may train: remove a marker an earlier run left (outside systemd)."""
    marker_path(cfg).unlink(missing_ok=True)


def _write_marker(path: Path, end: JobEnd) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(end.to_json() + b"\n")
    os.replace(tmp, path)


def _fields(end: JobEnd) -> dict[str, Any]:
    """END.json's fields as a ledger record's data (its time is the record's own)."""
    return {k: v for k, v in end.to_dict().items() if k not in ("at", "job_id")}
