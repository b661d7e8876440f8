"""A job's history off its ledger: SageMaker's status words per session, training and instance seconds, the
work an interruption lost, and costs and savings from given prices (pure functions, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotd.events import InstanceIdentity, Phase, format_time
from spotd.events import SessionEventKind as K
from spotd.store.history import SessionPrices, integrate_price, summarize, with_costs
from spotd.store.ledger import JobEnd, LedgerRecord, LedgerView

T0 = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Session:
    def __init__(
        self, name: str, instance: str = "i-0aaa", zone: str = "us-east-1a", life: str = "spot"
    ) -> None:
        self.name = name
        self.identity = InstanceIdentity(instance, "g5.2xlarge", zone, life)
        self.records: list[LedgerRecord] = []

    def add(self, kind: K, t: float, /, **data: Any) -> Session:
        self.records.append(
            LedgerRecord(
                job_id="job",
                session=self.name,
                seq=len(self.records),
                event=kind.value,
                at=at(t),
                instance=self.identity,
                region="us-east-1",
                data=data,
            )
        )
        return self


def view(*sessions: Session, beats: dict[str, float] | None = None, end: JobEnd | None = None) -> LedgerView:
    return LedgerView(
        job_id="job",
        records=tuple(r for s in sessions for r in s.records),
        heartbeats={k: at(v) for k, v in (beats or {}).items()},
        end=end,
    )


def interrupted(name: str, *, emergency_ok: bool = True) -> Session:
    s = Session(name)
    s.add(K.BOOT, 0).add(K.RESTORED, 10, name="c1", step=100, downloaded=True, seconds=6.0)
    s.add(K.TRAINING, 15, trainer="t")
    s.add(K.DURABLE, 1800, name="c2", step=200)
    s.add(K.NOTICE, 3600, kind="spot", action="terminate", final=True, not_after=format_time(at(3720)))
    if emergency_ok:
        s.add(K.DURABLE, 3610, name="c3", step=290)
        s.add(
            K.INTERRUPTION,
            3612,
            kind="spot",
            action="terminate",
            final=True,
            notice_to_durable_seconds=10.0,
            bytes=4096,
            durable=[{"trainer": "t", "name": "c3", "step": 290}],
            lost=[],
        )
    else:
        s.add(
            K.INTERRUPTION,
            3700,
            kind="spot",
            action="terminate",
            final=True,
            notice_to_durable_seconds=None,
            bytes=0,
            durable=[],
            lost=["t: no checkpoint before the deadline"],
        )
    return s


def test_an_interrupted_session_in_sagemaker_words() -> None:
    """Starting → Downloading → Training → Interrupted; billed until the announced interruption time, trained
    until the notice; an emergency checkpoint made durable loses nothing."""
    h = summarize(view(interrupted("s1")), now=at(100_000))
    (s,) = h.sessions
    assert [p for p, _ in s.timeline] == [
        Phase.STARTING,
        Phase.DOWNLOADING,
        Phase.TRAINING,
        Phase.INTERRUPTED,
    ]
    assert s.timeline[1][1] == at(4) and s.timeline[3][1] == at(3600)
    assert s.status is Phase.INTERRUPTED and not s.running and not s.clean_end
    assert s.instance_seconds == 3720 and s.training_seconds == 3600 - 15
    assert s.restored == "c1" and s.restored_step == 100
    (i,) = s.interruptions
    assert i.kind == "spot" and i.durable and i.notice_to_durable_seconds == 10.0 and i.bytes == 4096
    assert s.lost_seconds == 0 and s.lost_steps == 0 and s.last_durable == "c3"
    assert h.interruptions == 1 and h.status is Phase.INTERRUPTED


def test_work_lost_when_the_emergency_checkpoint_did_not_make_it() -> None:
    """Without a durable emergency checkpoint, the training after the newest durable one is lost; how many
    steps is unknown when the trainer never answered."""
    (s,) = summarize(view(interrupted("s1", emergency_ok=False)), now=at(100_000)).sessions
    assert s.lost_seconds == 3600 - 1800 and s.lost_steps is None
    assert not s.interruptions[0].durable and s.interruptions[0].lost == (
        "t: no checkpoint before the deadline",
    )


def test_steps_lost_are_counted_from_saves_that_never_became_durable() -> None:
    """An upload given up at step 280 after the durable step 200: 80 steps lost."""
    s = interrupted("s1", emergency_ok=False)
    s.add(K.UPLOAD_FAILED, 3650, trainer="t", step=280, error="S3 down")
    (summary,) = summarize(view(s), now=at(100_000)).sessions
    assert summary.lost_steps == 80


def test_three_sessions_interrupted_interrupted_completed() -> None:
    """The job's statuses in order across instances, Completed at the end, from END.json."""
    s3 = Session("s3", instance="i-0ccc")
    s3.add(K.BOOT, 20_000).add(K.RESTORED, 20_010, name="c3", step=290, downloaded=True, seconds=5.0)
    s3.add(K.TRAINING, 20_020).add(K.FINISHING, 21_000, status="Completed", reason="finished")
    s3.add(K.ENDED, 21_005, status="Completed", reason="finished").add(K.END, 21_010, phase="Completed")
    end = JobEnd(
        job_id="job",
        status=Phase.COMPLETED,
        reason="finished",
        at=at(21_005),
        session="s3",
        instance_id="i-0ccc",
    )
    h = summarize(view(interrupted("s1"), interrupted("s2"), s3, end=end), now=at(30_000))
    assert [s.status for s in h.sessions] == [Phase.INTERRUPTED, Phase.INTERRUPTED, Phase.COMPLETED]
    assert h.to_dict()["statuses"][-4:] == ["Downloading", "Training", "Uploading", "Completed"]
    assert h.status is Phase.COMPLETED and h.interruptions == 2
    assert h.sessions[2].training_seconds == 980 and h.sessions[2].instance_seconds == 1010
    assert h.training_seconds == 2 * 3585 + 980


def test_the_running_session_and_a_silent_one() -> None:
    """The last session with a fresh heartbeat is running (billed until now); one whose heartbeat stopped
    without an end is presumed interrupted at its last sign of life."""
    s = Session("s1").add(K.BOOT, 0).add(K.TRAINING, 10)
    running = summarize(view(s, beats={"s1": 500}), now=at(520)).sessions[0]
    assert running.running and running.status is Phase.TRAINING and running.instance_seconds == 520
    gone = summarize(view(s, beats={"s1": 500}), now=at(5000)).sessions[0]
    assert not gone.running and gone.status is Phase.INTERRUPTED and gone.instance_seconds == 500
    assert gone.training_seconds == 490 and gone.lost_seconds == 490, "nothing durable: all of it lost"


def test_a_price_that_changes_during_the_session() -> None:
    """The price at each moment is the newest at or before it; the first before the session counts."""
    points = [(T0 - timedelta(days=3), 0.40), (at(1800), 0.50), (at(7200), 0.90)]
    assert integrate_price(points, at(0), at(3600)) == pytest.approx(0.5 * 0.40 + 0.5 * 0.50)
    assert integrate_price([(datetime(2006, 1, 2, tzinfo=UTC), 0.3)], at(0), at(7200)) == pytest.approx(0.6)
    assert integrate_price(points, at(10), at(10)) == 0.0


def test_costs_and_the_sagemaker_savings() -> None:
    """Cost = instance hours at spot; on demand = training hours at the on-demand price; savings =
    (1 - billable/training) x 100 with billable = cost / on-demand price, an on-demand session at its price."""
    s1 = interrupted("s1")
    s2 = Session("s2", instance="i-0ddd", life="on-demand").add(K.BOOT, 10_000).add(K.TRAINING, 10_100)
    s2.add(K.DURABLE, 13_690, name="c9", step=900).add(K.END, 13_700, phase="Training")
    h = summarize(view(s1, s2), now=at(20_000))
    prices = {
        "s1": SessionPrices(spot=((datetime(2006, 1, 2, tzinfo=UTC), 0.36),), on_demand_hourly=1.212),
        "s2": SessionPrices(spot=None, on_demand_hourly=1.212),
    }
    costed = with_costs(h, prices)
    cost1, cost2 = 3720 / 3600 * 0.36, 3700 / 3600 * 1.212
    assert costed.sessions[0].cost_usd == pytest.approx(cost1)
    assert costed.sessions[1].cost_usd == pytest.approx(cost2)
    training = 3585 + 3600
    billable = (cost1 + cost2) / 1.212 * 3600
    assert costed.billable_seconds == pytest.approx(billable)
    assert costed.savings_percent == pytest.approx((1 - billable / training) * 100)
    assert costed.on_demand_cost_usd == pytest.approx(training / 3600 * 1.212)
    # s2 stopped without a notice 10 s after its last durable checkpoint: those 10 s are lost, at its price.
    assert costed.lost_work_usd == pytest.approx(10 / 3700 * cost2)
    unpriced = with_costs(h, {"s1": prices["s1"]})
    assert unpriced.cost_usd is None and unpriced.savings_percent is None, "one session unknown: no total"
