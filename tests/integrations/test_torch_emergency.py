"""A smaller emergency save, the user's choice (issue 13 item 4, training side): with emergency_exclude, a
request spotd says will not fit its deadline is saved without what the user named, says so, and restore()
brings back the weights with a fresh optimizer and a warning. Real torch, the real client over a real Unix
socket (MiniDaemon)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import spotd.client
from spotd import protocol
from spotd.torch import Checkpointer
from tests.integrations.test_torch_checkpointer import MiniDaemon, make_model, train_step
from tests.util import wait_until


def request(request_id: str, **upload: Any) -> dict[str, Any]:
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    return protocol.checkpoint(
        request_id=request_id, reason="spot-terminate", deadline=deadline, final=True, **upload
    )


def train_until_asked(
    tmp_path: Path, short_tmp: Path, frame: dict[str, Any], **kwargs: Any
) -> tuple[Any, Path]:
    """Train five steps under a real client, then spotd sends ``frame``; returns the model and the save."""
    daemon = MiniDaemon(short_tmp / "spotd.sock", tmp_path)
    guard = spotd.client.connect(name="train", socket_path=str(short_tmp / "spotd.sock"))
    try:
        model, opt, sched = make_model()
        ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, guard=guard, **kwargs)
        for step in range(ckpt.restore(), 20):
            train_step(model, opt, sched)
            if step == 4:
                daemon.send(frame)
                wait_until(lambda: guard.checkpoint_requested, timeout_s=10, what="the request to arrive")
            if ckpt.step(step):
                break
        assert step == 4
        saves = [f for f in daemon.received if f["op"] == "saved"]
        assert saves[-1]["request_id"] == frame["request_id"]
        return model, tmp_path / saves[-1]["path"]
    finally:
        guard.close()
        daemon.close()


def test_a_request_that_will_not_fit_is_saved_without_the_optimizer_and_restore_says_so(
    tmp_path: Path, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fits=false with emergency_exclude=('optimizer',): the save has the weights, no optimizer state, and is
    marked; the save is logged as smaller; restore() loads the weights, leaves the optimizer fresh, warns,
    and training goes on from the saved step."""
    with caplog.at_level(logging.WARNING, logger="spotd.torch"):
        model, path = train_until_asked(
            tmp_path,
            short_tmp,
            request("spot-1", estimate_seconds=200.0, fits=False),
            emergency_exclude=("optimizer",),
        )
    assert "leaves out optimizer (emergency_exclude)" in caplog.text and "200.0s" in caplog.text
    payload = torch.load(path, weights_only=True)
    assert "optimizer" not in payload and payload["excluded"] == ["optimizer"]
    assert "scheduler" in payload and "model" in payload

    caplog.clear()
    model2, opt2, sched2 = make_model(seed=1)
    ckpt2 = Checkpointer(model=model2, optimizer=opt2, scheduler=sched2, checkpoint_dir=tmp_path, guard=None)
    with caplog.at_level(logging.WARNING, logger="spotd.torch"):
        assert ckpt2.restore() == 5
    assert "emergency checkpoint saved without optimizer" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[key]), key
    assert opt2.state_dict()["state"] == {}  # fresh: no Adam moments
    train_step(model2, opt2, sched2)
    assert opt2.state_dict()["state"]  # and it trains on
    assert sched2.state_dict()["last_epoch"] == 6  # the scheduler was kept: five steps, then one more


def test_a_request_that_fits_is_saved_whole(tmp_path: Path, short_tmp: Path) -> None:
    """fits=true (or no estimate at all): emergency_exclude changes nothing, the save is whole."""
    _, path = train_until_asked(
        tmp_path,
        short_tmp,
        request("spot-2", estimate_seconds=3.0, fits=True),
        emergency_exclude=("optimizer",),
    )
    payload = torch.load(path, weights_only=True)
    assert "optimizer" in payload and "excluded" not in payload


def test_without_emergency_exclude_a_request_that_will_not_fit_is_saved_whole_with_a_warning(
    tmp_path: Path, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Never silent, never the library's choice: without emergency_exclude the save is whole, and the log says
    it may not fit and how to save less."""
    with caplog.at_level(logging.WARNING, logger="spotd.torch"):
        _, path = train_until_asked(
            tmp_path, short_tmp, request("spot-3", estimate_seconds=200.0, fits=False)
        )
    assert "saving it whole" in caplog.text and "emergency_exclude=('optimizer',)" in caplog.text
    assert "optimizer" in torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"emergency_exclude": ("model",)}, "may not name 'model'"),
        ({"emergency_exclude": ("ema",)}, r"does not save; fix: use some of \['optimizer', 'scheduler'\]"),
        ({"emergency_exclude": "optimizer"}, "a sequence of names"),
        ({"emergency_exclude": ("optimizer",), "sharded": True}, "sharded=True"),
    ],
)
def test_emergency_exclude_names_only_what_is_saved(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    """A name the Checkpointer does not save, the model, a bare string or a sharded checkpoint: ValueError with the fix."""
    model, opt, sched = make_model()
    with pytest.raises(ValueError, match=match):
        Checkpointer(
            model=model, optimizer=opt, scheduler=sched, checkpoint_dir=tmp_path, guard=None, **kwargs
        )
