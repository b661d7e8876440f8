"""The domain: a Notice becomes checkpoint requests, a ``saved`` becomes a commit, a commit a ``durable``.

One *episode* per notice acted on (a spot interruption, a maintenance event, SIGTERM, a rebalance under
``on_rebalance = "checkpoint"``, or a ``spotd checkpoint`` drill). Every trainer connected when the episode
starts is asked once, and so is any trainer that says hello while it is open: with nobody connected the
episode stays open until its deadline rather than ending at once (right after boot the trainer may still be
importing torch). Each ``saved`` is handed to the store at once, without waiting for the others, and
answered ``durable`` when committed; a save still uploading at the deadline keeps trying until the
notice's own time. A final episode ends in Completed (everything durable) or Stopped (the canonical log line
says what was missing), once every save it got has an outcome.

The episode's books and what is read off them live in :mod:`.episode`; making one save durable (the commit
and its retries) in :mod:`.commits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from spotd import protocol
from spotd.config import Config
from spotd.daemon.commits import Committer
from spotd.daemon.deadline import UploadBudget, log_fields
from spotd.daemon.episode import (
    Episode,
    Save,
    detect_seconds,
    drill_notice,
    episode_reason,
    episode_times,
    notice_summary,
    reason_label,
    shutdown_notice,
    status_view,
)
from spotd.daemon.ipc import Session
from spotd.daemon.job import Finisher
from spotd.daemon.overlap import Overlap
from spotd.daemon.parts import Member, Placement, StepParts, placement_of
from spotd.daemon.sinks import Sinks
from spotd.daemon.watched import WATCHER, WatchAnswer, Watching
from spotd.errors import PathEscape, ProtocolError, StoreError
from spotd.events import InstanceIdentity, Notice, NoticeKind, Phase, SessionEventKind, format_time
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, CommitInfo, Manifest, Priority, resolve_inside

__all__ = ["WATCHER", "Coordinator", "TrainerChannel", "Watching"]

log = get_logger("spotd.coordinator")

NO_TRAINER_FIX: Final = (
    "start the training process with spotd.client.connect() (spotd.torch.Checkpointer does), "
    "or use [sync] mode = 'watch'"
)
#: What `spotd checkpoint` prints when nobody could be asked.
NO_TRAINER_MESSAGE: Final = f"no trainer connected; {NO_TRAINER_FIX}"


class TrainerChannel(Protocol):
    """What the coordinator needs of the socket server (:class:`spotd.daemon.ipc.IpcServer`)."""

    @property
    def trainers(self) -> list[Session]: ...
    async def send(self, session: Session, message: dict[str, Any]) -> bool: ...
    async def broadcast(self, message: dict[str, Any]) -> int: ...


class Coordinator:
    """Implements :class:`spotd.daemon.ipc.Handler`; the monitor loop calls :meth:`handle_notice`.

    In watch mode (:meth:`attach_watcher`) the watcher answers every episode as a trainer would: it commits
    what is settled in checkpoint_dir at once, at emergency priority, and the record says what it did.
    """

    __slots__ = (
        "_bg",
        "_budget",
        "_checkpoint_dir",
        "_clock",
        "_committer",
        "_config",
        "_finisher",
        "_identity",
        "_imds_up",
        "_ipc",
        "_last_durable",
        "_metrics",
        "_overlap",
        "_parts",
        "_phase",
        "_placements",
        "_seen_notices",
        "_sinks",
        "_sleep_until",
        "_started",
        "_store",
        "_training_seen",
        "_wall",
        "_watched",
        "current",
    )

    def __init__(
        self,
        *,
        config: Config,
        store: CheckpointStore,
        metrics: Metrics,
        identity: InstanceIdentity,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        imds_up: Callable[[], bool] = lambda: True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        sleep_until: Callable[[float], Awaitable[None]] | None = None,
        sinks: Sinks | None = None,
    ) -> None:
        """``sleep`` pauses between commit attempts; ``sleep_until(t)`` returns once ``clock()`` reaches
        ``t`` (an episode's close). Tests inject both with the clocks, so time moves only when they say."""
        self._config = config
        # The ledger, the webhook, the job metrics: emit() never waits on them.
        self._sinks = sinks or Sinks()
        self._training_seen = False
        self._finisher: Finisher | None = None
        self._store = store
        self._metrics = metrics
        self._identity = identity
        self._clock = clock
        self._wall = wall
        self._sleep_until = sleep_until or (lambda t: asyncio.sleep(max(0.0, t - clock())))
        self._imds_up = imds_up
        self._checkpoint_dir = Path(config.checkpoint_dir).resolve()
        self._committer = Committer(
            store=store,
            metrics=metrics,
            checkpoint_dir=self._checkpoint_dir,
            on_durable=self._committed,
            on_failed=self._commit_failed,
            clock=clock,
            sleep=sleep,
        )
        # Multi-rank runs: a step's saves are committed together, as this node's part of one checkpoint.
        self._parts = StepParts(
            store=store,
            metrics=metrics,
            checkpoint_dir=self._checkpoint_dir,
            on_durable=self._committed,
            on_failed=self._commit_failed,
            clock=clock,
            sleep_until=self._sleep_until,
            spawn=self._spawn,
        )
        self._placements: dict[str, Placement] = {}  # trainer session id → its place in a multi-rank run
        self._ipc: TrainerChannel | None = None
        self._watched: WatchAnswer | None = None
        self._phase = Phase.STARTING
        self._bg: set[asyncio.Task[Any]] = set()
        self._seen_notices: list[dict[str, Any]] = []
        self._last_durable: Manifest | None = None
        self._started = clock()
        self.current: Episode | None = None
        self._budget = UploadBudget(store=store, metrics=metrics)
        self._overlap = Overlap(
            store=store, checkpoint_dir=self._checkpoint_dir, enabled=config.store.overlap, spawn=self._spawn
        )

    # -- wiring ---------------------------------------------------------------------------------------------
    def attach(self, ipc: TrainerChannel) -> None:
        self._ipc = ipc

    def attach_finisher(self, finisher: Finisher) -> None:
        """Who ends the job when a trainer says ``finished`` or ``spotd complete`` asks."""
        self._finisher = finisher

    @property
    def last_durable(self) -> Manifest | None:
        return self._last_durable

    def trainer_count(self) -> int:
        return len(self._ipc.trainers) if self._ipc else 0

    def attach_watcher(self, watcher: Watching) -> None:
        """Watch mode: the watcher answers every episode (see :class:`.watched.WatchAnswer`)."""
        self._watched = WatchAnswer(
            watcher=watcher,
            committer=self._committer,
            job_id=self._config.job_id,
            instance_id=self._identity.instance_id,
            clock=self._clock,
            last_durable=lambda: self._last_durable,
        )

    @property
    def phase(self) -> Phase:
        return self._phase

    def set_phase(self, phase: Phase) -> None:
        if phase is not self._phase:
            log.info("phase.changed", previous=self._phase.value, phase=phase.value)
        self._phase = phase
        self._metrics.set_phase(phase)

    def set_last_durable(self, manifest: Manifest | None) -> None:
        if manifest is None:
            return
        self._budget.saw(manifest)
        if self._last_durable is None or manifest.created_at >= self._last_durable.created_at:
            self._last_durable = manifest
            self._metrics.last_durable_timestamp.set(manifest.created_at.timestamp())
            if manifest.step is not None:
                self._metrics.last_durable_step.set(manifest.step)

    def _committed(self, manifest: Manifest) -> None:
        self.set_last_durable(manifest)
        self._sinks.emit(
            SessionEventKind.DURABLE,
            name=manifest.name,
            step=manifest.step,
            bytes=manifest.total_bytes,
            trainer=manifest.trainer,
            reason=manifest.reason,
        )

    def _commit_failed(self, info: CommitInfo, error: str) -> None:
        self._sinks.emit(SessionEventKind.UPLOAD_FAILED, trainer=info.trainer, step=info.step, error=error)

    # -- notices ---------------------------------------------------------------------------------------------
    async def handle_notice(self, notice: Notice) -> Episode | None:
        """Act on a notice; returns the episode started, or None when policy says not to checkpoint."""
        self._seen_notices.append(notice_summary(notice))
        del self._seen_notices[:-20]
        if notice.kind is NoticeKind.REBALANCE:
            policy = self._config.policy.on_rebalance
            if policy != "checkpoint":
                log.warning("rebalance.recommended", policy=policy, acted=False)
                return None
        if notice.final and notice.not_after is not None:
            self._metrics.interruption_deadline.set(notice.not_after.timestamp())
        current = self.current
        if current is not None and not current.settled.is_set() and self._covers(current, notice):
            # Already asked; a second signal (SIGTERM after the ITN) must not restart the trainers' saves,
            # nor while the saves it got are still uploading.
            log.info(
                "notice.coalesced",
                kind=notice.kind.value,
                action=notice.action,
                request_id=current.request_id,
            )
            return current
        return await self._start_episode(notice)

    def _covers(self, current: Episode, notice: Notice) -> bool:
        """Whether the open episode already asks for what ``notice`` would: a final one covers anything; a
        non-final one covers another non-final notice that is not more urgent (hibernate during a drill
        asks again, due now)."""
        if current.final:
            return True
        if notice.final:
            return False
        return (
            current.deadline <= episode_times(notice, now=self._wall(), policy=self._config.policy).deadline
        )

    async def handle_withdrawn(self, notice: Notice) -> None:
        """The notice is gone (a maintenance event cancelled, an ITN taken back): the instance stays.

        Its episode, if still open, runs to its end and writes its record, but ends in Training; one that
        already ended Completed or Stopped gives the phase back to Training, since the job goes on.
        """
        episode = self.current
        if episode is None or episode.notice.key != notice.key:
            return
        episode.withdrawn = True
        if episode.final:
            self._metrics.interruption_deadline.set(0)
        log.info("notice.withdrawn_acted", request_id=episode.request_id, key=notice.key)
        if episode.settled.is_set():
            self._training_goes_on(because="notice withdrawn")

    def _job_ended(self) -> bool:
        """The job itself has ended (``finished``, ``spotd complete``, a stopping condition): its phase is
        the job's, and no episode moves it any more."""
        return self._finisher is not None and self._finisher.ended

    def _training_goes_on(self, *, because: str) -> None:
        """After a final episode ended, a sign that the job did not: the phase is Training again."""
        if self._phase in (Phase.COMPLETED, Phase.STOPPED) and not self._job_ended():
            log.info("phase.resumed", reason=because)
            self.set_phase(Phase.TRAINING)

    async def _start_episode(self, notice: Notice) -> Episode:
        now = self._wall()
        started = self._clock()
        times = episode_times(notice, now=now, policy=self._config.policy)
        episode = Episode(
            request_id=uuid.uuid4().hex[:16],
            notice=notice,
            reason=episode_reason(notice),
            final=notice.final,
            deadline=times.deadline,
            started=started,
            closes_at=started + times.closes_in_s,
            retry_until=started + times.retry_for_s,
        )
        self.current = episode
        if episode.final and not self._job_ended():
            self.set_phase(Phase.INTERRUPTED)
        trainers = self._ipc.trainers if self._ipc else []
        for session in trainers:
            episode.asked[session.id] = session.name
            self._placement(session)
        live = {session.id for session in trainers}
        for sid in [sid for sid in self._placements if sid not in live]:
            del self._placements[sid]  # gone before this episode: no save can answer for it any more
        if self._watched is not None:
            episode.asked[WATCHER] = WATCHER
        self._metrics.checkpoint_requests.labels(reason=reason_label(notice)).inc()
        if notice.kind is not NoticeKind.DRILL:
            self._sinks.emit(
                SessionEventKind.NOTICE,
                at=notice.detected_at,
                kind=notice.kind.value,
                action=notice.action,
                final=notice.final,
                not_after=None if notice.not_after is None else format_time(notice.not_after),
                request_id=episode.request_id,
                trainers=len(trainers),
            )
        left = (episode.deadline - now).total_seconds()
        episode.upload = self._budget.estimate(trainers=trainers, seconds_left=left, last=self._last_durable)
        sent = await self._ipc.broadcast(episode.frame()) if self._ipc and trainers else 0
        episode.asked_at = self._clock()
        episode.asked_wall = self._wall()
        self._metrics.detect_seconds.observe(detect_seconds(notice, episode.asked_wall))
        log.info(
            "checkpoint.requested",
            request_id=episode.request_id,
            reason=episode.reason,
            final=episode.final,
            deadline=format_time(episode.deadline),
            trainers=sent,
            seconds_left=round((episode.deadline - self._wall()).total_seconds(), 3),
            **log_fields(episode.upload),
        )
        self._budget.warn(episode.upload, request_id=episode.request_id, reason=reason_label(notice))
        if self._watched is not None:
            self._spawn(self._watched.answer(episode))
        elif not trainers:
            log.warning(
                "checkpoint.no_trainers",
                request_id=episode.request_id,
                waiting_seconds=round(episode.closes_at - self._clock(), 3),
                note="a trainer that connects before the deadline is asked then",
                fix=NO_TRAINER_FIX,
            )
        self._spawn(self._watch_episode(episode))
        return episode

    async def _watch_episode(self, episode: Episode) -> None:
        """Close the episode once every asked trainer answered or at ``closes_at``; settle it (record, phase)
        once every save it got has an outcome.

        The second wait needs no deadline of its own: each commit stops retrying at ``retry_until`` and an
        attempt under way is bounded by the store's own timeouts.
        """
        expiry = asyncio.get_running_loop().create_task(self._expire(episode))
        try:
            while not (episode.answered() or episode.expired):
                episode.done.clear()
                await episode.done.wait()
        finally:
            expiry.cancel()
        self._close(episode)
        while episode.uploading():
            episode.done.clear()
            await episode.done.wait()
        await self._settle(episode)

    async def _expire(self, episode: Episode) -> None:
        await self._sleep_until(episode.closes_at)
        episode.expired = True
        episode.done.set()

    def _close(self, episode: Episode) -> None:
        """Stop waiting for trainers: from here a trainer saying hello is not asked, and one that never
        saved is lost; saves still uploading go on until ``retry_until`` and decide the record."""
        if episode.finished:
            return
        episode.finished = True
        episode.closed.set()
        if episode.uploading():
            log.warning(
                "checkpoint.still_uploading",
                request_id=episode.request_id,
                trainers=episode.uploading(),
                retry_seconds=round(max(0.0, episode.retry_until - self._clock()), 3),
                note="the commit keeps trying until the notice's own time; the record follows its outcome",
            )

    async def _settle(self, episode: Episode) -> None:
        """Every save of the episode has an outcome: set the phase and write the canonical record."""
        if episode.settled.is_set():
            return
        self._close(episode)
        episode.settled.set()
        lost = episode.lost()
        durable = episode.durable()
        ok = not lost
        if ok and durable:
            last = max(s.committed_at or 0.0 for s in durable)
            self._metrics.notice_to_durable_seconds.observe(last - episode.started)
        if self._job_ended():
            # The job's own end (Completed, Stopped) stands; this episode's record says what it lost.
            log.info("phase.kept", phase=self._phase.value, reason="the job has ended")
        elif episode.final and not episode.withdrawn:
            self.set_phase(Phase.COMPLETED if ok else Phase.STOPPED)
        elif self._phase in (Phase.UPLOADING, Phase.INTERRUPTED):
            self.set_phase(Phase.TRAINING)
        record = episode.record(identity=self._identity, lost=lost)
        log_fn = log.error if not ok else log.warning if record.late else log.info
        log_fn("interruption.handled" if episode.final else "checkpoint.handled", **record.to_dict())
        if episode.final or episode.notice.kind is not NoticeKind.DRILL:
            self._sinks.emit(SessionEventKind.INTERRUPTION, record=record)
            with contextlib.suppress(StoreError, OSError):
                await self._store.write_event(record)

    # -- ipc.Handler -----------------------------------------------------------------------------------------
    def welcome(self, session: Session) -> dict[str, Any]:
        return {
            "checkpoint_dir": str(self._checkpoint_dir),
            "job_id": self._config.job_id,
            "instance_id": self._identity.instance_id,
            "phase": self._phase.value,
            # A `writing` frame before a save (a file, or a directory) is welcome; a rank's too: its streams
            # join its node part.
            **self._overlap.welcome(),
        }

    async def on_ready(self, session: Session) -> None:
        if session.role == "trainer":
            self._placement(session)
            self._trainers_changed()
        if session.role == "trainer" and not self._training_seen:
            self._training_seen = True
            self._sinks.emit(SessionEventKind.TRAINING, trainer=session.name)
        episode = self.current
        # A control session (`spotd status`, `spotd checkpoint`) saves nothing: asking it would make the
        # episode wait for it and count it as lost when it leaves.
        if session.role != "trainer" or episode is None or episode.finished or self._ipc is None:
            return
        if session.id not in episode.asked:
            episode.asked[session.id] = session.name
        await self._ipc.send(session, episode.frame())

    def _trainers_changed(self) -> None:
        """Periodic uploads give way to the trainers connected now (``store.yield_to_trainer``)."""
        if self._ipc is not None:
            self._store.set_trainers(s.peer_pid for s in self._ipc.trainers if s.peer_pid)

    async def on_writing(self, session: Session, frame: dict[str, Any]) -> None:
        asked = (
            (c := self.current) is not None and c.final and not c.settled.is_set() and session.id in c.asked
        )
        placement = self._placement(session)
        # A rank's file goes where its step's node part will put it: under the run's name for that step.
        name = placement.checkpoint_name(frame.get("step")) if placement is not None else None
        await self._overlap.writing(session, frame, emergency=asked or bool(frame.get("final")), name=name)

    async def on_saved(self, session: Session, frame: dict[str, Any]) -> None:
        raw_path = frame["path"]
        request_id = frame.get("request_id")
        try:
            # Resolving walks the tree (every symlink inside a directory checkpoint): not on the loop.
            source = await asyncio.to_thread(resolve_inside, self._checkpoint_dir, raw_path)
        except PathEscape as exc:
            log.warning("checkpoint.path_refused", trainer=session.name, path=raw_path, error=str(exc))
            raise ProtocolError(protocol.E_PATH, str(exc)) from None
        if not await asyncio.to_thread(source.exists):
            raise ProtocolError(
                protocol.E_PATH,
                f"{raw_path!r} does not exist under {self._checkpoint_dir}; "
                "report the path after the file is written",
            )
        episode = self._episode_of(session, request_id, final=bool(frame.get("final")))
        save = Save(session.id, session.name, raw_path, frame.get("step"), self._clock())
        # Once the record is written a save no longer changes it; it is still committed at emergency pace.
        if episode is not None and not episode.settled.is_set():
            episode.saves[session.id] = save
            self._metrics.checkpoint_seconds.observe(save.saved_at - (episode.asked_at or episode.started))
            if episode.final and self._phase is Phase.INTERRUPTED:
                self.set_phase(Phase.UPLOADING)
        # A save nobody asked for that must still go out at once: the trainer got SIGTERM (reason "sigterm").
        own_final = bool(frame.get("final")) and episode is None
        final = own_final or bool(episode and episode.final)
        if episode is not None:
            reason = episode.reason
        elif own_final:
            reason = frame.get("reason") or "final"
        else:
            reason = "periodic"
            if self.current is None or self.current.settled.is_set():
                # Whatever the last final episode said, this trainer is still training.
                self._training_goes_on(because=f"{session.name} saved step {save.step} on its own schedule")
        emergency = episode is not None or own_final
        log.info(
            "checkpoint.saved",
            trainer=session.name,
            path=raw_path,
            step=save.step,
            request_id=request_id,
            emergency=emergency,
            final=final,
            reason=reason,
        )
        info = CommitInfo(
            job_id=self._config.job_id,
            step=save.step,
            trainer=session.name,
            # A shared path (a DCP directory) holds every rank's part: one checkpoint, not rank 0's.
            rank=None if frame.get("shared") else session.rank,
            world_size=None if frame.get("shared") else session.world_size,
            request_id=request_id,
            reason=reason,
            instance_id=self._identity.instance_id,
            final=final,
        )
        ipc = self._ipc

        async def reply(frame: dict[str, Any]) -> bool:
            return ipc is not None and await ipc.send(session, frame)

        streams = self._overlap.take(session, source)
        placement = self._placement(session) if save.step is not None else None
        if placement is not None:
            shared = bool(frame.get("shared"))
            member = Member(placement, save, source, info, reply, episode, emergency, streams)
            covers = self._covered_by(session, placement, save, episode) if shared else []
            self._parts.offer(member, shared=shared, covers=covers)
            return
        priority = Priority.EMERGENCY if emergency else Priority.BACKGROUND
        self._spawn(
            self._committer.commit(
                source, info=info, save=save, episode=episode, reply=reply, priority=priority, streams=streams
            )
        )

    def _placement(self, session: Session) -> Placement | None:
        """The trainer's place in a multi-rank run (None for a single process), read once from its hello."""
        if session.id not in self._placements and (placement := placement_of(session)) is not None:
            self._placements[session.id] = placement
        return self._placements.get(session.id)

    def _episode_of(self, session: Session, request_id: str | None, *, final: bool) -> Episode | None:
        """The open episode a save answers: the one its request id names, or, for a final save of a trainer
        it asked that has not answered yet, that one too (a rank stopped by the agreement when another rank
        was asked first, before its own request arrived, saves with no request id)."""
        current = self.current
        if current is None:
            return None
        if request_id is not None:
            return current if request_id == current.request_id else None
        open_ = not current.settled.is_set() and session.id in current.asked
        return current if final and open_ and session.id not in current.saves else None

    def _covered_by(
        self, session: Session, placement: Placement, save: Save, episode: Episode | None
    ) -> list[Save]:
        """A shared save (local rank 0's sharded directory) answers for this node's other ranks of the run
        that were asked: each gets a save in the episode, durable when the shared one is."""
        if episode is None or episode.settled.is_set():
            return []
        covered: list[Save] = []
        for sid, name in episode.asked.items():
            other = self._placements.get(sid)
            if sid == session.id or sid in episode.saves or other is None:
                continue
            if other.run_id == placement.run_id and other.node_rank == placement.node_rank:
                covered.append(Save(sid, name, save.path, save.step, save.saved_at))
                episode.saves[sid] = covered[-1]
                episode.gone.discard(sid)
        return covered

    async def commit_path(self, source: Path, *, trainer: str, step: int | None = None) -> Manifest | None:
        """Commit a path the watcher found (watch mode); see :class:`.watched.WatchAnswer`."""
        assert self._watched is not None, "commit_path is watch mode's"
        episode = self.current if self.current and not self.current.settled.is_set() else None
        return await self._watched.commit_path(source, trainer=trainer, step=step, episode=episode)

    async def on_failed(self, session: Session, frame: dict[str, Any]) -> None:
        message = frame.get("message") or "trainer reported a failed checkpoint"
        self._metrics.checkpoint_failures.inc()
        log.error(
            "checkpoint.trainer_failed",
            trainer=session.name,
            message=message,
            request_id=frame.get("request_id"),
        )
        episode = self.current
        if episode is not None and frame.get("request_id") == episode.request_id:
            episode.failed[session.id] = message
            episode.done.set()

    async def on_status(self, session: Session) -> dict[str, Any]:
        return self.status()

    async def on_drill(self, session: Session, frame: dict[str, Any]) -> dict[str, Any]:
        if self._watched is None and not (self._ipc and self._ipc.trainers):
            # A drill is someone at a terminal: tell them now rather than after drill_timeout.
            log.warning("drill.no_trainers", fix=NO_TRAINER_FIX)
            return {
                "ok": False,
                "message": NO_TRAINER_MESSAGE,
                "trainers": 0,
                "durable": [],
                "missing": [],
                "lost": [NO_TRAINER_MESSAGE],
            }
        notice = drill_notice(reason=frame.get("reason") or "drill", now=self._wall())
        episode = await self.handle_notice(notice)
        if episode is None:
            return {"ok": False, "message": "not started"}
        if frame.get("wait", True):
            # _watch_episode settles it under its own deadline (policy.drill_timeout): the reply then says
            # what became of every save, not what was still uploading.
            await episode.settled.wait()
        # The reply says what is outstanding in "missing"; its record's "lost" stays empty, as it always was.
        record = episode.record(identity=self._identity, lost=())
        return {"ok": episode.all_durable(), **record.to_dict(), "missing": episode.outstanding()}

    async def on_finished(self, session: Session, frame: dict[str, Any]) -> dict[str, Any]:
        """``finished`` (a trainer: the job is done at ``step``) or ``spotd complete`` (a control client)."""
        if self._finisher is None:
            return {"ok": False, "status": self._phase.value, "message": "this daemon cannot end the job"}
        control = session.role == "control"
        return await self._finisher.finish(
            status=Phase.COMPLETED,
            reason=frame.get("reason") or ("complete" if control else "finished"),
            step=frame.get("step"),
            ask_trainers=bool(frame.get("checkpoint", control)),
        )

    def on_disconnect(self, session: Session) -> None:
        self._overlap.drop(session)
        if session.role == "trainer":
            self._trainers_changed()
        episode = self.current
        if episode is None or session.id not in episode.asked:
            # Kept while an episode asked it: a shared save of its node may still answer for it.
            self._placements.pop(session.id, None)
        if episode is not None and not episode.finished and session.id in episode.asked:
            if session.id not in episode.saves:
                episode.gone.add(session.id)
                log.warning("checkpoint.trainer_gone", trainer=session.name, request_id=episode.request_id)
            episode.done.set()

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        view = status_view(
            phase=self._phase,
            job_id=self._config.job_id,
            identity=self._identity,
            imds_up=self._imds_up(),
            store_uri=self._store.uri,
            checkpoint_dir=self._checkpoint_dir,
            uptime_s=self._clock() - self._started,
            trainers=self._ipc.trainers if self._ipc else [],
            episode=self.current,
            notices=self._seen_notices,
            last_durable=self._last_durable,
        )
        # Multi-rank steps some local rank has not reported yet (their ranks and nodes commit them as one).
        view["waiting_for_ranks"] = self._parts.pending()
        # The periodic uploads: the rate the deadline estimate uses, the last one, how they give way.
        view["uploads"] = self._store.background_view()
        return view

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        task.add_done_callback(_log_task_error)

    async def last_chance(self, *, grace_s: float) -> None:
        """SIGTERM: a final notice, deadline now + grace; returns once it is handled or the grace is up."""
        nobody = self._watched is None and not (self._ipc and self._ipc.trainers)
        if nobody and (self.current is None or self.current.settled.is_set()):
            # Nobody to ask, and no trainer will come: the training unit stops before spotd does.
            log.info("shutdown.nothing_to_save")
            return
        # A second past the grace: the episode's own watcher settles it by then, this only backs it up.
        give_up_at = asyncio.get_running_loop().time() + grace_s + 1.0
        episode = await self.handle_notice(shutdown_notice(now=self._wall(), grace_s=grace_s))
        if episode is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(give_up_at):
                await episode.settled.wait()

    async def drain(self, *, grace_s: float) -> None:
        """Give in-flight commits ``grace_s`` to finish, then cancel what is left; an episode not settled by
        then is recorded with what is true at that moment (a save still uploading is lost to this daemon)."""
        await self._parts.close()
        await self._overlap.close()
        if self._bg:
            _, pending = await asyncio.wait(set(self._bg), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        episode = self.current
        if episode is not None and not episode.settled.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._settle(episode)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task.failed", error=repr(task.exception()))
