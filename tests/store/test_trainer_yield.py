"""Periodic uploads give way to the trainer (issue 13 item 5, ``store.yield_to_trainer``): the window of
background parts in flight follows the trainers' own wait for a core, read from the scheduler."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog

from spotd.config import ConfigError, load_config
from spotd.metrics import Metrics
from spotd.store import Priority, trainer_yield
from spotd.store.s3 import S3Store
from spotd.store.trainer_yield import (
    LEVEL_MIN,
    YIELD_SLOWDOWN,
    TrainerYield,
    allowed_wait,
    trainer_cpu,
    trainer_processes,
)
from tests.store.helpers import busy_core, info
from tests.util import wait_until

MIB = 1024 * 1024
PID = 4242


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Trainer:
    """What the scheduler says of one trainer process: seconds ran and waited, moved by the test."""

    def __init__(self) -> None:
        self.ran = 0.0
        self.waited = 0.0
        self.readable = True

    def read(self, pids: object) -> dict[int, tuple[float, float]] | None:
        return {PID: (self.ran, self.waited)} if self.readable else None

    def runs(self, seconds: float, *, waiting: float) -> None:
        """The trainer was runnable ``seconds`` and without a core ``waiting`` of that share."""
        self.ran += seconds * (1 - waiting)
        self.waited += seconds * waiting


def make(limit: int = 8) -> tuple[TrainerYield, Clock, Trainer]:
    clock, trainer = Clock(), Trainer()
    y = TrainerYield(slowdown=YIELD_SLOWDOWN, limit=limit, read=trainer.read, family=list, clock=clock)
    return y, clock, trainer


def upload_begins(y: TrainerYield, clock: Clock, trainer: Trainer, *, waiting_alone: float) -> float:
    """The trainer connects and runs alone for 2 s, then a periodic upload lets its first part in."""
    assert y.trainers([PID])
    y.refresh()
    clock.now += 2.0
    trainer.runs(2.0, waiting=waiting_alone)
    return y.enter()


def part_done(y: TrainerYield, clock: Clock, trainer: Trainer, started: float, *, waiting: float) -> None:
    """The part let in at ``started`` took 0.6 s, the trainer waiting ``waiting`` of it."""
    clock.now += 0.6
    trainer.runs(0.6, waiting=waiting)
    y.exit(started)


def next_part(y: TrainerYield, clock: Clock, trainer: Trainer, *, waiting: float) -> None:
    """After the gap the window asks for (the trainer running through it), one more part of 0.6 s; the
    trainer waits ``waiting`` of the whole time, gap and part."""
    gap = max(0.0, y.resume_at - clock.now)
    clock.now += gap
    trainer.runs(gap, waiting=waiting)
    part_done(y, clock, trainer, y.enter(), waiting=waiting)


def test_no_trainer_no_holding_back() -> None:
    """With no trainer connected every slot is open and nothing is read or held."""
    y, _, trainer = make()
    trainer.readable = False  # would warn if read
    with structlog.testing.capture_logs() as logs:
        started = [y.enter() for _ in range(20)]
        for s in started:
            y.exit(s)
    assert y.level == 8 and y.yielded_s == 0 and y.cuts == 0
    assert not logs


def test_naming_the_trainers_reads_nothing_refresh_does() -> None:
    """The event loop names the trainers (reading /proc for a large job takes tens of milliseconds): that
    reads nothing; :meth:`refresh`, on a transfer thread, finds the processes and starts the measure of
    their wait alone. Naming the same trainers again changes nothing."""
    reads: list[list[int]] = []
    y = TrainerYield(
        slowdown=YIELD_SLOWDOWN,
        limit=8,
        read=lambda procs: reads.append(list(procs)) or {PID: (0.0, 0.0)},
        family=lambda pids: [*pids, 7],
        clock=Clock(),
    )
    assert y.trainers([PID]) and reads == []
    y.refresh()
    assert reads == [[PID, 7]]
    assert not y.trainers([PID])


def test_a_trainer_slowed_cuts_the_window_by_how_much_and_spaces_the_parts() -> None:
    """The upload starts at one part in flight half the time. The trainer waited 50 % of its runnable time
    during it (far above the 4.8 % that is 5 % slower): the window is cut to an eighth at once, and the next
    part waits fifteen times the last part's time. At 3 % (above the limit's half) it holds; cut again, it
    never goes below LEVEL_MIN."""
    y, clock, trainer = make()
    s = upload_begins(y, clock, trainer, waiting_alone=0.0)
    assert y.level == 0.5 and y.baseline == {PID: 0.0}
    assert allowed_wait(0.0, 0.05) == pytest.approx(1 - 1 / 1.05)
    part_done(y, clock, trainer, s, waiting=0.5)
    assert y.level == pytest.approx(0.5 / 8) and y.cuts == 1
    assert y.pressure == pytest.approx(0.5 / (1 - 1 / 1.05))
    assert y.resume_at == pytest.approx(clock.now + 0.6 * 15)
    next_part(y, clock, trainer, waiting=0.03)
    assert y.level == pytest.approx(0.5 / 8) and y.cuts == 1
    for _ in range(12):
        next_part(y, clock, trainer, waiting=0.9)
    assert y.level == LEVEL_MIN
    assert y.resume_at - clock.now <= trainer_yield.MAX_GAP_S


def test_a_trainer_not_slowed_opens_the_window_to_every_slot() -> None:
    """While the trainer waits no more than it did alone, the window grows every interval (fourfold: it is
    not slowed at all), up to every transfer slot, and no gap is left between parts once it is one part or
    more."""
    y, clock, trainer = make(limit=4)
    s = upload_begins(y, clock, trainer, waiting_alone=0.0)
    part_done(y, clock, trainer, s, waiting=0.5)  # cut below one part first
    assert y.level < 1 and y.resume_at > clock.now
    levels = []
    for _ in range(10):
        next_part(y, clock, trainer, waiting=0.0)
        levels.append(y.level)
    assert levels == sorted(levels) and levels[-1] == 4
    assert y.resume_at <= clock.now


def test_what_the_trainer_waited_alone_is_not_held_against_the_upload() -> None:
    """A trainer that already waited 30 % of its time alone (its own threads outnumber the cores) is 5 %
    slower only at 33.3 %: 32 % during the upload holds the window, 40 % cuts it."""
    y, clock, trainer = make()
    s = upload_begins(y, clock, trainer, waiting_alone=0.3)
    assert y.baseline == {PID: pytest.approx(0.3)}
    assert allowed_wait(0.3, 0.05) == pytest.approx(1 - 0.7 / 1.05)
    part_done(y, clock, trainer, s, waiting=0.32)
    assert y.level == 0.5 and y.cuts == 0
    next_part(y, clock, trainer, waiting=0.4)
    assert y.cuts == 1 and y.level < 0.5


def test_a_trainer_that_mostly_sleeps_is_slowed_by_its_wait_over_the_interval() -> None:
    """A trainer runnable 10 % of the time (it waits on its GPU between steps) that waits for a core at
    each wake-up is slowed by that wait over the whole interval, not over its own running time: 30 % of
    its runnable time is 3 % of the interval, under the 4.8 % that is 5 % slower."""
    y, clock, trainer = make()
    s = upload_begins(y, clock, trainer, waiting_alone=0.0)
    clock.now += 0.6
    trainer.ran += 0.042
    trainer.waited += 0.018
    y.exit(s)
    assert y.cuts == 0 and y.pressure == pytest.approx(0.03 / (1 - 1 / 1.05))


def test_a_trainer_hardly_runnable_is_not_slowed() -> None:
    """A trainer runnable 1 % of the time (waiting on its GPU) that waited for a core all of it is not held
    against the upload: the share is of a trainer that wants the CPU."""
    y, clock, trainer = make()
    s = upload_begins(y, clock, trainer, waiting_alone=0.0)
    clock.now += 0.6
    trainer.waited += 0.006
    y.exit(s)
    assert y.cuts == 0 and y.pressure == 0 and y.level > 0.5


def test_no_new_level_before_an_interval() -> None:
    """Parts that finish within INTERVAL_S of the last decision leave the window as it is."""
    y, clock, trainer = make()
    s = upload_begins(y, clock, trainer, waiting_alone=0.0)
    clock.now += trainer_yield.INTERVAL_S / 2
    trainer.runs(trainer_yield.INTERVAL_S / 2, waiting=0.9)
    y.exit(s)
    assert y.level == 0.5 and y.cuts == 0 and y.pressure is None


def test_unreadable_trainers_hold_nothing_back_and_say_so_once() -> None:
    """Where the trainers' schedstat cannot be read (another PID namespace, an old kernel), uploads go at
    full width and one warning names why and what to do instead."""
    y, clock, trainer = make()
    trainer.readable = False
    with structlog.testing.capture_logs() as logs:
        y.trainers([PID])
        y.refresh()
        started = [y.enter() for _ in range(3)]
        for s in started:
            clock.now += 1
            y.exit(s)
    assert y.level == 8 and y.cuts == 0
    (warning,) = [e for e in logs if e["event"] == "store.yield_unreadable"]
    assert warning["log_level"] == "warning" and "store.background_rate" in warning["fix"]


def test_a_part_beyond_the_window_waits_for_one_to_finish_and_close_lets_it_go() -> None:
    """Real threads: at one part in flight, a second part waits until the first is done; a third waiting
    when the pool shuts down is let go at once."""
    y, clock, trainer = make()
    first = upload_begins(y, clock, trainer, waiting_alone=0.0)
    let_in = threading.Event()
    t = threading.Thread(target=lambda: (y.enter(), let_in.set()))
    t.start()
    wait_until(lambda: y.waiting == 1, timeout_s=5, what="the second part waiting")
    assert not let_in.is_set()
    y.exit(first)  # 0 s taken: no gap; within the interval: no new level
    assert let_in.wait(5)
    t.join(5)
    third = threading.Thread(target=y.enter)
    third.start()
    wait_until(lambda: y.waiting == 1, timeout_s=5, what="the third part waiting")
    y.close()
    third.join(5)
    assert not third.is_alive()


def test_trainer_cpu_reads_a_trainer_and_its_children_never_this_process() -> None:
    """A real trainer process with a child (a DataLoader worker): both are read, each with seconds ran; the
    daemon's own pid is skipped even when named; a pid that is gone reads as nothing."""
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            child = int(proc.stdout.readline())
            procs = trainer_processes([proc.pid, os.getpid()])
            assert sorted(procs) == sorted([proc.pid, child])
            got = trainer_cpu(procs)
            assert got is not None and set(got) == {proc.pid, child}
            # The trainer has run an interpreter; its child, just started, may not have been charged yet.
            assert got[proc.pid][0] > 0
            assert all(ran >= 0 and waited >= 0 for ran, waited in got.values())
        finally:
            proc.kill()
            proc.wait(10)
    assert trainer_cpu([proc.pid]) is None


def test_store_yield_to_trainer_is_a_share_below_one() -> None:
    """store.yield_to_trainer is 0.05 unless given, 0 turns it off, and a share outside [0, 1) is an error
    naming the key and the fix."""
    assert load_config(environ={}).store.yield_to_trainer == 0.05
    assert load_config(environ={"SPOTD_STORE_YIELD_TO_TRAINER": "0"}).store.yield_to_trainer == 0
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(ConfigError) as err:
            load_config(environ={"SPOTD_STORE_YIELD_TO_TRAINER": bad})
        assert "store.yield_to_trainer" in str(err.value) and "0.05" in str(err.value)
    store = S3Store(uri="s3://b/p", job_id="j", endpoint_url="http://127.0.0.1:9", yield_to_trainer=0)
    assert store.yielding is None


@pytest.mark.skipif(trainer_cpu([os.getppid()]) is None, reason="no /proc/<pid>/task/*/schedstat here")
async def test_a_periodic_upload_gives_way_to_a_busy_trainer_and_loses_nothing(
    s3_bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer keeps the daemon's core busy (a spinning process pinned to it, registered as the trainer).
    The periodic upload's parts are held back (the yielded gauge, the commit's log line), the rate it
    measured is marked as the trainer's and not the wire's, and every byte is committed and restored. An
    emergency commit beside the same trainer is never held."""
    monkeypatch.setattr(trainer_yield, "INTERVAL_S", 0.0)  # a decision at every part
    monkeypatch.setattr(trainer_yield, "MAX_GAP_S", 0.5)  # keep the test short
    ckdir = tmp_path / "ckpt"
    (ckdir / "a").mkdir(parents=True)
    data = os.urandom(20 * MIB)
    (ckdir / "a" / "model.pt").write_bytes(data)
    metrics = Metrics()
    async with busy_core() as trainer_pid:
        store = S3Store(
            uri=s3_bucket.uri(), job_id="job1", endpoint_url=s3_bucket.endpoint_url, part_size=5 * MIB
        )
        store._metrics = metrics  # type: ignore[attr-defined]
        try:
            store.set_trainers([trainer_pid])
            assert store.yielding is not None
            with structlog.testing.capture_logs() as logs:
                first = await store.commit(ckdir / "a", checkpoint_dir=ckdir, info=info(1))
            held = store.yielded_seconds()
            cuts = store.yielding.cuts
            rate_held = store.background_yielded
            view = store.background_view()
            (ckdir / "b").mkdir()
            (ckdir / "b" / "model.pt").write_bytes(os.urandom(10 * MIB))
            await store.commit(ckdir / "b", checkpoint_dir=ckdir, info=info(2), priority=Priority.EMERGENCY)
            assert store.yielded_seconds() == held
            restored = await store.restore(tmp_path / "restored", name=first.name)
        finally:
            await store.close()
    assert cuts >= 1 and held > 0
    yielded = metrics.registry.get_sample_value("spotd_background_yielded_ratio")
    assert yielded is not None and yielded > 0.1
    (line,) = [e for e in logs if e["event"] == "store.committed"]
    assert line["yielded"] == pytest.approx(yielded, abs=0.001)
    assert rate_held is True
    # What `spotd status` shows: the last periodic upload as the log line says it, and whom it gives way to.
    assert view["last"]["yielded"] == line["yielded"] and view["last"]["bytes"] == 20 * MIB
    assert view["rate_yielded"] is True and view["samples"] == 1
    assert view["yielding"]["trainers"] == [trainer_pid] and view["yielding"]["cuts"] == cuts
    assert restored.files == 1
    assert (tmp_path / "restored" / "a" / "model.pt").read_bytes() == data
