"""Background transfers give training the cores (issue 13 item 5): ``store.background_rate`` caps what
BACKGROUND transfers send per second, their threads run at ``store.background_nice`` (nice 19, or
SCHED_IDLE), and EMERGENCY transfers are neither capped nor run on a reniced thread."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog

from spotd.config import load_config
from spotd.metrics import Metrics
from spotd.store import Priority
from spotd.store.pacing import (
    BACKGROUND_NICE,
    CoreWait,
    RateLimit,
    lower_thread_priority,
    thread_run_delay,
    warn_if_stalling,
)
from spotd.store.s3 import S3Store
from spotd.store.transfer_pool import TransferPool
from tests.store.helpers import busy_core, info

MIB = 1024 * 1024


class Clock:
    """A clock that moves only when a thread sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limit_lets_through_at_most_the_rate_plus_one_part() -> None:
    """Counting bytes against the (injected) clock: after every take, bytes granted <= rate * elapsed + one part."""
    clock = Clock()
    limit = RateLimit(bytes_per_second=10 * MIB, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(20):
        limit.take(4 * MIB)
        assert limit.granted <= 10 * MIB * (clock.now - start) + 4 * MIB
    assert limit.granted == 80 * MIB
    assert clock.now - start == pytest.approx(76 * MIB / (10 * MIB))  # 19 parts waited, the first did not


def test_rate_limit_builds_no_credit_while_idle() -> None:
    """An hour without transfers does not let the next ones burst: the second part still waits its turn."""
    clock = Clock()
    limit = RateLimit(bytes_per_second=MIB, clock=clock, sleep=clock.sleep)
    limit.take(MIB)
    clock.now += 3600
    assert limit.take(MIB) == 0.0
    assert limit.take(MIB) == pytest.approx(1.0)


def test_rate_limit_refuses_a_rate_of_nothing() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        RateLimit(bytes_per_second=0)


@pytest.mark.skipif(sys.platform != "linux", reason="thread niceness is Linux's")
async def test_background_threads_are_reniced_emergency_threads_are_not() -> None:
    """A BACKGROUND transfer runs on a thread at the pool's background_nice (19 here); an EMERGENCY one,
    even right after, on a thread at the daemon's own priority."""
    pool = TransferPool(limit=2, background_nice=19)

    def nice() -> tuple[str, int]:
        tid = threading.get_native_id()
        return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)

    try:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        bg = await asyncio.gather(*(pool.run(Priority.BACKGROUND, nice) for _ in range(4)))
        em = await asyncio.gather(*(pool.run(Priority.EMERGENCY, nice) for _ in range(4)))
    finally:
        await asyncio.to_thread(pool.shutdown)
    assert {n for _, n in bg} == {max(base, 19)}
    assert {n for _, n in em} == {base}
    assert not {name for name, _ in bg} & {name for name, _ in em}


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_IDLE and thread niceness are Linux's")
@pytest.mark.parametrize(
    ("text", "policy", "nice"),
    [
        ('background_nice = "idle"', "idle", None),
        ("background_nice = 12", "other", 12),
        ("", "other", BACKGROUND_NICE),
    ],
)
async def test_store_background_nice_sets_the_background_threads_only(
    tmp_path: Path, text, policy, nice
) -> None:
    """store.background_nice from the config file reaches the S3 store's background threads: a nice value
    (absolute, whatever the daemon's own) or SCHED_IDLE; emergency threads keep the daemon's priority."""
    cfg_file = tmp_path / "spotd.toml"
    cfg_file.write_text(f'[store]\nuri = "s3://bucket/prefix"\n{text}\n')
    store = S3Store.from_config(load_config(cfg_file, environ={}))

    def where() -> tuple[str, int]:
        tid = threading.get_native_id()
        idle = os.sched_getscheduler(tid) == os.SCHED_IDLE
        return ("idle" if idle else "other"), os.getpriority(os.PRIO_PROCESS, tid)

    try:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        bg = await asyncio.gather(*(store._pool.run(Priority.BACKGROUND, where) for _ in range(3)))
        em = await asyncio.gather(*(store._pool.run(Priority.EMERGENCY, where) for _ in range(3)))
    finally:
        await store.close()
    assert {p for p, _ in bg} == {policy}
    if nice is not None:
        assert {n for _, n in bg} == {max(base, nice)}
    assert set(em) == {("other", base)}


@pytest.mark.skipif(sys.platform != "linux", reason="thread niceness is Linux's")
def test_a_thread_already_nicer_is_left_as_it_is() -> None:
    """lower_thread_priority never raises a thread's priority: one at nice 19 asked for 10 stays at 19."""
    got: list[tuple[bool, int]] = []

    def run() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        got.append((lower_thread_priority(10), os.getpriority(os.PRIO_PROCESS, tid)))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got == [(False, 19)]


async def test_background_commit_is_capped_emergency_commit_is_not(s3_bucket, tmp_path: Path) -> None:
    """A periodic commit of 40 MiB with background_rate = 20 MiB/s: at every part's completion the bytes sent
    so far are at most rate * elapsed + one part (counted, not timed); an emergency commit afterwards
    bypasses the cap (nothing more goes through it)."""
    ckdir = tmp_path / "ckpt"
    (ckdir / "a").mkdir(parents=True)
    (ckdir / "a" / "model.pt").write_bytes(os.urandom(40 * MIB))
    rate, part = 20 * MIB, 5 * MIB
    store = S3Store(
        uri=s3_bucket.uri(),
        job_id="job1",
        endpoint_url=s3_bucket.endpoint_url,
        part_size=part,
        concurrency=8,
        background_rate=rate,
    )
    sent: list[tuple[float, int]] = []
    total = 0

    def progress(n: int) -> None:
        nonlocal total
        total += n
        sent.append((time.monotonic(), total))

    try:
        started = time.monotonic()
        await store.commit(ckdir / "a", checkpoint_dir=ckdir, info=info(1), progress=progress)
        assert total == 40 * MIB and store.background_bytes_paced == 40 * MIB
        for at, nbytes in sent:
            assert nbytes <= rate * (at - started) + part, f"{nbytes} bytes after {at - started:.2f} s"
        (ckdir / "b").mkdir()
        (ckdir / "b" / "model.pt").write_bytes(os.urandom(40 * MIB))
        await store.commit(ckdir / "b", checkpoint_dir=ckdir, info=info(2), priority=Priority.EMERGENCY)
        assert store.background_bytes_paced == 40 * MIB
        assert store.background_rate == rate
    finally:
        await store.close()


def test_core_wait_share_between_two_totals() -> None:
    assert CoreWait.share((1.0, 0.5), (1.0, 0.5)) == 0.0  # nothing ran between
    assert CoreWait.share((1.0, 0.5), (5.0, 2.5)) == 0.5
    w = CoreWait()
    assert w.timed(lambda: 7) == 7
    busy, waited = w.totals()
    assert busy > 0 and 0 <= waited <= busy


@pytest.mark.skipif(thread_run_delay() is None, reason="no /proc/thread-self/schedstat on this kernel")
async def test_a_periodic_upload_held_back_by_a_busy_core_leaves_the_estimate_alone(
    s3_bucket, tmp_path: Path
) -> None:
    """A trainer keeps the daemon's core busy (a spinning process pinned to it): the background threads, at
    nice 19 (store.background_nice), wait for that core most of the time, and the 9 MiB periodic upload takes far longer than its
    work. The commit says how much of its threads' time went to waiting (the gauge), and the throughput the
    deadline is estimated from leaves that waiting out: estimating the same bytes gives the upload's time
    less the waited share, not the time the busy trainer made it take."""
    ckdir = tmp_path / "ckpt"
    (ckdir / "a").mkdir(parents=True)
    (ckdir / "a" / "model.pt").write_bytes(os.urandom(9 * MIB))
    metrics = Metrics()
    async with busy_core():
        store = S3Store(
            uri=s3_bucket.uri(), job_id="job1", endpoint_url=s3_bucket.endpoint_url, background_nice=19
        )
        store._metrics = metrics  # type: ignore[attr-defined]
        try:
            started = time.monotonic()
            await store.commit(ckdir / "a", checkpoint_dir=ckdir, info=info(1))
            elapsed = time.monotonic() - started
            estimate = store.estimate_seconds(9 * MIB)
            held_back = store.background_core_wait
        finally:
            await store.close()
    waited = metrics.registry.get_sample_value("spotd_background_core_wait_ratio")
    assert waited is not None and waited > 0.5, f"the threads waited {waited} of their time"
    assert estimate is not None and estimate <= elapsed * (1 - waited) + 0.01, (estimate, elapsed, waited)
    assert held_back == waited  # what a request's estimate says of the rate (the median of one upload)


@pytest.mark.parametrize(
    ("nice", "warned"), [(0, False), (10, False), (14, False), (15, True), (19, True), ("idle", True)]
)
def test_a_nice_value_that_can_stall_the_daemon_is_said(nice, warned) -> None:
    """store.background_nice at 15-19 or "idle" can hold the daemon's event loop for seconds (a thread that
    nice holding the GIL without a core): the daemon says so at start, with the setting that spreads uploads
    without it; the default and moderate values say nothing."""
    with structlog.testing.capture_logs() as logs:
        assert warn_if_stalling(nice) is warned
    said = [e for e in logs if e["event"] == "store.background_nice_stalls"]
    assert len(said) == int(warned)
    if warned:
        assert said[0]["log_level"] == "warning" and "store.background_rate" in said[0]["fix"]
