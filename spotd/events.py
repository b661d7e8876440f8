"""Value types for what IMDS tells us and what spotd decides about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = [
    "InstanceAction",
    "InstanceIdentity",
    "Notice",
    "NoticeKind",
    "Phase",
    "RebalanceRecommendation",
    "ScheduledEvent",
    "format_time",
    "parse_time",
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
    the time, which simulators and IMDS itself may move on every poll.
    """

    kind: NoticeKind
    action: str
    key: str
    detected_at: datetime
    final: bool
    #: When the instance goes away (the ITN ``time``, NotBefore, or now for hibernate); None if unknown.
    not_after: datetime | None = None
    #: When the source says it was issued (rebalance ``noticeTime``); None if unknown.
    issued_at: datetime | None = None
    detail: dict[str, str] = field(default_factory=dict)
