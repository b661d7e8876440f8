"""spotd.torch.Checkpointer: atomic saves, restore with fallback, retention, answering spotd's requests."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from spotd import protocol
from spotd.events import format_time
from spotd.torch import Checkpointer, CheckpointError
from tests.util import wait_until


@dataclass
class FakeRequest:
    request_id: str
    reason: str = "spot"
    final: bool = False
    seconds: float = 30.0
    deadline: datetime = field(default_factory=lambda: datetime.now(UTC) + timedelta(seconds=30))

    def seconds_left(self) -> float:
        return self.seconds


class FakeGuard:
    """Stands in for spotd.client's guard: our own object, recording what the Checkpointer tells it."""

    def __init__(
        self, *, checkpoint_dir: str | None = None, connected: bool = True, durable: bool = True
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.connected = connected
        self.durable = durable
        self.request: FakeRequest | None = None
        self.saves: list[tuple[str, int | None]] = []
        self.waits: list[float | None] = []
        self.closed = False

    @property
    def checkpoint_requested(self) -> bool:
        return self.request is not None

    def saved(self, path: str, step: int | None = None) -> None:
        self.saves.append((path, step))

    def wait_durable(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.durable

    def close(self) -> None:
        self.closed = True


def make_model(
    seed: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
) -> None:
    loss = model(torch.randn(3, 4)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_restore_without_checkpoints_starts_at_zero(tmp_path: Path) -> None:
    """restore() returns 0 and creates the directory when there is nothing to resume from."""
    model, opt, sched = make_model()
    ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, checkpoint_dir=tmp_path, guard=None)
    assert ckpt.restore() == 0
    assert ckpt.directory == tmp_path / "train" and ckpt.directory.is_dir()


def test_periodic_saves_keep_the_newest_and_restore_the_state(tmp_path: Path) -> None:
    """Every N steps a file named by steps done is written, `keep` are kept, and restore brings all back."""
    model, opt, sched = make_model()
    ckpt = Checkpointer(
        model=model,
        optimizer=opt,
        scheduler=sched,
        every_steps=3,
        keep=2,
        checkpoint_dir=tmp_path,
        guard=None,
    )
    start = ckpt.restore()
    for step in range(start, 10):
        train_step(model, opt, sched)
        assert ckpt.step(step) is False
    assert files(ckpt.directory) == ["step-000000006.pt", "step-000000009.pt"]

    # A new process restores step 9 and replays step 9 from the saved RNG: it must land on the same weights.
    model2, opt2, sched2 = make_model(seed=1)
    ckpt2 = Checkpointer(model=model2, optimizer=opt2, scheduler=sched2, checkpoint_dir=tmp_path, guard=None)
    assert ckpt2.restore() == 9
    train_step(model2, opt2, sched2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[key]), key
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_every_seconds_saves_when_the_interval_has_passed(tmp_path: Path) -> None:
    """With every_seconds, a step saves once the interval since the last save is over, not before."""
    model, opt, _ = make_model()
    ckpt = Checkpointer(model=model, optimizer=opt, every_seconds=3600, checkpoint_dir=tmp_path, guard=None)
    ckpt.restore()
    assert ckpt.step(0) is False
    assert files(ckpt.directory) == []
    fast = Checkpointer(model=model, optimizer=opt, every_seconds=1e-9, checkpoint_dir=tmp_path, guard=None)
    fast.step(0)
    assert files(fast.directory) == ["step-000000001.pt"]


def test_rng_states_are_restored(tmp_path: Path) -> None:
    """Python, numpy and torch random streams continue after restore exactly where they were saved."""
    model, opt, _ = make_model()
    ckpt = Checkpointer(model=model, optimizer=opt, checkpoint_dir=tmp_path, guard=None)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.save(5)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert Checkpointer(model=model, optimizer=opt, checkpoint_dir=tmp_path, guard=None).restore() == 5
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_truncated_newest_checkpoint_falls_back_to_an_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A partial newest file is skipped with a warning, the previous one restored, stale temps removed."""
    model, opt, sched = make_model()
    ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, checkpoint_dir=tmp_path, guard=None)
    ckpt.save(3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched)
    info = ckpt.save(6)
    data = info.path.read_bytes()
    info.path.write_bytes(data[: len(data) // 2])
    stale = ckpt.directory / ".step-000000009.pt.tmp-999999"
    stale.write_bytes(data)

    fresh, fresh_opt, _ = make_model(seed=5)
    with caplog.at_level(logging.WARNING, logger="spotd.torch"):
        step = Checkpointer(model=fresh, optimizer=fresh_opt, checkpoint_dir=tmp_path, guard=None).restore()
    assert step == 3
    assert "step-000000006.pt" in caplog.text and "older" in caplog.text
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
    assert not stale.exists()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    """If every file is unreadable, restore raises an error naming the fix, never silently starts over."""
    model, opt, _ = make_model()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "step-000000004.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="move the directory away"):
        Checkpointer(model=model, optimizer=opt, checkpoint_dir=tmp_path, guard=None).restore()


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    """Restoring into a model of a different shape says which file and how to fix it."""
    model, opt, _ = make_model()
    Checkpointer(model=model, optimizer=opt, checkpoint_dir=tmp_path, guard=None).save(2)
    other = nn.Linear(5, 2)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        Checkpointer(model=other, checkpoint_dir=tmp_path, guard=None).restore()


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    """Impossible settings are refused at construction with a message saying what to use."""
    model, _, _ = make_model()
    with pytest.raises(ValueError, match="keep at least 1"):
        Checkpointer(model=model, keep=0, checkpoint_dir=tmp_path, guard=None)
    with pytest.raises(ValueError, match=">= 1"):
        Checkpointer(model=model, every_steps=0, checkpoint_dir=tmp_path, guard=None)
    with pytest.raises(ValueError, match="directory name"):
        Checkpointer(model=model, name="../x", checkpoint_dir=tmp_path, guard=None)


def test_checkpoint_dir_comes_from_argument_then_daemon_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The argument wins, then the daemon's welcome, then $SPOTD_CHECKPOINT_DIR, then /opt/ml/checkpoints."""
    model, _, _ = make_model()
    monkeypatch.setenv("SPOTD_CHECKPOINT_DIR", str(tmp_path / "env"))
    guard = FakeGuard(checkpoint_dir=str(tmp_path / "daemon"))
    assert (
        Checkpointer(model=model, checkpoint_dir=tmp_path / "arg", guard=guard).directory
        == tmp_path / "arg/train"
    )
    assert Checkpointer(model=model, guard=guard).directory == tmp_path / "daemon/train"
    assert Checkpointer(model=model, guard=None).directory == tmp_path / "env/train"
    monkeypatch.delenv("SPOTD_CHECKPOINT_DIR")
    assert Checkpointer(model=model, guard=None).directory == Path("/opt/ml/checkpoints/train")


def test_request_saves_at_the_next_step_and_reports_it(tmp_path: Path) -> None:
    """A non-final request saves once at the next step boundary, reports the relative path, trains on."""
    model, opt, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path))
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=100, guard=guard)
    ckpt.restore()
    assert ckpt.step(0) is False and guard.saves == []
    guard.request = FakeRequest("r1")
    assert ckpt.step(1) is False
    assert guard.saves == [("train/step-000000002.pt", 2)]
    assert ckpt.step(2) is False  # the client still shows r1: answered once only
    assert len(guard.saves) == 1 and all(timeout == 0 for timeout in guard.waits)  # polled, never blocked


def test_final_request_waits_until_durable_and_stops(tmp_path: Path) -> None:
    """A final request saves, waits for durability up to the deadline, and tells the loop to stop."""
    model, opt, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path))
    ckpt = Checkpointer(model=model, optimizer=opt, guard=guard)
    ckpt.restore()
    guard.request = FakeRequest("r2", final=True, seconds=12.5)
    assert ckpt.step(6) is True
    assert guard.saves == [("train/step-000000007.pt", 7)]
    assert guard.waits[-1] == 12.5


def test_final_request_after_a_periodic_save_at_the_same_step_reports_without_rewriting(
    tmp_path: Path,
) -> None:
    """A request for a step already saved is answered by reporting that file again, not rewriting it."""
    model, opt, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path))
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, guard=guard)
    ckpt.restore()
    ckpt.step(0)
    mtime = (ckpt.directory / "step-000000001.pt").stat().st_mtime_ns
    ckpt.save(1)
    assert (ckpt.directory / "step-000000001.pt").stat().st_mtime_ns == mtime
    assert guard.saves == [("train/step-000000001.pt", 1)] * 2


def test_retention_never_deletes_a_checkpoint_before_a_newer_one_is_durable(tmp_path: Path) -> None:
    """With a daemon, old files stay until a newer save is confirmed durable; then `keep` applies."""
    model, opt, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path), durable=False)
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1, keep=1, guard=guard)
    ckpt.restore()
    for step in range(3):
        ckpt.step(step)
    assert files(ckpt.directory) == [f"step-00000000{n}.pt" for n in (1, 2, 3)]
    guard.durable = True
    ckpt.step(3)
    assert files(ckpt.directory) == ["step-000000004.pt"]


def test_checkpointer_without_a_daemon_warns_once_and_checkpoints(
    tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no daemon listening, the default guard warns once and periodic checkpointing works to the end."""
    client = pytest.importorskip("spotd.client")
    monkeypatch.setenv("SPOTD_SOCKET", str(short_tmp / "absent.sock"))
    model, opt, sched = make_model()
    with pytest.warns(client.SpotdUnavailableWarning) as record:
        ckpt = Checkpointer(model=model, optimizer=opt, every_steps=2, checkpoint_dir=tmp_path)
        with ckpt:
            for step in range(ckpt.restore(), 6):
                train_step(model, opt, sched)
                assert ckpt.step(step) is False
            assert ckpt.wait_durable(timeout=1.0) is True
    assert len(record) == 1
    assert files(ckpt.directory) == ["step-000000004.pt", "step-000000006.pt"]


KILLED_SAVE = textwrap.dedent(
    """
    import io, pathlib, sys, torch
    from torch import nn
    from spotd.torch import Checkpointer

    directory, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    model = nn.Linear(1024, 1024)  # 4 MiB of weights: a save takes more than one write
    ckpt = Checkpointer(model=model, checkpoint_dir=directory, guard=None)
    ckpt.save(1)
    real_save = torch.save

    def half_then_hang(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        marker.touch()
        sys.stdin.read()  # parked mid-write until SIGKILL

    torch.save = half_then_hang
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save(2)
    """
)


def test_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """SIGKILL during a save leaves only a hidden temp file; restore uses the previous one and cleans up."""
    marker = tmp_path / "half-written"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path), str(marker)],
        stdin=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        wait_until(marker.exists, timeout_s=60, what="the child to be half-way through its save")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdin is not None
        proc.stdin.close()
    names = files(tmp_path / "train")
    assert "step-000000002.pt" not in names
    assert any(n.startswith(".step-000000002.pt.tmp-") for n in names)

    model = nn.Linear(1024, 1024)
    ckpt = Checkpointer(model=model, checkpoint_dir=tmp_path, guard=None)
    assert ckpt.restore() == 1
    assert files(tmp_path / "train") == ["step-000000001.pt"]


class MiniDaemon:
    """A real Unix socket speaking just enough of the protocol: welcome, send requests, ack saves as durable."""

    def __init__(self, path: Path, checkpoint_dir: Path, welcome: dict[str, Any] | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._welcome_extra = welcome or {}
        self.received: list[dict[str, Any]] = []
        self._conn: socket.socket | None = None
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        self._conn = conn
        with conn.makefile("rb") as reader:
            hello = protocol.decode(reader.readline())
            self.received.append(hello)
            conn.sendall(
                protocol.encode(
                    {
                        "op": "welcome",
                        "v": 1,
                        "checkpoint_dir": str(self.checkpoint_dir),
                        **self._welcome_extra,
                    }
                )
            )
            for line in reader:
                frame = protocol.decode(line)
                self.received.append(frame)
                if frame["op"] == "saved":
                    ack = {"op": "durable", "path": frame["path"], "request_id": frame["request_id"]}
                    conn.sendall(protocol.encode(ack))

    def send(self, frame: dict[str, Any]) -> None:
        assert self._conn is not None
        self._conn.sendall(protocol.encode(frame))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=10)
        if self._conn is not None:
            self._conn.close()


def test_real_client_final_request_is_saved_reported_and_durable(tmp_path: Path, short_tmp: Path) -> None:
    """Through the real client, a final request is saved under the welcome's dir, reported with its id, and stops."""
    import spotd.client

    daemon = MiniDaemon(short_tmp / "spotd.sock", tmp_path)
    guard = spotd.client.connect(name="train", socket_path=str(short_tmp / "spotd.sock"))
    try:
        model, opt, sched = make_model()
        ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=2, guard=guard)
        assert ckpt.directory == tmp_path / "train"
        stopped_at = None
        for step in range(ckpt.restore(), 20):
            train_step(model, opt, sched)
            if step == 4:
                deadline = format_time(datetime.now(UTC) + timedelta(seconds=30))
                daemon.send(
                    {
                        "op": "checkpoint",
                        "request_id": "spot-9",
                        "reason": "spot",
                        "deadline": deadline,
                        "final": True,
                    }
                )
                wait_until(lambda: guard.checkpoint_requested, timeout_s=10, what="the request to arrive")
            if ckpt.step(step):
                stopped_at = step
                break
        assert stopped_at == 4
        saves = [f for f in daemon.received if f["op"] == "saved"]
        assert saves[-1] == {
            "op": "saved",
            "request_id": "spot-9",
            "path": "train/step-000000005.pt",
            "step": 5,
        }
        assert [f["request_id"] for f in saves] == [None, None, "spot-9"]
        assert files(ckpt.directory) == ["step-000000004.pt", "step-000000005.pt"]
    finally:
        guard.close()
        daemon.close()


class Clock:
    """Extra state that is not plain tensors and containers: a datetime."""

    def __init__(self) -> None:
        self.when = datetime(2024, 1, 1, tzinfo=UTC)

    def state_dict(self) -> dict[str, Any]:
        return {"when": self.when}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.when = state["when"]


def test_extra_state_that_weights_only_refuses_is_a_clear_error(tmp_path: Path) -> None:
    """Extra state of arbitrary classes is refused on restore with the fix named, and loads with weights_only=False."""
    model, _, _ = make_model()
    Checkpointer(model=model, state={"clock": Clock()}, checkpoint_dir=tmp_path, guard=None).save(3)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        Checkpointer(model=model, state={"clock": Clock()}, checkpoint_dir=tmp_path, guard=None).restore()
    clock = Clock()
    clock.when = datetime(2000, 1, 1, tzinfo=UTC)
    trusted = Checkpointer(
        model=model, state={"clock": clock}, checkpoint_dir=tmp_path, guard=None, weights_only=False
    )
    assert trusted.restore() == 3
    assert clock.when == datetime(2024, 1, 1, tzinfo=UTC)


def test_failed_emergency_save_is_reported_to_spotd(tmp_path: Path) -> None:
    """When the requested save cannot be written, spotd hears `failed` and the error names the fix."""
    model, _, _ = make_model()
    guard = FakeGuard(checkpoint_dir=str(tmp_path))
    failures: list[str] = []
    guard.failed = failures.append  # type: ignore[attr-defined]
    ckpt = Checkpointer(model=model, guard=guard)
    ckpt.restore()
    (ckpt.directory / "step-000000001.pt").mkdir()  # the rename onto it fails, even for root
    guard.request = FakeRequest("r3", final=True)
    with pytest.raises(CheckpointError, match="fix:"):
        ckpt.step(0)
    assert not any(p.name.startswith(".step-") for p in ckpt.directory.iterdir()), "temp file left behind"
    assert len(failures) == 1 and "step-000000001.pt" in failures[0]
