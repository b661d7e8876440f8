"""Value types for what IMDS tells us and what spotd decides about it."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "DurableCheckpoint",
    "InstanceAction",
    "InstanceIdentity",
    "InterruptionRecord",
    "Notice",
    "NoticeKind",
    "Phase",
    "RebalanceRecommendation",
    "ScheduledEvent",
    "SessionEvent",
    "SessionEventKind",
    "format_time",
    "parse_time",
    "region_of_zone",
]


class Phase(enum.StrEnum):
    """Job phases, after SageMaker's secondary status."""

    STARTING = "Starting"
    DOWNLOADING = "Downloading"
    TRAINING = "Training"
    INTERRUPTED = "Interrupted"
    UPLOADING = "Uploading"
    COMPLETED = "Completed"
    STOPPED = "Stopped"


class NoticeKind(enum.StrEnum):
    SPOT = "spot"  # spot/instance-action: terminate | stop | hibernate
    REBALANCE = "rebalance"  # events/recommendations/rebalance
    MAINTENANCE = "maintenance"  # events/maintenance/scheduled
    SHUTDOWN = "shutdown"  # SIGTERM from systemd: the last chance
    DRILL = "drill"  # `spotd checkpoint`
    JOB = "job"  # the job ends: `spotd complete`, or policy.max_run / policy.max_wait exceeded


def parse_time(text: str) -> datetime:
    """Parse IMDS times: RFC 3339 (``2026-11-25T04:00:00Z``) or the maintenance format
    (``21 Jan 2019 09:00:43 GMT``). Always returns an aware UTC datetime."""
    text = text.strip()
    for fmt in ("%d %b %Y %H:%M:%S GMT", "%a, %d %b %Y %H:%M:%S GMT"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            pass
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


_REGION_RE = re.compile(r"^([a-z]{2}(?:-[a-z]+)+-\d+)")


def region_of_zone(zone: str) -> str:
    """``us-east-1a`` → ``us-east-1``, ``us-west-2-lax-1a`` → ``us-west-2``; the zone itself if no match."""
    match = _REGION_RE.match(zone)
    return match.group(1) if match else zone


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, millisecond precision: the wire format of deadlines."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    instance_id: str = "unknown"
    instance_type: str = "unknown"
    availability_zone: str = "unknown"
    life_cycle: str = "unknown"  # "spot" | "on-demand" | "scheduled"


@dataclass(frozen=True, slots=True)
class InstanceAction:
    """``spot/instance-action``: ``{"action": "terminate", "time": "2026-11-25T04:02:00Z"}``."""

    action: str  # terminate | stop | hibernate
    time: datetime


@dataclass(frozen=True, slots=True)
class RebalanceRecommendation:
    """``events/recommendations/rebalance``: ``{"noticeTime": "..."}``."""

    notice_time: datetime


@dataclass(frozen=True, slots=True)
class ScheduledEvent:
    """One entry of ``events/maintenance/scheduled``."""

    code: str  # instance-reboot | system-reboot | system-maintenance | instance-retirement | instance-stop
    event_id: str
    state: str  # active | completed | canceled
    not_before: datetime
    not_after: datetime | None = None
    description: str = ""

    @property
    def disruptive(self) -> bool:
        """Stops or reboots the instance, so whatever is in memory is lost."""
        return self.state == "active" and self.code in {
            "instance-stop",
            "instance-retirement",
            "system-reboot",
            "instance-reboot",
        }


@dataclass(frozen=True, slots=True)
class Notice:
    """Something that should make trainers checkpoint.

    ``key`` identifies a notice across polls: kind and action (or the maintenance event id), never
    the time, which simulators and IMDS itself may move on every poll. ``final`` means the instance goes
    away with its memory (terminate, stop, maintenance, SIGTERM): trainers save and stop. A spot hibernate
    is not final (memory and processes survive it) but carries ``not_after`` = now: save at once, go on.
    """

    kind: NoticeKind
    action: str
    key: str
    detected_at: datetime
    final: bool
    #: When the instance goes away (the ITN ``time``, NotBefore) or hibernates (now); None if unknown.
    not_after: datetime | None = None
    #: When the source says it was issued (rebalance ``noticeTime``); None if unknown.
    issued_at: datetime | None = None
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DurableCheckpoint:
    """One trainer's save of an episode that reached the store."""

    trainer: str
    name: str  # the committed checkpoint's name in the store
    step: int | None


@dataclass(frozen=True, slots=True)
class InterruptionRecord:
    """One episode handled: what was asked, what became durable, what was lost, and how long each part took.

    One value, many consumers: the canonical log line, the ``events/`` record in the store, the reply to
    ``spotd checkpoint``, and later the webhook and the job ledger. Durations are seconds, unrounded here;
    :meth:`to_dict` rounds them to milliseconds the way the ``events/`` files always had them.
    """

    request_id: str
    kind: NoticeKind
    action: str
    reason: str
    final: bool
    instance_id: str
    instance_type: str
    #: When the instance goes away, as the notice said; None when it did not say.
    notice_time: datetime | None
    detected_at: datetime
    deadline: datetime
    detect_seconds: float
    #: Asked → the last trainer's ``saved``; None when nobody saved.
    checkpoint_seconds: float | None
    #: The slowest ``saved`` → committed; None when nothing was committed.
    upload_seconds: float | None
    #: Notice handed to the coordinator → the last commit; None when nothing was committed.
    notice_to_durable_seconds: float | None
    total_bytes: int
    trainers: int
    durable: tuple[DurableCheckpoint, ...]
    #: One sentence per trainer whose work did not reach the store, naming it and why.
    lost: tuple[str, ...]
    #: One sentence per save that became durable only after the deadline (inside deadline_margin, before
    #: the instance's own time): not lost, but a sign the margin or the upload needs attention.
    late: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON values under the keys the ``events/`` files and the log line have always used; ``late``
        only when something was, so every record without it keeps the bytes it always had."""
        out = {
            "request_id": self.request_id,
            "kind": self.kind.value,
            "action": self.action,
            "reason": self.reason,
            "final": self.final,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "notice_time": None if self.notice_time is None else format_time(self.notice_time),
            "detected_at": format_time(self.detected_at),
            "deadline": format_time(self.deadline),
            "detect_seconds": _rounded(self.detect_seconds),
            "checkpoint_seconds": _rounded(self.checkpoint_seconds),
            "upload_seconds": _rounded(self.upload_seconds),
            "notice_to_durable_seconds": _rounded(self.notice_to_durable_seconds),
            "bytes": self.total_bytes,
            "trainers": self.trainers,
            "durable": [{"trainer": d.trainer, "name": d.name, "step": d.step} for d in self.durable],
            "lost": list(self.lost),
        }
        if self.late:
            out["late"] = list(self.late)
        return out

    def to_json(self) -> bytes:
        """The ``events/<time>-<instance>.json`` body: sorted keys, so records diff cleanly."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()


def _rounded(seconds: float | None) -> float | None:
    # Milliseconds: finer is clock noise at these scales, coarser hides a slow detection.
    return None if seconds is None else round(seconds, 3)


class SessionEventKind(enum.StrEnum):
    """What happened in one instance session, in the job ledger's words (``<job>/ledger/``)."""

    BOOT = "boot"  # the daemon started on this instance: identity, region
    RESTORED = "restored"  # restore on boot done: name, step, bytes, seconds (name null: nothing restored)
    TRAINING = "training"  # the first trainer connected: trainer
    NOTICE = "notice"  # a notice acted on: kind, action, final, not_after
    DURABLE = "durable"  # a checkpoint committed: name, step, bytes, trainer, emergency
    UPLOAD_FAILED = "upload_failed"  # a commit given up: trainer, step, error
    INTERRUPTION = "interruption"  # an episode ended: the InterruptionRecord's dict
    FINISHING = "finishing"  # the job is ending: status, reason (final checkpoint and output to go)
    ENDED = "ended"  # the job ended: status (Completed | Stopped), reason, checkpoint, output
    END = "end"  # the daemon stops cleanly on this instance: phase


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One thing the job ledger, the webhook and the job metrics hear about: a kind, when, its JSON fields,
    and for INTERRUPTION the episode's record itself."""

    kind: SessionEventKind
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    record: InterruptionRecord | None = None
