"""One episode: a notice acted on, who was asked, what each trainer saved, what reached the store.

Values and pure functions only, no I/O: the coordinator drives an episode, this module keeps its books and
builds what is read off it (the ``checkpoint`` frame, the :class:`~spotd.events.InterruptionRecord`, the
``spotd status`` view).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from spotd import protocol
from spotd.config import PolicyConfig
from spotd.daemon.deadline import UploadEstimate
from spotd.daemon.ipc import Session
from spotd.events import (
    DurableCheckpoint,
    InstanceIdentity,
    InterruptionRecord,
    Notice,
    NoticeKind,
    Phase,
    format_time,
)
from spotd.store import Manifest

__all__ = [
    "Episode",
    "EpisodeTimes",
    "Save",
    "detect_seconds",
    "drill_notice",
    "episode_reason",
    "episode_times",
    "notice_summary",
    "reason_label",
    "shutdown_notice",
    "status_view",
]


@dataclass(slots=True)
class Save:
    """One ``saved`` a trainer reported, and what became of its commit."""

    session_id: str
    trainer: str
    path: str  # as the trainer reported it, relative to checkpoint_dir
    step: int | None
    saved_at: float  # monotonic
    manifest: Manifest | None = None
    error: str | None = None
    committed_at: float | None = None  # monotonic
    attempts: int = 0  # whole-commit attempts so far
    #: Nothing new to upload: ``manifest`` is the commit the disk already matched (watch mode on a notice).
    reused: bool = False


@dataclass(frozen=True, slots=True)
class EpisodeTimes:
    """The three times of an episode, each for its own reader.

    ``deadline`` (wall time) is what trainers are told: when their save should be durable. ``closes_in_s``
    is how long the episode waits for trainers to save; ``retry_for_s`` how long an emergency commit keeps
    trying. Both are seconds from the episode's start, measured on the monotonic clock: it does not run
    while a hibernated instance sleeps, so what was left is still left when it wakes.
    """

    deadline: datetime
    closes_in_s: float
    retry_for_s: float


@dataclass(slots=True)
class Episode:
    """One notice acted on: who was asked, what they saved, what reached the store.

    It *closes* at ``closes_at`` or once every asked trainer has answered (a trainer that never came, or
    left without saving, is waited for until ``closes_at``: a trainer restarted by systemd, or still
    importing torch, is asked when it says hello). It *settles* once every save reported has an outcome,
    which for a save still uploading at the close may be up to ``retry_until`` (the notice's own time):
    only then is the record written, so it says what became of each save.
    """

    request_id: str
    notice: Notice
    reason: str
    final: bool
    deadline: datetime
    started: float  # monotonic, when the notice was handed to us
    closes_at: float = 0.0  # monotonic; see EpisodeTimes
    retry_until: float = 0.0  # monotonic
    asked: dict[str, str] = field(default_factory=dict)  # session id → trainer name
    asked_at: float | None = None
    asked_wall: datetime | None = None
    saves: dict[str, Save] = field(default_factory=dict)  # session id → its save for this request
    failed: dict[str, str] = field(default_factory=dict)  # session id → message
    gone: set[str] = field(default_factory=set)  # asked, then disconnected without saving
    done: asyncio.Event = field(default_factory=asyncio.Event)  # something changed: re-check outstanding()
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # no longer waiting for trainers
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # every save has an outcome; recorded
    finished: bool = False  # closed
    expired: bool = False  # closes_at passed
    withdrawn: bool = False  # the notice went away: the instance stays, training goes on
    upload: UploadEstimate | None = None  # whether the emergency upload should fit, when asked

    def frame(self) -> dict[str, Any]:
        return protocol.checkpoint(
            request_id=self.request_id,
            reason=self.reason,
            deadline=self.deadline,
            final=self.final,
            **(self.upload.frame_fields() if self.upload is not None else {}),
        )

    def waiting(self) -> list[str]:
        """Trainers asked and still here that have neither saved nor reported a failure."""
        return [
            name
            for sid, name in self.asked.items()
            if sid not in self.saves and sid not in self.failed and sid not in self.gone
        ]

    def uploading(self) -> list[str]:
        """Trainers whose save is reported but not yet committed or given up."""
        return [s.trainer for s in self.saves.values() if s.manifest is None and s.error is None]

    def outstanding(self) -> list[str]:
        """Trainers still owing a durable checkpoint (or a failure report)."""
        return self.waiting() + self.uploading()

    def answered(self) -> bool:
        """Nothing left to wait for: someone answered (saved or failed) and nobody asked still owes."""
        return bool(self.saves or self.failed) and not self.outstanding()

    def durable(self) -> list[Save]:
        return [s for s in self.saves.values() if s.manifest is not None]

    def late(self) -> list[str]:
        """One sentence per save that became durable after the episode closed (but before the notice's
        own time, or it would have been given up)."""
        return [
            f"{s.trainer}: durable {s.committed_at - self.closes_at:.1f} s after the deadline"
            for s in self.durable()
            if s.committed_at is not None and s.committed_at > self.closes_at
        ]

    def lost(self) -> list[str]:
        """One sentence per trainer whose work did not reach the store, naming it and why."""
        lost = [f"{name}: no checkpoint before the deadline" for name in self.waiting()]
        lost += [f"{name}: saved, still uploading when the episode ended" for name in self.uploading()]
        lost += [
            f"{s.trainer}: upload failed ({s.error})" for s in self.saves.values() if s.error is not None
        ]
        lost += [f"{self.asked.get(sid, sid)}: {msg}" for sid, msg in self.failed.items()]
        lost += [
            f"{self.asked[sid]}: disconnected before saving"
            for sid in self.gone
            if sid in self.asked and sid not in self.saves
        ]
        if not self.asked:
            lost.append("no trainer was connected")
        return lost

    def all_durable(self) -> bool:
        """Every trainer asked answered, and every save it reported is committed."""
        return (
            bool(self.asked)
            and not self.outstanding()
            and not self.failed
            and all(s.manifest is not None for s in self.saves.values())
        )

    def record(self, *, identity: InstanceIdentity, lost: Sequence[str]) -> InterruptionRecord:
        """The canonical record of this episode; ``lost`` as :meth:`lost` gave it when the episode ended."""
        notice = self.notice
        durable = self.durable()
        uploaded = [s for s in durable if not s.reused]
        saved_at = [s.saved_at for s in self.saves.values()]
        committed = [s.committed_at for s in durable if s.committed_at is not None]
        asked_at = self.asked_at or self.started
        return InterruptionRecord(
            request_id=self.request_id,
            kind=notice.kind,
            action=notice.action,
            reason=self.reason,
            final=self.final,
            instance_id=identity.instance_id,
            instance_type=identity.instance_type,
            notice_time=notice.not_after,
            detected_at=notice.detected_at,
            deadline=self.deadline,
            detect_seconds=detect_seconds(notice, self.asked_wall or notice.detected_at),
            checkpoint_seconds=max(saved_at) - asked_at if saved_at else None,
            upload_seconds=max((s.committed_at or 0) - s.saved_at for s in uploaded) if uploaded else None,
            notice_to_durable_seconds=max(committed) - self.started if committed else None,
            total_bytes=sum(s.manifest.total_bytes for s in uploaded if s.manifest),
            trainers=len(self.asked),
            durable=tuple(
                DurableCheckpoint(trainer=s.trainer, name=s.manifest.name, step=s.step)
                for s in durable
                if s.manifest
            ),
            lost=tuple(lost),
            late=tuple(self.late()),
        )


def drill_notice(*, reason: str, now: datetime) -> Notice:
    """``spotd checkpoint``: a non-final notice of its own, never coalesced with another drill's key."""
    return Notice(
        kind=NoticeKind.DRILL,
        action="checkpoint",
        key=f"drill:{uuid.uuid4().hex}",
        detected_at=now,
        final=False,
        detail={"reason": reason},
    )


def shutdown_notice(*, now: datetime, grace_s: float) -> Notice:
    """SIGTERM: a final notice whose deadline is the end of the grace systemd gives us."""
    return Notice(
        kind=NoticeKind.SHUTDOWN,
        action="sigterm",
        key="shutdown",
        detected_at=now,
        final=True,
        not_after=now + timedelta(seconds=grace_s),
    )


def episode_times(notice: Notice, *, now: datetime, policy: PolicyConfig) -> EpisodeTimes:
    """When every trainer's save should be durable, how long to wait for it, how long to retry its commit.

    A drill or rebalance gets ``drill_timeout`` for all three; a final notice without a time
    ``shutdown_grace``; SIGTERM's own grace is its deadline. A spot or maintenance notice keeps
    ``deadline_margin`` before the instance goes (but never a deadline already past: asking late still
    beats not asking), and its commits keep trying until the instance's own time, since a save durable
    inside the margin is still saved.

    A non-final notice with a time of its own (hibernate: ``not_after`` = now) asks for the save at that
    time and still waits ``drill_timeout`` for it: the instance keeps its memory and processes, so the save
    and its upload carry on across the sleep, and one durable a second after "now" is neither lost nor late.
    """
    if not notice.final:
        wait_s = policy.drill_timeout
        if notice.not_after is not None:
            return EpisodeTimes(deadline=max(now, notice.not_after), closes_in_s=wait_s, retry_for_s=wait_s)
        return EpisodeTimes(deadline=now + timedelta(seconds=wait_s), closes_in_s=wait_s, retry_for_s=wait_s)
    if notice.not_after is None:
        deadline = now + timedelta(seconds=policy.shutdown_grace)
        return EpisodeTimes(
            deadline=deadline, closes_in_s=policy.shutdown_grace, retry_for_s=policy.shutdown_grace
        )
    if notice.kind is NoticeKind.SHUTDOWN:
        left_s = max(0.0, (notice.not_after - now).total_seconds())
        return EpisodeTimes(deadline=notice.not_after, closes_in_s=left_s, retry_for_s=left_s)
    deadline = max(now, notice.not_after - timedelta(seconds=policy.deadline_margin))
    return EpisodeTimes(
        deadline=deadline,
        closes_in_s=(deadline - now).total_seconds(),
        retry_for_s=max(0.0, (notice.not_after - now).total_seconds()),
    )


def episode_reason(notice: Notice) -> str:
    """The ``reason`` trainers are told: the kind, the spot action, or a drill's or job end's own text."""
    if notice.kind in (NoticeKind.DRILL, NoticeKind.JOB):
        return notice.detail.get("reason", notice.kind.value)
    return reason_label(notice)


def reason_label(notice: Notice) -> str:
    # Low cardinality: the kind, plus the spot action, never the drill's free text.
    return f"spot-{notice.action}" if notice.kind is NoticeKind.SPOT else notice.kind.value


def detect_seconds(notice: Notice, asked: datetime) -> float:
    """Seconds from the poll that saw the notice to the trainers being asked.

    When EC2 issued a spot notice is not knowable from IMDS (its ``time`` is the action time, at coarse
    resolution), so the polling share is measured by bench/detect.py against the simulator, not here.
    Rebalance carries its noticeTime, but that is also coarse; it is logged, not mixed in.
    """
    return max(0.0, (asked - notice.detected_at).total_seconds())


def notice_summary(notice: Notice) -> dict[str, Any]:
    """A notice as ``spotd status`` lists it."""
    return {
        "kind": notice.kind.value,
        "action": notice.action,
        "detected_at": format_time(notice.detected_at),
        "not_after": format_time(notice.not_after) if notice.not_after else None,
    }


def status_view(
    *,
    phase: Phase,
    job_id: str,
    identity: InstanceIdentity,
    imds_up: bool,
    store_uri: str,
    checkpoint_dir: Path,
    uptime_s: float,
    trainers: Sequence[Session],
    episode: Episode | None,
    notices: Sequence[dict[str, Any]],
    last_durable: Manifest | None,
) -> dict[str, Any]:
    """The body of the ``status`` reply (``spotd status --json`` prints it)."""
    return {
        "phase": phase.value,
        "job_id": job_id,
        "instance": {
            "id": identity.instance_id,
            "type": identity.instance_type,
            "az": identity.availability_zone,
            "life_cycle": identity.life_cycle,
        },
        "imds_up": imds_up,
        "store": store_uri,
        "checkpoint_dir": str(checkpoint_dir),
        "uptime_seconds": round(uptime_s, 1),
        "trainers": [
            {"name": s.name, "pid": s.pid, "rank": s.rank, "world_size": s.world_size, "uid": s.peer_uid}
            for s in trainers
        ],
        "request": None
        if episode is None
        else {
            "request_id": episode.request_id,
            "reason": episode.reason,
            "final": episode.final,
            "deadline": format_time(episode.deadline),
            "finished": episode.finished,
            "outstanding": episode.outstanding(),
            # Once settled, what became of it: ok, and one sentence per trainer whose work was lost.
            "settled": episode.settled.is_set(),
            "ok": not episode.lost() if episode.settled.is_set() else None,
            "lost": episode.lost() if episode.settled.is_set() else [],
            "late": episode.late(),
            # How long the emergency upload should take at the measured rate, and whether it fits.
            "upload": None if episode.upload is None else episode.upload.view(),
        },
        "notices": list(notices),
        "last_durable": None
        if last_durable is None
        else {
            "name": last_durable.name,
            "step": last_durable.step,
            "time": format_time(last_durable.created_at),
            "bytes": last_durable.total_bytes,
        },
    }
