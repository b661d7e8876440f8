"""Accelerate with spotd.accelerate.SpotdAccelerate, for real: a spot notice through a real daemon stops the
loop at a step, the save_state directory is committed whole, a new instance restores it, load_state and
SpotdAccelerate.batches() resume at that step and end bitwise where an uninterrupted run ends; a save killed
half-way is a hidden temporary that restore ignores."""

from __future__ import annotations

import json

import pytest

from tests.integrations.frameworks import (
    committed_manifests,
    example,
    interrupt_when_training,
    new_instance,
    no_daemon,
    with_daemon,
)
from tests.util import wait_until

pytest.importorskip("accelerate")

SCRIPT = "accelerate_train.py"
STEPS = ["--max-steps", "200", "--every-steps", "50"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_notice_mid_epoch_resumes_at_the_saved_step_bitwise(imds_sim, spotd_daemon, tmp_path):
    """Stopped by a notice, the step's save_state directory committed as one checkpoint; restored on a wiped disk, the loop resumes at that step (the epoch's trained batches skipped) and ends with the uninterrupted run's weights, bit for bit."""
    plain = example(SCRIPT, *STEPS, "--checkpoint-dir", str(tmp_path / "plain"), env=no_daemon(tmp_path))
    plain.finish()
    [reference] = plain.events("done")

    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    run = example(SCRIPT, *STEPS, "--step-sleep", "0.02", env=with_daemon(d1))
    interrupt_when_training(imds_sim, run, delay_s=1.2)
    run.finish()
    [stopped] = run.events("stopped")
    step = stopped["step"]
    assert 0 < step < 200, run.explain("stopped outside the run")
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    [handled] = d1.logs.events("interruption.handled")
    assert handled["lost"] == [], handled
    manifests = [m for m in map(json.loads, committed_manifests(tmp_path / "store")) if m["step"] == step]
    [manifest] = manifests
    files = {f["path"] for f in manifest["files"]}
    assert f"accelerate/step-{step:09d}/spotd-node-0.json" in files
    assert any("random_states_0" in f for f in files), files
    # The temp directory was announced: save_state's files went up as they were closed, through the rename.
    # Every one the checkpoint holds (model, optimizer, scheduler, RNG state, the node marker): until the
    # directory was listed through its open descriptor, a save renamed into place before that listing ran
    # (a busy machine) had the files written before the watch missed (2 seen in two full suite runs; the
    # commit sent the rest).
    [taken] = d1.logs.events("store.dir_stream_taken")
    streamed = d1.logs.events("overlap.started") + d1.logs.events("store.dir_file_deferred")
    assert taken["name"] == manifest["name"], (taken, streamed)
    assert sorted(f"accelerate/step-{step:09d}/{f}" for f in taken["seen"]) == sorted(files), (
        taken,
        streamed,
    )
    new_instance(d1)

    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    # A save killed half-way on this disk earlier: a hidden temporary, never what restore() picks.
    (tmp_path / "second" / "accelerate" / ".tmp-step-000000199").mkdir(parents=True)
    resumed = example(SCRIPT, *STEPS, env=with_daemon(d2))
    resumed.finish()
    assert [e["step"] for e in resumed.events("started")] == [step], resumed.explain("did not resume there")
    [done] = resumed.events("done")
    assert done == reference, "the resumed run ended with other weights than the uninterrupted one"
