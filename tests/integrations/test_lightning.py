"""PyTorch Lightning with spotd.lightning.SpotdCallback, for real: a spot notice through a real daemon and
IMDS simulator stops fit() at a step even before min_steps, with no validation inside the window; the .ckpt is
committed, the disk wiped, a new daemon restores it, fit(ckpt_path="last") resumes at that step and ends
bitwise where an uninterrupted run ends."""

from __future__ import annotations

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

pytest.importorskip("lightning")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = "lightning_train.py"
STEPS = ["--max-steps", "240", "--every-steps", "50", "--val-every", "1"]


def test_a_notice_mid_epoch_resumes_at_the_saved_step_bitwise(imds_sim, spotd_daemon, tmp_path):
    """Stopped by a notice mid-epoch (min_steps not met, validation every step), restored on a wiped disk, fit(ckpt_path="last") starts at the saved global step and the final weights equal an uninterrupted run's, bit for bit."""
    plain = example(SCRIPT, *STEPS, "--checkpoint-dir", str(tmp_path / "plain"), env=no_daemon(tmp_path))
    plain.finish()
    [reference] = plain.events("done")

    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    run = example(SCRIPT, *STEPS, "--min-steps", "240", "--step-sleep", "0.02", env=with_daemon(d1))
    interrupt_when_training(imds_sim, run, delay_s=1.5)
    run.finish()
    [stopped] = run.events("stopped")
    step = stopped["step"]
    assert 0 < step < 240, run.explain("stopped outside the run")
    # Validation runs after every step, except inside the window: none at the step it stopped at.
    assert step not in {e["step"] for e in run.events("validation")}, run.explain("validated in the window")
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    [handled] = d1.logs.events("interruption.handled")
    assert handled["lost"] == [], handled
    assert any(f'"step": {step},' in m for m in committed_manifests(tmp_path / "store"))
    new_instance(d1)

    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    resumed = example(SCRIPT, *STEPS, env=with_daemon(d2))
    resumed.finish()
    assert [e["step"] for e in resumed.events("started")] == [step], resumed.explain("did not resume there")
    [done] = resumed.events("done")
    assert done == reference, "the resumed run ended with other weights than the uninterrupted one"


def test_periodic_checkpoints_are_committed_and_older_files_go_once_a_newer_is_durable(
    imds_sim, spotd_daemon, tmp_path, s3_bucket, s3_proxy
):
    """Every save of the callback's own schedule (every 50 steps) is committed in the background while training goes on; the local directory keeps only the newest file once it is durable, also when the last uploads (held 2 s each at the proxy) are confirmed only after training ended."""
    for step in (100, 150):
        s3_proxy.add("delay", method="PUT", path_has=f"step={step:09d}.ckpt", delay_s=2.0)
    d = spotd_daemon(
        imds_sim.url,
        store_uri=s3_bucket.uri(),
        endpoint_url=s3_proxy.endpoint_url,
        checkpoint_dir=tmp_path / "disk",
    )
    run = example(
        SCRIPT, "--max-steps", "150", "--every-steps", "50", "--val-every", "50", env=with_daemon(d)
    )
    run.finish()
    durable = sorted(e["step"] for e in d.logs.events("checkpoint.durable"))
    assert durable == [50, 100, 150], durable  # the callback waited for the last one before it ended
    names = sorted(p.name for p in (tmp_path / "disk" / "lightning").iterdir())
    assert names == ["last-spotd-step=000000150.ckpt"], names
