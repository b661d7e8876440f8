"""A full disk never kills training: a failed periodic save is reported and training goes on; a requested
one is reported at once; nothing half-written is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from spotd.torch import Checkpointer, CheckpointError
from tests.fixtures.disk import fill
from tests.integrations.test_torch_checkpointer import FakeGuard, FakeRequest


class ReportingGuard(FakeGuard):
    """FakeGuard that also records the failures the Checkpointer reports."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.failures: list[tuple[str, bool]] = []

    def failed(self, message: str, *, periodic: bool = False) -> None:
        self.failures.append((message, periodic))
        if not periodic:
            self.request = None


def big_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(256, 1024)  # 1 MiB of weights, 3 MiB with Adam's two moments
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 256)).sum().backward()
    opt.step()
    return model, opt


def test_periodic_save_on_a_full_disk_is_reported_and_training_goes_on(small_disk) -> None:
    """torch.save's RuntimeError on a full disk becomes a 'disk full' report; step() returns False, no temp file stays, and the next save after space is freed works."""
    disk = small_disk(16)
    model, opt = big_model()
    guard = ReportingGuard(checkpoint_dir=str(disk), durable=True)
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, checkpoint_dir=disk, guard=guard)
    ckpt.restore()
    filler = fill(disk, leave_bytes=512 * 1024)
    assert ckpt.step(0) is False
    ((message, periodic),) = guard.failures
    assert periodic is True
    assert "disk full" in message and "fix: free space" in message
    assert sorted(p.name for p in ckpt.directory.iterdir()) == []
    filler.unlink()
    assert ckpt.step(1) is False
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["step-000000002.pt"]


def test_requested_save_on_a_full_disk_is_reported_at_once(small_disk) -> None:
    """A drill's save that hits a full disk is reported against that request and training goes on; a final one is reported and raises."""
    disk = small_disk(16)
    model, opt = big_model()
    guard = ReportingGuard(checkpoint_dir=str(disk))
    ckpt = Checkpointer(model=model, optimizer=opt, checkpoint_dir=disk, guard=guard)
    ckpt.restore()
    fill(disk, leave_bytes=512 * 1024)
    guard.request = FakeRequest("drill-1", final=False)
    assert ckpt.step(0) is False
    assert [p for _, p in guard.failures] == [False]
    guard.request = FakeRequest("spot-1", final=True)
    with pytest.raises(CheckpointError, match="disk full"):
        ckpt.step(1)
    assert [p for _, p in guard.failures] == [False, False]
    assert not any(p.name.startswith(".step-") for p in Path(ckpt.directory).iterdir())
