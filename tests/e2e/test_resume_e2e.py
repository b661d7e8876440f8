"""examples/train.py under real daemons: a notice, a new instance restored from S3 with zero lost steps; a daemon restart."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.daemon import Lines, subprocess_env
from tests.util import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train.py"


@dataclass
class Example:
    proc: subprocess.Popen[str]
    out: Lines
    err: Lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.out.events(name)

    def wait(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout_s)
        self.out.join()
        self.err.join()
        return code

    def log(self) -> str:
        return "\n".join(self.out.lines + self.err.lines)


@pytest.fixture
def example() -> Iterator[Any]:
    """Factory: start examples/train.py as a real subprocess (talking to $SPOTD_SOCKET when given)."""
    started: list[Example] = []

    def start(*argv: str, socket: str | None = None) -> Example:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env({"SPOTD_SOCKET": socket} if socket else {}),
        )
        ex = Example(proc, Lines(proc.stdout), Lines(proc.stderr))
        started.append(ex)
        return ex

    yield start
    for ex in started:
        if ex.proc.poll() is None:
            ex.proc.kill()
        ex.wait(10)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursively equal: tensors by torch.equal (bitwise, same dtype), everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def listed(d: Any) -> list[dict[str, Any]]:
    out = d.cli("list", "--json")
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


STEPS = 200
STEP_SLEEP = 0.02


def test_interrupted_run_restored_from_s3_ends_bitwise_like_an_uninterrupted_one(
    imds_sim, spotd_daemon, s3_bucket, example, tmp_path
):
    """A notice at a random step, a wiped disk and a new daemon restoring from S3 resume at the stopped step and end bitwise equal to an uninterrupted run."""
    common = ("--steps", str(STEPS), "--every-steps", "50", "--seed", "3")
    # The reference runs alongside: it needs no daemon and its result is only compared at the end.
    ref = example(
        *common, "--no-daemon", "--checkpoint-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.pt")
    )
    store = {"store_uri": s3_bucket.uri("p"), "endpoint_url": s3_bucket.endpoint_url}

    # -- instance 1: interrupted at a random step -------------------------------------------------
    disk1 = tmp_path / "instance-1"
    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=disk1, **store)
    t1 = example(
        *common, "--step-sleep", str(STEP_SLEEP), "--out", str(tmp_path / "unused.pt"), socket=d1.socket
    )
    wait_until(
        lambda: t1.events("started") or t1.proc.poll() is not None, timeout_s=30, what="training start"
    )
    assert t1.events("started"), t1.log()
    assert t1.events("started")[0]["dir"] == str(disk1 / "train"), "the checkpoint dir comes from the daemon"
    # The simulator, not the test, waits: the notice appears a random time into training.
    after_s = random.uniform(0.15, 0.6) * STEPS * STEP_SLEEP
    imds_sim.arm_instance_action("terminate", after_s=after_s, lead_s=120)
    assert t1.wait(60) == 0, t1.log()
    (stopped,) = t1.events("stopped")
    stop_step = stopped["step"]
    assert 0 < stop_step < STEPS, f"notice after {after_s:.2f}s: {t1.log()}"
    final = [e for e in t1.events("saved") if e["reason"] == "final"]
    assert [e["step"] for e in final] == [stop_step], t1.log()
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    (handled,) = d1.logs.events("interruption.handled")
    assert handled["lost"] == [] and handled["trainers"] == 1
    assert listed(d1)[0]["step"] == stop_step, "the newest committed checkpoint is the emergency one"
    assert any(k.endswith("/LATEST") for k in s3_bucket.keys("p/")), s3_bucket.keys()
    assert d1.stop() == 0
    shutil.rmtree(disk1)  # the instance is gone, and its disk with it

    # -- instance 2: empty disk, restore on boot, resume -------------------------------------------
    disk2 = tmp_path / "instance-2"
    imds_sim.clear()  # the replacement instance has no notice
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=disk2, **store)
    (restored,) = d2.logs.events("restore.done")
    assert restored["step"] == stop_step
    t2 = example(*common, "--step-sleep", "0", "--out", str(tmp_path / "resumed.pt"), socket=d2.socket)
    assert t2.wait(60) == 0, t2.log()
    (started,) = t2.events("started")
    assert started["step"] == stop_step, "zero lost steps: resume where the interrupted run stopped"
    (finished,) = t2.events("finished")
    assert finished["step"] == STEPS and finished["durable"] is True
    assert ref.wait(60) == 0, ref.log()

    reference = torch.load(tmp_path / "ref.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert reference["step"] == resumed["step"] == STEPS
    assert_same(reference["model"], resumed["model"], "model")
    assert_same(reference["optimizer"], resumed["optimizer"], "optimizer")


def test_checkpointer_survives_a_daemon_restart_and_later_saves_become_durable(
    imds_sim, spotd_daemon, example
):
    """The daemon killed and restarted mid-training: training goes on, reconnects, and the saves after the restart are committed."""
    d1 = spotd_daemon(imds_sim.url)
    t = example("--steps", "300", "--every-steps", "20", "--step-sleep", str(STEP_SLEEP), socket=d1.socket)
    # checkpoint.durable is logged after the commit and the on-disk marker: a kill after it loses neither.
    durable = wait_until(
        lambda: d1.logs.events("checkpoint.durable"), timeout_s=30, what="a first durable save"
    )
    before = durable[-1]["step"]
    d1.stop(signal.SIGKILL)  # a crash: no last-chance checkpoint, the socket file left behind
    assert t.proc.poll() is None, "training does not stop when the daemon dies"

    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=d1.checkpoint_dir, socket_path=d1.socket)
    assert d2.logs.events("restore.up_to_date"), "the live trainer's directory is not restored over"
    wait_until(
        lambda: [e for e in d2.logs.events("checkpoint.durable") if e["step"] > before],
        timeout_s=30,
        what="a save committed after the restart",
    )
    assert t.wait(60) == 0, t.log()
    (finished,) = t.events("finished")
    assert finished["step"] == 300 and finished["durable"] is True
    assert not t.events("stopped")
    assert max(m["step"] for m in listed(d2)) == 300, "the last save reached the store through the new daemon"
