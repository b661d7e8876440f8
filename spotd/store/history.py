"""A job's story across instances, read off its ledger (:mod:`spotd.store.ledger`): pure functions, no I/O.

:func:`summarize` turns the records into sessions with SageMaker's status words (``Starting → Downloading →
Training → Interrupted → … → Uploading → Completed | Stopped``), training and instance seconds, each
interruption and the work it lost. :func:`with_costs` adds what each session cost from the prices the caller
looked up (``spotd history`` and the daemon ask :class:`spotd.aws.pricing.PriceBook`), and the job's savings
by SageMaker's formula ``(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100``.

The definitions, which docs/operations.md repeats for people:

- *instance seconds*: the daemon's start to the session's end (its clean stop; else its last sign of life,
  or the interruption time a spot notice announced, whichever is later). What EC2 billed, give or take the
  boot before spotd starts.
- *training seconds*: the first trainer connecting to the earliest of the final notice, the job ending, or
  the session's end. ``policy.max_run`` counts these, summed over sessions.
- *billable seconds*: what the session cost, in on-demand seconds: ``cost / on_demand_hourly * 3600``. For
  spot it is below the instance seconds; the savings compare it with the training seconds.
- *lost seconds*: of an interrupted session, training after its newest durable checkpoint (0 when the
  emergency checkpoint became durable); priced at the session's own average hourly price.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

from spotd.events import InstanceIdentity, NoticeKind, Phase, SessionEventKind, format_time, parse_time
from spotd.store.ledger import JobEnd, LedgerRecord, LedgerView

__all__ = [
    "HEARTBEAT_S",
    "Interruption",
    "JobHistory",
    "SessionPrices",
    "SessionSummary",
    "integrate_price",
    "summarize",
    "with_costs",
]

#: How often a running session rewrites its heartbeat; three missed ones and it is presumed gone.
HEARTBEAT_S: Final = 60.0
STALE_S: Final = 3 * HEARTBEAT_S
#: Final notices that take the instance away (the job's own end and drills are not interruptions).
_INTERRUPTING: Final = frozenset(
    {NoticeKind.SPOT.value, NoticeKind.MAINTENANCE.value, NoticeKind.SHUTDOWN.value}
)


@dataclass(frozen=True, slots=True)
class Interruption:
    """One final episode of a session: what was asked, how long until durable, what was lost."""

    kind: str
    action: str
    detected_at: datetime
    notice_time: datetime | None
    notice_to_durable_seconds: float | None
    bytes: int
    durable: bool
    lost: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "action": self.action,
            "detected_at": format_time(self.detected_at),
            "notice_time": None if self.notice_time is None else format_time(self.notice_time),
            "notice_to_durable_seconds": self.notice_to_durable_seconds,
            "bytes": self.bytes,
            "durable": self.durable,
            "lost": list(self.lost),
        }


@dataclass(frozen=True, slots=True)
class SessionPrices:
    """The prices of one session: spot price changes (oldest first; None for an on-demand instance) and the
    on-demand hourly price of its instance type and region (None when unknown)."""

    spot: tuple[tuple[datetime, float], ...] | None
    on_demand_hourly: float | None


@dataclass(frozen=True, slots=True)
class SessionSummary:
    session: str
    instance: InstanceIdentity
    region: str
    started_at: datetime
    ended_at: datetime
    running: bool
    clean_end: bool
    status: Phase
    timeline: tuple[tuple[Phase, datetime], ...]
    restored: str | None
    restored_step: int | None
    training_started_at: datetime | None
    training_seconds: float
    instance_seconds: float
    interruptions: tuple[Interruption, ...]
    last_durable: str | None
    last_durable_step: int | None
    lost_seconds: float
    lost_steps: int | None
    #: What the session cost in USD (spot prices, or on demand for an on-demand instance); None: unknown.
    cost_usd: float | None = None
    on_demand_hourly: float | None = None

    @property
    def billable_seconds(self) -> float | None:
        if self.cost_usd is None or not self.on_demand_hourly:
            return None
        return self.cost_usd / self.on_demand_hourly * 3600.0

    @property
    def lost_usd(self) -> float | None:
        if self.cost_usd is None:
            return None
        if self.lost_seconds <= 0 or self.instance_seconds <= 0:
            return 0.0
        return self.lost_seconds * self.cost_usd / self.instance_seconds

    def to_dict(self) -> dict[str, Any]:
        inst = self.instance
        return {
            "session": self.session,
            "instance": {
                "id": inst.instance_id,
                "type": inst.instance_type,
                "az": inst.availability_zone,
                "life_cycle": inst.life_cycle,
                "region": self.region,
            },
            "status": self.status.value,
            "running": self.running,
            "started_at": format_time(self.started_at),
            "ended_at": format_time(self.ended_at),
            "timeline": [{"status": p.value, "at": format_time(t)} for p, t in self.timeline],
            "restored": None
            if self.restored is None
            else {"name": self.restored, "step": self.restored_step},
            "training_seconds": _r(self.training_seconds),
            "instance_seconds": _r(self.instance_seconds),
            "billable_seconds": _r(self.billable_seconds),
            "interruptions": [i.to_dict() for i in self.interruptions],
            "last_durable": None
            if self.last_durable is None
            else {"name": self.last_durable, "step": self.last_durable_step},
            "lost_seconds": _r(self.lost_seconds),
            "lost_steps": self.lost_steps,
            "cost_usd": _usd(self.cost_usd),
            "on_demand_hourly_usd": self.on_demand_hourly,
            "lost_work_usd": _usd(self.lost_usd),
        }


@dataclass(frozen=True, slots=True)
class JobHistory:
    job_id: str
    status: Phase
    end: JobEnd | None
    sessions: tuple[SessionSummary, ...]
    unreadable: tuple[str, ...] = ()
    priced: bool = False
    pricing_errors: tuple[str, ...] = field(default=())

    @property
    def first_started_at(self) -> datetime | None:
        return self.sessions[0].started_at if self.sessions else None

    @property
    def training_seconds(self) -> float:
        return sum(s.training_seconds for s in self.sessions)

    @property
    def instance_seconds(self) -> float:
        return sum(s.instance_seconds for s in self.sessions)

    @property
    def interruptions(self) -> int:
        """Sessions that ended Interrupted: the instance went away before the job was done."""
        return sum(1 for s in self.sessions if s.status is Phase.INTERRUPTED)

    def _all(self, values: Sequence[float | None]) -> list[float] | None:
        if not self.priced or not self.sessions or any(v is None for v in values):
            return None
        return [v for v in values if v is not None]

    @property
    def cost_usd(self) -> float | None:
        values = self._all([s.cost_usd for s in self.sessions])
        return None if values is None else sum(values)

    @property
    def on_demand_cost_usd(self) -> float | None:
        """The training time at on-demand prices: what the job would have cost without spot."""
        values = self._all(
            [
                None if s.on_demand_hourly is None else s.training_seconds / 3600.0 * s.on_demand_hourly
                for s in self.sessions
            ]
        )
        return None if values is None else sum(values)

    @property
    def billable_seconds(self) -> float | None:
        values = self._all([s.billable_seconds for s in self.sessions])
        return None if values is None else sum(values)

    @property
    def savings_percent(self) -> float | None:
        """SageMaker's ``(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100``."""
        billable, training = self.billable_seconds, self.training_seconds
        if billable is None or training <= 0:
            return None
        return (1.0 - billable / training) * 100.0

    @property
    def lost_work_usd(self) -> float | None:
        values = self._all([s.lost_usd for s in self.sessions])
        return None if values is None else sum(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "end": None if self.end is None else self.end.to_dict(),
            "sessions": [s.to_dict() for s in self.sessions],
            "statuses": [p.value for s in self.sessions for p, _ in s.timeline],
            "interruptions": self.interruptions,
            "training_seconds": _r(self.training_seconds),
            "instance_seconds": _r(self.instance_seconds),
            "billable_seconds": _r(self.billable_seconds),
            "cost_usd": _usd(self.cost_usd),
            "on_demand_cost_usd": _usd(self.on_demand_cost_usd),
            "savings_percent": None if self.savings_percent is None else round(self.savings_percent, 6),
            "lost_work_usd": _usd(self.lost_work_usd),
            "priced": self.priced,
            "unreadable_records": list(self.unreadable),
            "pricing_errors": list(self.pricing_errors),
        }


def _r(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _usd(value: float | None) -> float | None:
    # Unrounded: a spot price has five decimals and a short session costs a fraction of a cent, so any fixed
    # number of decimals would turn somebody's figure into 0.
    return value


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _session(
    name: str, records: Sequence[LedgerRecord], heartbeat: datetime | None, *, now: datetime, last: bool
) -> SessionSummary:
    def first(kind: SessionEventKind) -> LedgerRecord | None:
        return next((r for r in records if r.kind is kind), None)

    def every(kind: SessionEventKind) -> list[LedgerRecord]:
        return [r for r in records if r.kind is kind]

    boot, training, finishing, ended, end = (
        first(SessionEventKind.BOOT),
        first(SessionEventKind.TRAINING),
        first(SessionEventKind.FINISHING),
        first(SessionEventKind.ENDED),
        first(SessionEventKind.END),
    )
    anchor = boot or (records[0] if records else None)
    instance = anchor.instance if anchor else InstanceIdentity()
    region = anchor.region if anchor else ""
    times = [r.at for r in records] + ([heartbeat] if heartbeat else [])
    evidence = max(times) if times else now
    started_at = boot.at if boot else min(times, default=now)

    final_notices = [
        r
        for r in every(SessionEventKind.NOTICE)
        if r.data.get("final") and r.data.get("kind") in _INTERRUPTING
    ]
    interrupted_at = final_notices[0].at if final_notices else None
    running = last and end is None and (now - evidence).total_seconds() <= STALE_S
    if end is not None:
        ended_at = end.at
    elif running:
        ended_at = max(now, evidence)
    else:
        ended_at = evidence
        # The instance is billed until it goes, which a spot notice announced.
        announced = [
            t
            for t in (_time(r.data.get("not_after")) for r in final_notices if r.data.get("kind") == "spot")
            if t is not None
        ]
        if announced and max(announced) > ended_at:
            ended_at = max(announced)

    restored = first(SessionEventKind.RESTORED)
    restored_name = restored.data.get("name") if restored else None
    downloaded = bool(restored and restored_name and restored.data.get("downloaded"))
    timeline: list[tuple[Phase, datetime]] = [(Phase.STARTING, started_at)]
    if restored is not None and downloaded:
        seconds = float(restored.data.get("seconds") or 0.0)
        timeline.append((Phase.DOWNLOADING, max(started_at, _minus(restored.at, seconds))))
    if training is not None:
        timeline.append((Phase.TRAINING, training.at))
    if interrupted_at is not None and ended is None:
        timeline.append((Phase.INTERRUPTED, interrupted_at))
    if finishing is not None:
        timeline.append((Phase.UPLOADING, finishing.at))
    status: Phase
    if ended is not None:
        status = Phase(ended.data.get("status", Phase.STOPPED.value))
        timeline.append((status, ended.at))
    elif interrupted_at is not None or not running:
        status = Phase.INTERRUPTED
        if interrupted_at is None:
            timeline.append((Phase.INTERRUPTED, ended_at))
    else:
        status = timeline[-1][0]

    training_end_candidates = [
        t for t in (interrupted_at, finishing.at if finishing else None, ended.at if ended else None) if t
    ]
    training_end = min([*training_end_candidates, ended_at])
    training_seconds = max(0.0, (training_end - training.at).total_seconds()) if training is not None else 0.0

    durables = every(SessionEventKind.DURABLE)
    newest = max(durables, key=lambda r: r.at) if durables else None
    interruptions = tuple(
        Interruption(
            kind=str(r.data.get("kind", "")),
            action=str(r.data.get("action", "")),
            detected_at=_time(r.data.get("detected_at")) or r.at,
            notice_time=_time(r.data.get("notice_time")),
            notice_to_durable_seconds=r.data.get("notice_to_durable_seconds"),
            bytes=int(r.data.get("bytes") or 0),
            durable=bool(r.data.get("durable")) and not r.data.get("lost"),
            lost=tuple(str(x) for x in r.data.get("lost") or ()),
        )
        for r in every(SessionEventKind.INTERRUPTION)
        if r.data.get("final") and r.data.get("kind") in _INTERRUPTING
    )

    lost_seconds = 0.0
    lost_steps: int | None = 0
    if status is Phase.INTERRUPTED and training is not None:
        saved_from = max(newest.at, training.at) if newest is not None else training.at
        lost_seconds = max(0.0, (training_end - saved_from).total_seconds())
        if lost_seconds > 0:
            durable_step = _step(newest) if newest else _int(restored.data.get("step")) if restored else None
            failed = [s for s in (_step(r) for r in every(SessionEventKind.UPLOAD_FAILED)) if s is not None]
            lost_steps = (
                max(0, max(failed) - (durable_step or 0))
                if failed
                else None  # a trainer that never answered: how far it got is not known
            )
    return SessionSummary(
        session=name,
        instance=instance,
        region=region,
        started_at=started_at,
        ended_at=ended_at,
        running=running,
        clean_end=end is not None,
        status=status,
        timeline=tuple(timeline),
        restored=restored_name if downloaded else None,
        restored_step=_int(restored.data.get("step")) if restored and downloaded else None,
        training_started_at=training.at if training else None,
        training_seconds=training_seconds,
        instance_seconds=max(0.0, (ended_at - started_at).total_seconds()),
        interruptions=interruptions,
        last_durable=str(newest.data.get("name")) if newest else None,
        last_durable_step=_step(newest) if newest else None,
        lost_seconds=lost_seconds,
        lost_steps=lost_steps,
    )


def _minus(at: datetime, seconds: float) -> datetime:
    return at - timedelta(seconds=seconds)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _step(record: LedgerRecord) -> int | None:
    return _int(record.data.get("step"))


def summarize(view: LedgerView, *, now: datetime) -> JobHistory:
    """The job's history without costs (see :func:`with_costs`)."""
    by_session = view.sessions()
    names = list(by_session)
    sessions = tuple(
        _session(name, by_session[name], view.heartbeats.get(name), now=now, last=i == len(names) - 1)
        for i, name in enumerate(names)
    )
    if view.end is not None:
        status = view.end.status
    elif sessions:
        status = sessions[-1].status
    else:
        status = Phase.STARTING
    return JobHistory(
        job_id=view.job_id, status=status, end=view.end, sessions=sessions, unreadable=view.unreadable
    )


def integrate_price(points: Sequence[tuple[datetime, float]], start: datetime, end: datetime) -> float:
    """USD of running from ``start`` to ``end`` under hourly prices that change at ``points``.

    The price at any moment is the newest point at or before it; before the first point, the first (EC2
    returns the last change before a window's start, so that only happens with a short history)."""
    if end <= start or not points:
        return 0.0
    ordered = sorted(points)
    current = ordered[0][1]
    for at, price in ordered:
        if at <= start:
            current = price
    total, t = 0.0, start
    for at, price in ordered:
        if at <= start:
            continue
        if at >= end:
            break
        total += (at - t).total_seconds() / 3600.0 * current
        t, current = at, price
    return total + (end - t).total_seconds() / 3600.0 * current


def with_costs(
    history: JobHistory, prices: Mapping[str, SessionPrices], *, errors: Sequence[str] = ()
) -> JobHistory:
    """``history`` with each session's cost from ``prices`` (by session name); a session without prices
    keeps None, and then so do the job's totals."""
    sessions = []
    for s in history.sessions:
        p = prices.get(s.session)
        cost: float | None = None
        if p is not None:
            if p.spot is not None and s.instance.life_cycle != "on-demand":
                cost = integrate_price(p.spot, s.started_at, s.ended_at)
            elif p.on_demand_hourly is not None:
                cost = s.instance_seconds / 3600.0 * p.on_demand_hourly
        sessions.append(replace(s, cost_usd=cost, on_demand_hourly=p.on_demand_hourly if p else None))
    return replace(history, sessions=tuple(sessions), priced=True, pricing_errors=tuple(errors))
