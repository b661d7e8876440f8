"""Every rank, one stop step: real torchrun (gloo, DDP) workers at different paces, a real daemon, a spot
notice at a random moment; no rank leaves alone, none hangs, nothing is lost, and the resumed run ends
bitwise where an uninterrupted one does."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.daemon import Lines, subprocess_env
from tests.util import wait_until

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "tests" / "e2e" / "ddp_trainer.py"
STEPS = 150

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def torchrun(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], Lines, Lines]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
            *(str(TRAINER), "--steps", str(STEPS), *args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env({"OMP_NUM_THREADS": "1", **env}),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def finish(proc: subprocess.Popen[str], out: Lines, err: Lines, *, timeout_s: float) -> None:
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError("torchrun hung:\n" + "\n".join(out.lines + err.lines[-80:])) from None
    out.join()
    err.join()
    assert code == 0, "\n".join(
        out.lines + [line for line in err.lines if line.startswith("[rank")][-40:] + err.lines[-20:]
    )


def interrupt(imds_sim, d, *, barrier: bool) -> int:
    """Run 2 ranks against daemon ``d``, arm a terminate notice at a random moment; returns the stop step."""
    proc, out, err = torchrun({"SPOTD_SOCKET": d.socket}, *(["--barrier"] if barrier else []))
    wait_until(
        lambda: len(out.events("started")) == 2 or proc.poll() is not None, timeout_s=90, what="2 ranks"
    )
    time.sleep(random.uniform(0.3, 2.0))  # the notice lands at a random step, not at a fixed one
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    armed = time.monotonic()
    finish(proc, out, err, timeout_s=60)
    stopped = out.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1], "\n".join(out.lines)
    assert len({e["step"] for e in stopped}) == 1, f"ranks stopped at different steps: {stopped}"
    assert time.monotonic() - armed < 30, "the job took too long to stop after the notice"
    return int(stopped[0]["step"])


@pytest.mark.parametrize("barrier", [False, True], ids=["plain-loop", "barrier-after-loop"])
def test_a_notice_stops_every_rank_at_the_same_step(imds_sim, spotd_daemon, tmp_path, barrier):
    """A notice at a random step stops both ranks, one slower by 30 ms a step, at one step, twice in a row; with or without dist.barrier() after the loop nobody hangs, and both ranks' saves of that step are committed."""
    for attempt in range(2):
        imds_sim.clear()
        d = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / f"disk{attempt}")
        step = interrupt(imds_sim, d, barrier=barrier)
        wait_until(
            lambda d=d: d.logs.events("interruption.handled"), timeout_s=30, what="interruption handled"
        )
        committed = {
            (p.parent.name.rsplit("-r", 2)[-1][:1], p.read_text().count(f'"step": {step},'))
            for p in (tmp_path / "store").glob("test-job/checkpoints/*/MANIFEST.json")
            if f'"step": {step},' in p.read_text()
        }
        assert {rank for rank, _ in committed} == {"0", "1"}, f"step {step} not committed for both ranks"
        d.stop()


def test_resumed_ranks_end_bitwise_where_an_uninterrupted_run_does(imds_sim, spotd_daemon, tmp_path):
    """Interrupted at a random step, restored on a wiped disk by a fresh daemon, both ranks resume at the stop step and finish with the weights of a run never interrupted, bit for bit."""
    plain = tmp_path / "plain"
    proc, out, err = torchrun(
        {"SPOTD_SOCKET": str(tmp_path / "none.sock"), "SPOTD_CHECKPOINT_DIR": str(plain)}
    )
    finish(proc, out, err, timeout_s=120)
    digests = {e["digest"] for e in out.events("done")}
    assert len(digests) == 1 and len(out.events("done")) == 2

    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    stop_step = interrupt(imds_sim, d1, barrier=False)
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    d1.stop()
    shutil.rmtree(tmp_path / "first")

    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    proc, out, err = torchrun({"SPOTD_SOCKET": d2.socket})
    finish(proc, out, err, timeout_s=120)
    assert [e["step"] for e in out.events("started")] == [stop_step, stop_step]
    assert {e["digest"] for e in out.events("done")} == digests
