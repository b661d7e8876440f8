"""The store measures its own upload throughput (issue 13 item 4, store side): a moving median of the
bytes/s of background commits, ``estimate_seconds`` and the gauge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotd.metrics import Metrics
from spotd.store import Priority
from spotd.store.throughput import Throughput
from tests.store.helpers import Backend, info

MIB = 1024 * 1024


def test_median_of_the_window_and_small_uploads_ignored() -> None:
    t = Throughput(window=3, min_bytes=MIB)
    assert t.estimate(10 * MIB) is None and t.bytes_per_second() is None
    assert not t.record(MIB - 1, 0.001)  # latency, not bandwidth
    assert not t.record(10 * MIB, 0.0)
    for rate in (100, 10, 50):
        assert t.record(rate * MIB, 1.0)
    assert t.bytes_per_second() == 50 * MIB  # the slow outlier does not swing it
    assert t.estimate(100 * MIB) == pytest.approx(2.0)
    t.record(200 * MIB, 1.0)
    t.record(200 * MIB, 1.0)  # the window moves on: 100 and 10 fell out
    assert t.bytes_per_second() == 200 * MIB
    assert t.samples == 3


def test_time_spent_waiting_for_a_core_is_left_out() -> None:
    """An upload whose threads waited for a core a share of their time is measured over the rest of it,
    and the window's median of those shares is kept beside the rate."""
    t = Throughput(window=3, min_bytes=MIB)
    assert t.core_wait() is None
    assert t.record(100 * MIB, 4.0, core_wait=0.75)  # 1 s of it was the upload's own
    assert t.bytes_per_second() == 100 * MIB
    t.record(100 * MIB, 1.0)
    t.record(100 * MIB, 2.0, core_wait=0.5)
    assert t.core_wait() == 0.5
    assert not t.record(100 * MIB, 1.0, core_wait=1.0)  # nothing left to measure over


def test_uploads_held_back_for_the_trainer_are_kept_apart() -> None:
    """An upload that gave way to the trainer measured the trainer, not the wire: while the window holds an
    upload that did not, the rate and its core wait come from those alone; when every upload gave way, the
    rate is theirs and :meth:`held` says so."""
    t = Throughput()
    assert not t.held()
    t.record(16 * MIB, 8.0, 0.02, held=True)  # 2 MiB/s
    assert t.held() and t.bytes_per_second() == pytest.approx(16 * MIB / 8.0 / 0.98)
    t.record(16 * MIB, 0.5, 0.1)  # 32 MiB/s, not held
    t.record(16 * MIB, 9.0, held=True)
    assert not t.held()
    assert t.bytes_per_second() == pytest.approx(16 * MIB / 0.45)
    assert t.core_wait() == pytest.approx(0.1)
    assert t.samples == 3


async def test_background_commits_measure_emergency_ones_do_not(
    backend: Backend, ckdir: Path, tmp_path: Path
) -> None:
    metrics = Metrics()
    store = backend.make()
    store._metrics = metrics  # type: ignore[attr-defined]
    gauge = "spotd_upload_throughput_bytes_per_second"
    try:
        assert store.estimate_seconds(MIB) is None
        assert metrics.registry.get_sample_value(gauge) == 0
        d1 = ckdir / "s1"
        d1.mkdir()
        (d1 / "a.bin").write_bytes(os.urandom(16 * MIB))
        await store.commit(d1, checkpoint_dir=ckdir, info=info(1), priority=Priority.EMERGENCY)
        assert store.estimate_seconds(MIB) is None
        d2 = ckdir / "s2"
        d2.mkdir()
        (d2 / "a.bin").write_bytes(os.urandom(16 * MIB))
        await store.commit(d2, checkpoint_dir=ckdir, info=info(2))
        rate = metrics.registry.get_sample_value(gauge)
        assert rate is not None and rate > 0
        est = store.estimate_seconds(100 * MIB)
        assert est is not None and est == pytest.approx(100 * MIB / rate)
        # A commit whose files were all copied sent nothing: it is not a measure of the wire.
        d3 = ckdir / "s3"
        d3.mkdir()
        (d3 / "a.bin").write_bytes((d2 / "a.bin").read_bytes())
        await store.commit(d3, checkpoint_dir=ckdir, info=info(3))
        assert store._throughput.samples == 1  # type: ignore[attr-defined]
    finally:
        await store.close()
