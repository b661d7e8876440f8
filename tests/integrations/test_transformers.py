"""The Hugging Face Trainer with spotd.transformers.SpotdCallback, for real (a tiny GPT-2 from a config,
HF_HUB_OFFLINE=1): a spot notice through a real daemon stops it at a step with no evaluation in the window,
checkpoint-N/ is committed whole, a new instance restores it and resume_from_checkpoint ends bitwise where an
uninterrupted run ends; two ranks under torchrun stop at the same step, on a notice and on SIGTERM; a
checkpoint killed mid-write is never committed."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

pytest.importorskip("transformers")

import spotd.transformers
from tests.integrations.frameworks import (
    ROOT,
    Run,
    committed_manifests,
    example,
    interrupt_when_training,
    new_instance,
    no_daemon,
    torchrun,
    with_daemon,
)
from tests.util import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = "transformers_train.py"
# No evaluation in these runs: the one a stop skips would draw its loader's seed from the global RNG, and the
# resumed run would then differ from an uninterrupted one by that draw (the torchrun test covers the skip).
STEPS = ["--max-steps", "160", "--save-steps", "50", "--eval-steps", "1000"]


def manifest_of_step(store, step: int) -> list[dict]:
    return [m for m in map(json.loads, committed_manifests(store)) if m["step"] == step]


def test_a_notice_resumes_at_the_saved_step_bitwise(imds_sim, spotd_daemon, tmp_path):
    """Stopped by a notice, checkpoint-N/ committed as one checkpoint with its optimizer, scheduler, RNG and trainer state; restored on a wiped disk, the Trainer resumes at N and ends with the uninterrupted run's weights, bit for bit."""
    plain = example(SCRIPT, *STEPS, "--checkpoint-dir", str(tmp_path / "plain"), env=no_daemon(tmp_path))
    plain.finish()
    [reference] = plain.events("done")

    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    run = example(SCRIPT, *STEPS, "--step-sleep", "0.03", env=with_daemon(d1))
    interrupt_when_training(imds_sim, run, delay_s=1.5)
    run.finish()
    [stopped] = run.events("stopped")
    step = stopped["step"]
    assert 0 < step < 160, run.explain("stopped outside the run")
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    [handled] = d1.logs.events("interruption.handled")
    assert handled["lost"] == [], handled
    [manifest] = manifest_of_step(tmp_path / "store", step)
    files = {f["path"].rsplit("/", 1)[-1] for f in manifest["files"]}
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    } <= files
    # The callback announced checkpoint-N/: its files went up as the Trainer closed them, and the commit
    # adopted them.
    [taken] = d1.logs.events("store.dir_stream_taken")
    assert taken["files_seen"] >= 5 and taken["name"] == manifest["name"], taken
    new_instance(d1)

    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    resumed = example(SCRIPT, *STEPS, env=with_daemon(d2))
    resumed.finish()
    assert [e["step"] for e in resumed.events("started")] == [step], resumed.explain("did not resume there")
    [done] = resumed.events("done")
    assert done == reference, "the resumed run ended with other weights than the uninterrupted one"


def test_two_ranks_under_torchrun_stop_at_the_same_step(imds_sim, spotd_daemon, tmp_path):
    """2 ranks (DDP on gloo) under torchrun, evaluating every step: the notice reaches rank 0's spotd link only, both ranks stop at the same step with no evaluation at it, and that step's checkpoint-N/ holds both ranks' RNG state in one committed checkpoint."""
    d = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "disk")
    run = torchrun(
        SCRIPT,
        "--max-steps",
        "400",
        "--save-steps",
        "1000",
        "--eval-steps",
        "1",
        "--step-sleep",
        "0.02",
        nproc=2,
        env=with_daemon(d),
    )
    run.wait_for("started", count=2)
    interrupt_when_training(imds_sim, run, delay_s=1.0)
    run.finish(timeout_s=120)
    stopped = run.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1], run.explain("not every rank stopped")
    assert len({e["step"] for e in stopped}) == 1, f"ranks stopped at different steps: {stopped}"
    step = stopped[0]["step"]
    assert step not in {e["step"] for e in run.events("evaluation")}, run.explain("evaluated in the window")
    wait_until(lambda: d.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    [handled] = d.logs.events("interruption.handled")
    assert handled["lost"] == [], handled
    [manifest] = manifest_of_step(tmp_path / "store", step)
    files = {f["path"].rsplit("/", 1)[-1] for f in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "optimizer.pt"} <= files, files
    assert manifest.get("world_size") in (None, 1), "one node's checkpoint is one whole checkpoint"


def test_a_checkpoint_killed_mid_write_is_never_committed(imds_sim, spotd_daemon, tmp_path):
    """The Trainer is SIGKILLed while writing checkpoint-100 (weights written, RNG and trainer state not): it is never reported nor committed; on the same disk latest_checkpoint() skips it, and a new instance restores checkpoint-50 and resumes there."""
    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    dying = Run(
        [sys.executable, str(ROOT / "tests" / "integrations" / "hf_die_in_save.py"), *STEPS],
        {**with_daemon(d1), "DIE_AT_STEP": "100"},
    )
    dying.wait_for("dying")
    dying.finish(code=-9)
    half = tmp_path / "first" / "hf-run" / "checkpoint-100"
    assert (half / "model.safetensors").exists() and not (half / "trainer_state.json").exists()
    wait_until(lambda: manifest_of_step(tmp_path / "store", 50), timeout_s=30, what="checkpoint-50 committed")
    assert manifest_of_step(tmp_path / "store", 100) == []

    assert spotd.transformers.latest_checkpoint(tmp_path / "first" / "hf-run").endswith("checkpoint-50")
    new_instance(d1)
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    assert not (tmp_path / "second" / "hf-run" / "checkpoint-100").exists()
    resumed = example(SCRIPT, *STEPS, env=with_daemon(d2))
    resumed.finish()
    assert [e["step"] for e in resumed.events("started")] == [50]
    assert resumed.events("done"), resumed.explain("did not finish")


def test_sigterm_through_torchrun_stops_both_ranks_at_one_step(imds_sim, spotd_daemon, tmp_path):
    """SIGTERM to torchrun (systemd's KillMode=mixed): torchrun forwards it to both workers, rank 1's flag (it has no spotd link of its own) and rank 0's guard meet in the agreement, both stop at one step, that checkpoint is committed, and no worker is killed."""
    d = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "disk")
    run = torchrun(
        SCRIPT,
        *("--max-steps", "400", "--save-steps", "1000", "--eval-steps", "1000", "--step-sleep", "0.02"),
        nproc=2,
        env=with_daemon(d),
    )
    run.wait_for("started", count=2)
    time.sleep(1.0)
    run.proc.send_signal(signal.SIGTERM)
    run.finish(timeout_s=120, code=None)
    stopped = run.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1], run.explain("not every rank stopped")
    (step,) = {e["step"] for e in stopped}
    assert manifest_of_step(tmp_path / "store", step), "the SIGTERM checkpoint was not committed"
    assert not [line for line in run.err.lines if "exitcode  : -" in line], run.explain("a worker was killed")
