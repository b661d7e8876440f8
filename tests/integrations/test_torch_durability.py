"""spotd.torch retention: a save counts as durable at once only when no daemon is configured at all."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import spotd.client
from spotd.torch import Checkpointer
from tests.integrations.test_torch_checkpointer import FakeGuard, MiniDaemon, files, make_model
from tests.util import wait_until


def test_saves_while_the_daemon_is_away_are_not_durable(tmp_path: Path) -> None:
    """After a daemon was seen, saves made while it is disconnected are kept until it confirms one."""
    model, opt, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path), connected=True, durable=False)
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, keep=1, guard=guard)
    ckpt.restore()
    ckpt.step(0)
    guard.connected = False  # the daemon went away before uploading anything
    ckpt.step(1)
    ckpt.step(2)
    assert files(ckpt.directory) == [f"step-00000000{n}.pt" for n in (1, 2, 3)]
    assert ckpt.wait_durable(timeout=0.2) is False
    guard.connected = True
    guard.durable = True
    assert ckpt.wait_durable(timeout=1.0) is True
    assert files(ckpt.directory) == ["step-000000003.pt"]


def test_an_existing_socket_means_a_daemon_even_before_it_answers(
    tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a socket file present but no daemon answering yet, no save counts as durable and none is deleted."""
    path = short_tmp / "spotd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; connecting is refused, as while spotd restarts
    monkeypatch.setenv("SPOTD_SOCKET", str(path))
    model, opt, _ = make_model()
    with pytest.warns(spotd.client.SpotdUnavailableWarning):
        ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, keep=1, checkpoint_dir=tmp_path)
    with ckpt:
        ckpt.restore()
        for step in range(3):
            assert ckpt.step(step) is False
        assert files(ckpt.directory) == [f"step-00000000{n}.pt" for n in (1, 2, 3)]
        assert ckpt.wait_durable(timeout=0.1) is False


def test_no_daemon_configured_keeps_plain_retention(tmp_path: Path) -> None:
    """With guard=None, every save is durable at once and only `keep` files stay."""
    model, opt, _ = make_model()
    ckpt = Checkpointer(
        model=model, optimizer=opt, every_steps=1, keep=1, checkpoint_dir=tmp_path, guard=None
    )
    ckpt.restore()
    for step in range(3):
        ckpt.step(step)
    assert files(ckpt.directory) == ["step-000000003.pt"]
    assert ckpt.wait_durable(timeout=0) is True


def test_daemon_restart_confirms_the_save_made_while_it_was_down(tmp_path: Path, short_tmp: Path) -> None:
    """Through the real client: saves during a daemon restart stay on disk until the new daemon confirms them."""
    path = short_tmp / "spotd.sock"
    first: MiniDaemon | None = MiniDaemon(path, tmp_path)
    guard = spotd.client.connect(name="train", socket_path=str(path), reconnect_interval_s=0.05)
    second: MiniDaemon | None = None
    try:
        model, opt, _ = make_model()
        ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, keep=1, guard=guard)
        ckpt.restore()
        ckpt.step(0)
        assert ckpt.wait_durable(timeout=10) is True
        assert first is not None
        first.close()
        first = None
        wait_until(lambda: not guard.connected, timeout_s=10, what="the client to notice the daemon left")
        ckpt.step(1)
        ckpt.step(2)
        # Step 1 is in the store and may go; steps 2 and 3 were never uploaded and must stay.
        assert files(ckpt.directory) == ["step-000000002.pt", "step-000000003.pt"]
        path.unlink()
        second = MiniDaemon(path, tmp_path)
        assert ckpt.wait_durable(timeout=10) is True
        resent = [f for f in second.received if f["op"] == "saved"]
        assert resent[-1]["path"] == "train/step-000000003.pt"
        assert files(ckpt.directory) == ["step-000000003.pt"]
    finally:
        guard.close()
        if first is not None:
            first.close()
        if second is not None:
            second.close()
