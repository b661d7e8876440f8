"""`ckpt.finish()`: the final checkpoint made durable, then the job marked Completed by a real `spotd run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spotd.client
from spotd.torch import Checkpointer
from tests.util import wait_until


def test_finish_saves_the_final_checkpoint_and_completes_the_job(
    imds_sim: Any, spotd_daemon: Any, tmp_path: Path
) -> None:
    """finish() after the last step: the final checkpoint is committed, END.json says Completed at that step,
    and the daemon answers the trainer with the checkpoint's name."""
    d = spotd_daemon(imds_sim.url)
    guard = spotd.client.connect(name="train", socket_path=d.socket)
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ckpt = Checkpointer(model=model, optimizer=opt, every_steps=5, guard=guard)
        for step in range(ckpt.restore(), 12):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            assert not ckpt.step(step)
        assert ckpt.finish() is True
    finally:
        guard.close()
    end = json.loads((tmp_path / "store" / "test-job" / "ledger" / "END.json").read_text())
    assert end["status"] == "Completed" and end["reason"] == "finished" and end["step"] == 12
    manifest = json.loads(
        (tmp_path / "store" / "test-job" / "checkpoints" / end["checkpoint"] / "MANIFEST.json").read_text()
    )
    assert manifest["step"] == 12 and manifest["files"][0]["path"] == "train/step-000000012.pt"
    status = json.loads(d.cli("status", "--json").stdout)
    assert status["phase"] == "Completed"
    again = d.cli("complete", "--no-checkpoint", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["checkpoint"] == end["checkpoint"], "ended once"
    assert d.stop() == 0


def test_finished_refuses_a_step_whose_checkpoint_is_not_durable(imds_sim: Any, spotd_daemon: Any) -> None:
    """guard.finished(step) with no durable checkpoint of that step: ok False, the job trains on."""
    d = spotd_daemon(imds_sim.url)
    guard = spotd.client.connect(name="train", socket_path=d.socket)
    try:
        answer = guard.finished(40, timeout=30)
    finally:
        guard.close()
    assert answer is not None and answer["ok"] is False and "step None, not 40" in answer["message"]
    assert json.loads(d.cli("status", "--json").stdout)["phase"] == "Training"
    assert d.stop() == 0


def test_spotd_complete_asks_the_trainers_for_a_final_checkpoint(
    imds_sim: Any, spotd_daemon: Any, trainer_procs: Any, tmp_path: Path
) -> None:
    """`spotd complete`, for a script that never says finished: every trainer is asked for a final
    checkpoint (and stops), then the job is Completed with it."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "train")
    wait_until(lambda: t.events("connected"), timeout_s=20, what="trainer connected")
    done = d.cli("complete", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == "Completed" and answer["reason"] == "complete"
    assert t.proc.wait(30) == 0
    (req,) = t.events("requested")
    assert req["final"] is True and req["reason"] == "complete"
    assert answer["step"] == req["step"]
    assert d.stop() == 0
