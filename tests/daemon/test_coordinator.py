"""The coordinator in process: notices become episodes, saves become commits, commits become `durable`.

Built with a fake trainer channel (the part of the socket server the coordinator talks to), a real
file:// store in tmp_path, injected clocks and a fresh registry. Time moves only when a test moves it or
when the coordinator sleeps between commit attempts (the injected sleep advances both clocks at once).
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog

from spotd import protocol
from spotd.daemon.commits import COMMIT_BACKOFF_S, PERIODIC_COMMIT_BUDGET_S
from spotd.daemon.episode import Episode
from spotd.daemon.ipc import Session
from spotd.daemon.watch import Watcher, step_from_name
from spotd.events import Notice, NoticeKind, Phase
from tests.daemon.harness import (
    DRILL_S,
    GRACE_S,
    JOB,
    MARGIN_S,
    T0,
    WAIT_S,
    FlakyStore,
    Harness,
    block_commits,
    closed,
    shutdown,
    spot,
)

# ---------------------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize(
    ("notice", "expected_s"),
    [
        pytest.param(lambda w: spot(w, in_s=120), 120 - MARGIN_S, id="spot: notice time - margin"),
        pytest.param(lambda w: spot(w, in_s=4), 0.0, id="spot inside the margin: now, never before"),
        pytest.param(lambda w: spot(w, in_s=-30), 0.0, id="spot already past: now"),
        pytest.param(shutdown, GRACE_S, id="shutdown: its own notice time"),
        pytest.param(
            lambda w: Notice(kind=NoticeKind.SPOT, action="stop", key="k", detected_at=w, final=True),
            GRACE_S,
            id="final without not_after: now + shutdown_grace",
        ),
        pytest.param(
            lambda w: Notice(
                kind=NoticeKind.DRILL,
                action="checkpoint",
                key="drill:1",
                detected_at=w,
                final=False,
                detail={"reason": "game day"},
            ),
            DRILL_S,
            id="drill: now + drill_timeout",
        ),
        pytest.param(
            lambda w: Notice(
                kind=NoticeKind.REBALANCE, action="rebalance", key="r", detected_at=w, final=False
            ),
            DRILL_S,
            id="rebalance: now + drill_timeout",
        ),
    ],
)
async def test_deadline_arithmetic(make, notice, expected_s):
    """Each kind of notice gets its deadline, and the checkpoint frame every trainer receives carries it."""
    h = make()
    trainer = h.channel.connect("rank0")
    h.time.advance(42.0)  # the notice arrives well after start: deadlines count from its arrival
    now = h.time.wall()

    episode = await h.coordinator.handle_notice(notice(now))

    assert episode is not None
    assert episode.deadline == now + timedelta(seconds=expected_s)
    frame = await h.channel.next(trainer, "checkpoint")
    assert frame == protocol.checkpoint(
        request_id=episode.request_id, reason=episode.reason, deadline=episode.deadline, final=episode.final
    )


async def test_notice_reason_and_finality_reach_the_trainer(make):
    """A spot notice asks with reason spot-<action> and final=True; a drill with its own text and final=False."""
    h = make()
    trainer = h.channel.connect("rank0")
    final = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120, action="stop"))
    assert final is not None and (final.reason, final.final) == ("spot-stop", True)
    assert h.metric("spotd_checkpoint_requests_total", reason="spot-stop") == 1
    assert h.coordinator.phase is Phase.INTERRUPTED
    frame = await h.channel.next(trainer, "checkpoint")
    assert frame["final"] is True and frame["reason"] == "spot-stop"


# ---------------------------------------------------------------------------------------- known deadline


async def measured(h: Harness, trainer: Session, *, mib: int = 16) -> None:
    """A periodic save big enough to be measured, committed: the store now knows its upload rate."""
    rel = f"{trainer.name}/step-000001.pt"
    (h.checkpoint_dir / trainer.name).mkdir(parents=True, exist_ok=True)
    (h.checkpoint_dir / rel).write_bytes(os.urandom(mib * 1024 * 1024))
    frame = {"op": "saved", "request_id": None, "path": rel, "step": 1}
    await h.coordinator.on_saved(trainer, protocol.validate_client_frame(frame))
    await h.channel.next(trainer, "durable")


async def test_the_request_says_how_long_the_upload_takes_and_that_it_fits(make):
    """After a measured periodic upload, a spot notice's request carries the estimate for that checkpoint's
    size (in checkpoint.requested, the frame, spotd status and the metrics) and says it fits 110 s."""
    h = make()
    trainer = h.channel.connect("rank0", rank=0)
    await measured(h, trainer)
    expected = h.store.estimate_seconds(16 * 1024 * 1024)
    assert expected is not None and expected > 0
    assert h.metric("spotd_emergency_upload_estimate_seconds") == pytest.approx(expected)
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    frame = await h.channel.next(trainer, "checkpoint")
    assert frame["estimate_seconds"] == round(expected, 3) and frame["fits"] is True
    (line,) = [e for e in logs if e["event"] == "checkpoint.requested"]
    assert line["estimate_seconds"] == round(expected, 3) and line["estimate_bytes"] == 16 * 1024 * 1024
    assert line["fits"] is True
    assert not [e for e in logs if e["event"] == "checkpoint.deadline_at_risk"]
    upload = h.coordinator.status()["request"]["upload"]
    assert upload["fits"] is True and upload["seconds_left"] == 120 - MARGIN_S
    assert h.metric("spotd_request_upload_estimate_seconds") == pytest.approx(expected)
    assert h.metric("spotd_deadline_at_risk_total", reason="spot-terminate") == 0


async def test_an_upload_that_cannot_fit_is_a_warning_at_once(make):
    """A notice already inside its margin (deadline now): the request says it does not fit, a
    checkpoint.deadline_at_risk warning naming the fix is logged before any save, and it is counted."""
    h = make()
    trainer = h.channel.connect("rank0", rank=0)
    await measured(h, trainer)
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=3))
    assert episode is not None
    frame = await h.channel.next(trainer, "checkpoint")
    assert frame["fits"] is False
    (warning,) = [e for e in logs if e["event"] == "checkpoint.deadline_at_risk"]
    assert warning["log_level"] == "warning" and warning["request_id"] == episode.request_id
    assert warning["seconds_left"] == 0 and warning["short_by_seconds"] > 0
    assert "emergency_exclude" in warning["fix"] and "store.concurrency" in warning["fix"]
    assert "store.background_nice" not in warning["fix"]  # measured on an idle core
    assert warning["rate_core_wait"] is not None and warning["rate_core_wait"] < 0.1
    assert h.coordinator.status()["request"]["upload"]["fits"] is False
    assert h.metric("spotd_deadline_at_risk_total", reason="spot-terminate") == 1


async def test_a_rate_from_uploads_held_back_by_the_trainer_says_so(make):
    """The periodic uploads the rate comes from waited for a core most of their time (a busy trainer, the
    background threads at nice 19; tests/store/test_pacing.py makes that happen for real): the request's
    estimate says so, and the at-risk warning adds that an emergency upload runs at the daemon's priority and
    how to change the trade-off."""
    h = make()
    trainer = h.channel.connect("rank0", rank=0)
    await measured(h, trainer)
    for _ in range(2):  # the median of the window: two of three samples held back
        assert h.store._throughput.record(16 * 1024 * 1024, 4.0, core_wait=0.6)
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=3))
    assert episode is not None and episode.upload is not None and episode.upload.cpu_starved
    (line,) = [e for e in logs if e["event"] == "checkpoint.requested"]
    assert line["rate_core_wait"] == 0.6 and line["rate_cpu_starved"] is True
    (warning,) = [e for e in logs if e["event"] == "checkpoint.deadline_at_risk"]
    assert "waited for a core 60% of their time" in warning["fix"]
    assert "store.background_nice" in warning["fix"]
    assert h.coordinator.status()["request"]["upload"]["rate_cpu_starved"] is True


async def test_a_rate_from_uploads_that_gave_way_to_the_trainer_says_so(make):
    """Every periodic upload the rate comes from gave way to a busy trainer (store.yield_to_trainer;
    tests/store/test_trainer_yield.py makes that happen for real): the request says the rate is the
    trainer's (log line, status), and the at-risk warning says an emergency upload does not give way."""
    h = make()
    trainer = h.channel.connect("rank0", rank=0)
    await measured(h, trainer)
    h.store._throughput._samples.clear()
    for _ in range(2):
        assert h.store._throughput.record(16 * 1024 * 1024, 30.0, held=True)
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=3))
    assert episode is not None and episode.upload is not None and episode.upload.yielded
    (line,) = [e for e in logs if e["event"] == "checkpoint.requested"]
    assert line["rate_yielded"] is True and line["rate_cpu_starved"] is False
    (warning,) = [e for e in logs if e["event"] == "checkpoint.deadline_at_risk"]
    assert "store.yield_to_trainer" in warning["fix"] and "does not" in warning["fix"]
    assert h.coordinator.status()["request"]["upload"]["rate_yielded"] is True


async def test_every_trainer_is_sized_by_its_own_newest_checkpoint(make):
    """Two ranks, each with a measured 16 MiB checkpoint: the request prices 32 MiB, what both will send."""
    h = make()
    a, b = h.channel.connect("rank0", rank=0), h.channel.connect("rank1", rank=1)
    await measured(h, a)
    await measured(h, b)
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None and episode.upload is not None
    assert episode.upload.nbytes == 32 * 1024 * 1024


async def test_no_estimate_until_an_upload_was_measured(make):
    """A small periodic save measures nothing: the request has no estimate fields (the frame is the one old
    trainers know) and checkpoint.requested says so with nulls, no warning."""
    h = make()
    trainer = h.channel.connect("rank0")
    await h.save(trainer, 1, None)
    await h.channel.next(trainer, "durable")
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=3))
    assert episode is not None
    frame = await h.channel.next(trainer, "checkpoint")
    assert "estimate_seconds" not in frame and "fits" not in frame
    (line,) = [e for e in logs if e["event"] == "checkpoint.requested"]
    assert line["estimate_seconds"] is None and line["fits"] is None
    assert not [e for e in logs if e["event"] == "checkpoint.deadline_at_risk"]
    assert h.coordinator.status()["request"]["upload"]["estimate_seconds"] is None


# ---------------------------------------------------------------------------------------- endings


async def test_completed_when_every_asked_trainer_is_durable(make):
    """Both trainers save, both saves commit, each hears durable; the episode ends Completed with nothing lost and one events/ record."""
    h = make()
    a, b = h.channel.connect("rank0", rank=0), h.channel.connect("rank1", rank=1)
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
        assert episode is not None
        await h.save(a, 10, episode.request_id)
        await h.save(b, 10, episode.request_id, after_s=2.0)
        await closed(episode)
        durable_a = await h.channel.next(a, "durable")
        await h.settle()

    assert h.coordinator.phase is Phase.COMPLETED and episode.lost() == []
    assert durable_a["request_id"] == episode.request_id and durable_a["path"] == "rank0/step-000010.pt"
    assert durable_a["step"] == 10 and durable_a["uri"] == h.store.uri
    assert h.channel.ops(b) == ["checkpoint", "durable"]
    (line,) = [e for e in logs if e["event"] == "interruption.handled"]
    assert line["lost"] == [] and line["trainers"] == 2 and line["bytes"] == 2 * 4096
    assert sorted(d["trainer"] for d in line["durable"]) == ["rank0", "rank1"]
    assert line["checkpoint_seconds"] == 3.0  # asked at 0, the last saved 1 + 2 s later
    (record,) = h.events()
    assert record == {k: v for k, v in line.items() if k not in ("event", "log_level")}
    assert h.metric("spotd_notice_to_durable_seconds_count") == 1
    assert h.metric("spotd_phase", phase="Completed") == 1


async def test_stopped_when_no_save_comes_before_the_deadline(make):
    """A notice already inside its margin gets deadline now: the trainer is still asked, and the episode ends Stopped naming it."""
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=3))
    assert episode is not None
    await closed(episode)
    await h.settle()
    assert h.channel.ops(trainer) == ["checkpoint"]
    assert episode.lost() == ["rank0: no checkpoint before the deadline"]
    assert h.coordinator.phase is Phase.STOPPED
    assert h.events()[0]["lost"] == ["rank0: no checkpoint before the deadline"]


async def test_stopped_when_a_trainer_reports_failure(make):
    """One trainer saves, the other reports failed: the episode ends Stopped with that trainer's message, the other's save durable."""
    h = make()
    ok, bad = h.channel.connect("rank0"), h.channel.connect("rank1")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    await h.save(ok, 5, episode.request_id)
    failed = {"op": "failed", "request_id": episode.request_id, "message": "disk full"}
    await h.coordinator.on_failed(bad, protocol.validate_client_frame(failed))
    await closed(episode)
    await h.settle()
    assert episode.lost() == ["rank1: disk full"]
    assert h.coordinator.phase is Phase.STOPPED
    request = h.coordinator.status()["request"]
    assert request["finished"] is True and request["settled"] is True
    assert request["ok"] is False and request["lost"] == ["rank1: disk full"]
    assert [d["trainer"] for d in h.events()[0]["durable"]] == ["rank0"]
    assert h.metric("spotd_checkpoint_failures_total") == 1


async def test_stopped_when_a_trainer_disconnects_before_saving(make):
    """A trainer that goes away before saving is named as disconnected; the episode does not wait for its deadline."""
    h = make()
    ok, gone = h.channel.connect("rank0"), h.channel.connect("rank1")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    h.channel.disconnect(gone)
    h.coordinator.on_disconnect(gone)
    await h.save(ok, 5, episode.request_id)
    await closed(episode)
    assert episode.lost() == ["rank1: disconnected before saving"]
    assert h.coordinator.phase is Phase.STOPPED


async def test_stopped_when_the_upload_fails_until_the_deadline(make, tmp_path):
    """An emergency commit into a store that always fails is retried until the notice's own time leaves no room, then given up: error to the trainer, counted once, Stopped."""
    block_commits(tmp_path / "store")
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=60))
    assert episode is not None
    await h.save(trainer, 5, episode.request_id)
    error = await h.channel.next(trainer, "error")
    await closed(episode)

    assert error["code"] == protocol.E_STORE and error["request_id"] == episode.request_id
    assert error["path"] == "rank0/step-000005.pt" and "local checkpoint kept" in error["message"]
    (lost,) = episode.lost()
    assert lost.startswith("rank0: upload failed (")
    assert h.coordinator.phase is Phase.STOPPED
    # Saved at 1 s; the instance goes at 60 s: pauses of 1, 2, 4, 8, 15, 15 reach 46 s, 15 more would pass 60.
    assert h.time.slept == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert h.metric("spotd_upload_failures_total") == 1
    assert (h.checkpoint_dir / "rank0/step-000005.pt").is_file(), "the local checkpoint is kept"


def maintenance(wall: datetime, *, in_s: float) -> Notice:
    return Notice(
        kind=NoticeKind.MAINTENANCE,
        action="system-reboot",
        key="maintenance:instance-event-1",
        detected_at=wall,
        final=True,
        not_after=wall + timedelta(seconds=in_s),
    )


def rebalance(wall: datetime) -> Notice:
    return Notice(
        kind=NoticeKind.REBALANCE, action="rebalance", key="rebalance", detected_at=wall, final=False
    )


@pytest.mark.parametrize(
    "notice",
    [
        pytest.param(lambda w: spot(w, in_s=120), id="spot"),
        pytest.param(lambda w: maintenance(w, in_s=600), id="maintenance"),
        pytest.param(rebalance, id="rebalance"),
        pytest.param(shutdown, id="sigterm"),
    ],
)
async def test_a_trainer_that_connects_after_the_notice_is_asked(make, notice):
    """With no trainer connected the episode stays open: a trainer saying hello 4 s later is asked, and its durable save ends the episode with nothing lost."""
    h = make()
    episode = await h.coordinator.handle_notice(notice(h.time.wall()))
    assert episode is not None
    h.time.advance(4.0)
    await asyncio.sleep(0)
    assert not episode.finished, "the episode waits for a trainer until its deadline"
    late = h.channel.connect("rank0")
    await h.coordinator.on_ready(late)
    frame = await h.channel.next(late, "checkpoint")
    assert frame["request_id"] == episode.request_id and frame["final"] is episode.final
    await h.save(late, 11, episode.request_id)
    await closed(episode)
    await h.settle()
    assert episode.lost() == [] and episode.durable()[0].step == 11
    assert h.coordinator.phase is (Phase.COMPLETED if episode.final else Phase.TRAINING)
    (record,) = h.events()
    assert record["trainers"] == 1 and record["lost"] == []


async def test_no_trainer_until_the_deadline_is_stopped_saying_so(make):
    """A final notice nobody answers stays open until its deadline, then ends Stopped with "no trainer was connected"."""
    h = make()
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    h.time.advance(120 - MARGIN_S - 0.5)
    await asyncio.sleep(0)
    assert not episode.finished
    h.time.advance(0.5)
    await closed(episode)
    await h.settle()
    assert episode.lost() == ["no trainer was connected"] and h.coordinator.phase is Phase.STOPPED
    assert h.events()[0]["lost"] == ["no trainer was connected"]


async def test_a_trainer_restarted_during_the_episode_is_asked_again(make):
    """The only trainer leaves before saving and its restart says hello: the episode waits for the restart and records both."""
    h = make()
    first = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    h.channel.disconnect(first)
    h.coordinator.on_disconnect(first)
    await asyncio.sleep(0)
    assert not episode.finished, "nobody answered yet: a restarted trainer may still come"
    again = h.channel.connect("rank0")
    await h.coordinator.on_ready(again)
    await h.save(again, 12, (await h.channel.next(again, "checkpoint"))["request_id"])
    await closed(episode)
    assert [s.step for s in episode.durable()] == [12]
    assert episode.lost() == ["rank0: disconnected before saving"]


async def test_a_drill_with_no_trainer_answers_at_once_saying_why(make):
    """`spotd checkpoint` with nobody connected gets ok=false at once, with the reason and the fix, and starts no episode."""
    h = make()
    cli = h.channel.connect("spotd-cli", role="control")
    async with asyncio.timeout(WAIT_S):
        reply = await h.coordinator.on_drill(cli, {"op": "drill", "reason": "drill"})
    assert reply["ok"] is False and reply["trainers"] == 0
    assert reply["message"].startswith("no trainer connected; start the training process with spotd.client")
    assert h.coordinator.current is None and h.time.elapsed == 0.0


async def test_a_trainer_connecting_mid_episode_is_asked_too(make):
    """A trainer that connects while an episode runs is sent its checkpoint frame and waited for."""
    h = make()
    first = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    late = h.channel.connect("rank1")
    await h.coordinator.on_ready(late)
    assert (await h.channel.next(late, "checkpoint"))["request_id"] == episode.request_id
    await h.save(first, 1, episode.request_id)
    await h.channel.next(first, "durable")
    assert episode.outstanding() == ["rank1"] and not episode.finished
    await h.save(late, 1, episode.request_id)
    await closed(episode)
    assert h.coordinator.phase is Phase.COMPLETED


async def test_a_save_uploading_at_the_deadline_keeps_trying_until_the_notice_time(make):
    """Saved 5 s before the deadline into a store failing three times: the commit retries past the deadline (inside the margin), the episode reports it durable 2 s late, not lost, and the phase goes Uploading to Completed, never Stopped."""
    h = make(store_class=FlakyStore, failures=3)
    trainer = h.channel.connect("rank0")
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
        assert episode is not None
        await h.save(trainer, 40, episode.request_id, after_s=120 - MARGIN_S - 5)
        durable = await h.channel.next(trainer, "durable")
        await closed(episode)
        await h.settle()

    assert h.time.slept == [1.0, 2.0, 4.0], "retried past the deadline at 110 s, durable at 112 s"
    assert durable["step"] == 40
    assert episode.lost() == [] and episode.late() == ["rank0: durable 2.0 s after the deadline"]
    phases = [e["phase"] for e in logs if e["event"] == "phase.changed"]
    assert phases == ["Interrupted", "Uploading", "Completed"]
    (still,) = [e for e in logs if e["event"] == "checkpoint.still_uploading"]
    assert still["trainers"] == ["rank0"]
    (line,) = [e for e in logs if e["event"] == "interruption.handled"]
    assert line["log_level"] == "warning" and line["late"] == ["rank0: durable 2.0 s after the deadline"]
    (record,) = h.events()
    assert record["lost"] == [] and record["late"] == line["late"] and record["durable"][0]["step"] == 40
    assert h.metric("spotd_phase", phase="Completed") == 1


def hibernate(wall: datetime) -> Notice:
    """What SpotMonitor makes of a hibernate ITN: not final, its time is now."""
    return Notice(
        kind=NoticeKind.SPOT,
        action="hibernate",
        key="spot:hibernate",
        detected_at=wall,
        final=False,
        not_after=wall,
    )


async def test_hibernate_saves_at_once_and_training_goes_on(make):
    """Hibernate asks for a save due now, not final (the trainer keeps training); a save durable 0.1 s later is reported durable, not lost or late, and the phase never leaves Training."""
    h = make()
    trainer = h.channel.connect("rank0")
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(hibernate(h.time.wall()))
        assert episode is not None
        frame = await h.channel.next(trainer, "checkpoint")
        await h.save(trainer, 21, episode.request_id, after_s=0.1)
        await h.channel.next(trainer, "durable")
        await closed(episode)
        await h.settle()

    assert frame["final"] is False and frame["reason"] == "spot-hibernate"
    assert (
        frame["deadline"]
        == protocol.checkpoint(request_id="x", reason="x", deadline=T0, final=False)["deadline"]
    ), "due now"
    assert episode.lost() == [] and episode.late() == []
    assert [e for e in logs if e["event"] == "phase.changed"] == []
    assert h.coordinator.phase is Phase.TRAINING
    (line,) = [e for e in logs if e["event"] == "checkpoint.handled"]
    assert line["log_level"] == "info" and line["kind"] == "spot" and line["action"] == "hibernate"
    (record,) = h.events()
    assert record["durable"][0]["step"] == 21 and record["lost"] == []


async def test_hibernate_during_a_drill_asks_again_now(make):
    """A hibernate notice while a drill (deadline in 5 min) is open is more urgent: the trainer is asked again, due now."""
    h = make()
    trainer = h.channel.connect("rank0")
    cli = h.channel.connect("spotd-cli", role="control")
    drill = asyncio.create_task(h.coordinator.on_drill(cli, {"op": "drill", "wait": False}))
    await h.channel.next(trainer, "checkpoint")
    await drill
    urgent = await h.coordinator.handle_notice(hibernate(h.time.wall()))
    assert urgent is not None and urgent.reason == "spot-hibernate"
    assert [f["reason"] for f in h.channel.frames[trainer.id]] == ["drill", "spot-hibernate"]


async def completed_spot_episode(h: Harness, trainer: Session) -> Episode:
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    await h.save(trainer, 10, episode.request_id)
    await closed(episode)
    await h.settle()
    assert h.coordinator.phase is Phase.COMPLETED
    return episode


async def test_a_periodic_save_after_a_final_episode_means_training_goes_on(make):
    """After a Completed spot episode the trainer reports a periodic save: the phase goes back to Training."""
    h = make()
    trainer = h.channel.connect("rank0")
    await completed_spot_episode(h, trainer)
    await h.save(trainer, 20, None)
    assert h.coordinator.phase is Phase.TRAINING
    assert h.metric("spotd_phase", phase="Training") == 1


async def test_a_withdrawn_notice_puts_the_phase_back_to_training(make):
    """A spot notice withdrawn after its episode ended Completed puts the phase back to Training and the interruption deadline to 0."""
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await completed_spot_episode(h, trainer)
    assert h.metric("spotd_interruption_deadline_timestamp_seconds") > 0
    await h.coordinator.handle_withdrawn(episode.notice)
    assert h.coordinator.phase is Phase.TRAINING
    assert h.metric("spotd_interruption_deadline_timestamp_seconds") == 0


async def test_a_notice_withdrawn_while_its_episode_runs_ends_in_training(make):
    """A maintenance event cancelled while its episode is open: the episode still ends with its record, in Training rather than Completed."""
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(maintenance(h.time.wall(), in_s=600))
    assert episode is not None
    await h.coordinator.handle_withdrawn(episode.notice)
    await h.save(trainer, 10, episode.request_id)
    await closed(episode)
    await h.settle()
    assert h.coordinator.phase is Phase.TRAINING
    assert h.events()[0]["lost"] == []


# ---------------------------------------------------------------------------------------- coalescing


async def test_sigterm_after_a_spot_notice_does_not_restart_the_episode(make):
    """SIGTERM's shutdown notice during a spot episode returns that episode: trainers are asked once, the deadline stays."""
    h = make()
    trainer = h.channel.connect("rank0")
    first = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    h.time.advance(5.0)
    again = await h.coordinator.handle_notice(shutdown(h.time.wall()))
    assert again is first and first is not None
    assert first.deadline == T0 + timedelta(seconds=120 - MARGIN_S)
    assert h.channel.ops(trainer) == ["checkpoint"]
    assert h.metric("spotd_checkpoint_requests_total", reason="spot-terminate") == 1
    assert h.metric("spotd_checkpoint_requests_total", reason="shutdown") == 0


async def test_a_final_notice_supersedes_a_running_drill(make):
    """A spot notice during a non-final drill starts a final episode: the trainer is asked again, final this time."""
    h = make()
    trainer = h.channel.connect("rank0")
    drill = await h.coordinator.handle_notice(
        Notice(kind=NoticeKind.REBALANCE, action="rebalance", key="r", detected_at=h.time.wall(), final=False)
    )
    final = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert final is not None and drill is not None and final is not drill
    assert [f["final"] for f in h.channel.frames[trainer.id]] == [False, True]


# ---------------------------------------------------------------------------------------- commit retries


async def test_a_commit_that_fails_then_succeeds_is_durable(make):
    """A periodic save whose first commit fails is retried after one backoff and answered durable; nothing counts as failed."""
    h = make(store_class=FlakyStore, failures=1)
    trainer = h.channel.connect("rank0")
    await h.save(trainer, 3, None)
    durable = await h.channel.next(trainer, "durable")
    assert durable["request_id"] is None and durable["step"] == 3
    assert h.time.slept == [COMMIT_BACKOFF_S]
    assert h.store.calls == 2  # type: ignore[attr-defined]
    assert h.metric("spotd_upload_failures_total") == 0
    assert h.metric("spotd_last_durable_step") == 3


async def test_periodic_budget_exhausted_counts_once_and_tells_the_trainer(make, tmp_path):
    """A periodic commit into a store that always fails stops retrying within PERIODIC_COMMIT_BUDGET_S, counts one failure (not one per attempt) and sends error."""
    block_commits(tmp_path / "store")
    h = make()
    trainer = h.channel.connect("rank0")
    with structlog.testing.capture_logs() as logs:
        await h.save(trainer, 3, None)
        error = await h.channel.next(trainer, "error")
    assert error == protocol.store_failed(
        request_id=None, path="rank0/step-000003.pt", message=error["message"]
    )
    assert sum(h.time.slept) <= PERIODIC_COMMIT_BUDGET_S
    assert h.time.slept == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    (failed,) = [e for e in logs if e["event"] == "checkpoint.upload_failed"]
    assert failed["attempts"] == 8 and failed["local_kept"] is True
    assert len([e for e in logs if e["event"] == "checkpoint.upload_retry"]) == 7
    assert h.metric("spotd_upload_failures_total") == 1
    assert h.coordinator.phase is Phase.TRAINING


async def test_drill_reply_carries_the_record(make):
    """`spotd checkpoint` waits for the drill to end and gets ok, the record's figures and what is missing."""
    h = make()
    trainer = h.channel.connect("rank0")
    control = h.channel.connect("spotd-cli", role="control")
    reply_task = asyncio.create_task(h.coordinator.on_drill(control, {"op": "drill", "reason": "game day"}))
    frame = await h.channel.next(trainer, "checkpoint")
    assert frame["reason"] == "game day" and frame["final"] is False
    await h.save(trainer, 9, frame["request_id"])
    async with asyncio.timeout(WAIT_S):
        reply = await reply_task
    await h.settle()
    assert reply["ok"] is True and reply["missing"] == [] and reply["reason"] == "game day"
    assert [d["step"] for d in reply["durable"]] == [9] and reply["kind"] == "drill"
    assert h.events() == [], "a drill writes no events/ record"


# ---------------------------------------------------------------------------------------- control sessions


async def test_a_status_call_during_an_episode_is_never_asked_or_counted(make):
    """`spotd status` connecting (and leaving) during a spot episode is not asked, not waited for and not counted: the episode ends Completed with one trainer."""
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    status = h.channel.connect("spotd-cli", role="control")
    await h.coordinator.on_ready(status)
    await h.coordinator.on_status(status)
    h.channel.disconnect(status)
    h.coordinator.on_disconnect(status)
    await h.save(trainer, 7, episode.request_id)
    await closed(episode)
    await h.settle()

    assert h.channel.ops(status) == [], "a control session is never sent a checkpoint frame"
    assert episode.lost() == [] and h.coordinator.phase is Phase.COMPLETED
    assert h.metric("spotd_phase", phase="Completed") == 1
    (record,) = h.events()
    assert record["trainers"] == 1 and record["lost"] == []


async def test_a_drill_counts_only_trainers(make):
    """A drill asks the trainers only: neither the `spotd checkpoint` session nor a `spotd status` during it is asked, and the reply says 1 trainer."""
    h = make()
    trainer = h.channel.connect("rank0")
    cli = h.channel.connect("spotd-cli", role="control")
    await h.coordinator.on_ready(cli)
    reply_task = asyncio.create_task(h.coordinator.on_drill(cli, {"op": "drill", "reason": "drill"}))
    frame = await h.channel.next(trainer, "checkpoint")
    status = h.channel.connect("spotd-cli", role="control")
    await h.coordinator.on_ready(status)
    await h.save(trainer, 3, frame["request_id"])
    async with asyncio.timeout(WAIT_S):
        reply = await reply_task
    assert reply["ok"] is True and reply["trainers"] == 1 and reply["missing"] == []
    assert h.channel.ops(cli) == [] and h.channel.ops(status) == []


# ---------------------------------------------------------------------------------------- watch mode


class WatchClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def attach_watcher(h: Harness) -> tuple[Watcher, WatchClock]:
    """Watch mode as app.py wires it: the watcher's entries go to commit_path, and it answers notices."""
    clock = WatchClock()

    async def ready(path: Path) -> None:
        await h.coordinator.commit_path(path, trainer="watch", step=step_from_name(path.name))

    watcher = Watcher(checkpoint_dir=h.checkpoint_dir, settle_s=5.0, on_ready=ready, clock=clock)
    h.coordinator.attach_watcher(watcher)
    return watcher, clock


async def test_watch_mode_notice_commits_what_is_settled_at_emergency_priority(make):
    """In watch mode a spot notice makes the watcher commit the settled checkpoint at once, at emergency priority; no trainer is missed, nothing logged as an error, and the episode ends Completed."""
    h = make()
    watcher, clock = attach_watcher(h)
    (h.checkpoint_dir / "step-000300.pt").write_bytes(b"w" * 1000)
    await watcher.flush(lambda path: asyncio.sleep(0))  # first seen: not settled yet, nothing handed
    clock.now += 6.0
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
        assert episode is not None
        await closed(episode)
        await h.settle()

    assert [e for e in logs if e["log_level"] == "error" or e["event"] == "checkpoint.no_trainers"] == []
    (committed,) = [e for e in logs if e["event"] == "store.committed"]
    assert committed["priority"] == "emergency" and committed["step"] == 300
    (handled,) = [e for e in logs if e["event"] == "watch.notice_handled"]
    assert handled["log_level"] == "info" and handled["committed"] == [committed["name"]]
    assert h.coordinator.phase is Phase.COMPLETED and episode.lost() == []
    (record,) = h.events()
    assert record["durable"] == [{"trainer": "watch", "name": committed["name"], "step": 300}]
    assert record["bytes"] == 1000


async def test_watch_mode_notice_with_nothing_new_says_the_newest_is_durable(make):
    """A notice when the watcher has already committed everything uploads nothing and reports the newest commit durable, 0 bytes, at info."""
    h = make()
    watcher, clock = attach_watcher(h)
    (h.checkpoint_dir / "step-000300.pt").write_bytes(b"w" * 1000)
    await watcher.poll_once()
    clock.now += 6.0
    (committed,) = await watcher.poll_once()
    newest = (await h.store.list())[0]
    (h.checkpoint_dir / "step-000400.pt").write_bytes(b"w" * 10)  # being written: too fresh to commit
    with structlog.testing.capture_logs() as logs:
        episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
        assert episode is not None
        await closed(episode)
        await h.settle()

    (handled,) = [e for e in logs if e["event"] == "watch.notice_handled"]
    assert handled["committed"] == [] and handled["newest"] == newest.name
    assert handled["settling"] == ["step-000400.pt"] and handled["log_level"] == "warning"
    (record,) = h.events()
    assert record["lost"] == [] and record["bytes"] == 0
    assert record["durable"] == [{"trainer": "watch", "name": newest.name, "step": 300}]
    assert committed.name == "step-000300.pt"


async def test_a_watched_entry_whose_commit_was_given_up_is_offered_again(make, tmp_path):
    """A watch-mode commit given up after its retry budget is not taken as committed: once the store works, the next settled poll commits it."""
    block_commits(tmp_path / "store")
    h = make()
    watcher, clock = attach_watcher(h)
    (h.checkpoint_dir / "step-000300.pt").write_bytes(b"w" * 1000)
    await watcher.poll_once()
    clock.now += 6.0
    assert await watcher.poll_once() == [], "given up: not handed over"
    (tmp_path / "store" / JOB / "checkpoints").unlink()
    clock.now += 6.0
    assert [p.name for p in await watcher.poll_once()] == ["step-000300.pt"]
    assert [m.step for m in await h.store.list()] == [300]


async def test_a_final_save_of_the_trainers_own_is_committed_at_emergency_priority(make):
    """A `saved` with final: true and reason "sigterm" (the trainer got SIGTERM, nobody asked) is committed at emergency priority with that reason, and logged as final."""
    h = make()
    trainer = h.channel.connect("rank0")
    (h.checkpoint_dir / "rank0").mkdir()
    (h.checkpoint_dir / "rank0" / "last.pt").write_bytes(b"w" * 100)
    frame = {
        "op": "saved",
        "request_id": None,
        "path": "rank0/last.pt",
        "step": 77,
        "final": True,
        "reason": "sigterm",
    }
    with structlog.testing.capture_logs() as logs:
        await h.coordinator.on_saved(trainer, protocol.validate_client_frame(frame))
        await h.channel.next(trainer, "durable")
    (saved,) = [e for e in logs if e["event"] == "checkpoint.saved"]
    assert saved["final"] is True and saved["reason"] == "sigterm"
    (stored,) = [e for e in logs if e["event"] == "store.committed"]
    assert stored["priority"] == "emergency"
    (manifest,) = await h.store.list()
    assert manifest.reason == "sigterm" and manifest.step == 77


class EndedJob:
    """What the coordinator reads of a Finisher whose job has ended (Completed by `spotd complete`)."""

    ended = True


async def test_a_job_that_ended_keeps_its_phase(make):
    """Once the job itself has ended (issue 14's Completed), neither a late periodic save, nor a withdrawn notice, nor a spot episode with nobody left to ask moves the phase."""
    h = make()
    trainer = h.channel.connect("rank0")
    episode = await completed_spot_episode(h, trainer)
    h.coordinator.attach_finisher(EndedJob())
    await h.save(trainer, 20, None)
    await h.coordinator.handle_withdrawn(episode.notice)
    assert h.coordinator.phase is Phase.COMPLETED
    h.channel.disconnect(trainer)
    h.coordinator.on_disconnect(trainer)
    later = await h.coordinator.handle_notice(maintenance(h.time.wall(), in_s=600))
    assert later is not None
    h.time.advance(600)
    await closed(later)
    await h.settle()
    assert later.lost() == ["no trainer was connected"]
    assert h.coordinator.phase is Phase.COMPLETED, (
        "the job's end stands; the episode's record says what it lost"
    )
