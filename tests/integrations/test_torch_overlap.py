"""The Checkpointer announces an asked-for save before writing it (the `writing` frame, issue 13 item 1), to a
daemon that takes it; a periodic save, or a daemon that does not say so, gets none. Real torch, the real
client over a real Unix socket (MiniDaemon)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import spotd.client
from spotd import protocol
from spotd.torch import Checkpointer
from tests.integrations.test_torch_checkpointer import MiniDaemon, make_model, train_step
from tests.util import wait_until


def run(tmp_path: Path, short_tmp: Path, *, writing: bool) -> list[dict[str, object]]:
    """Five steps with a periodic save at step 2, then a final request at step 4; the frames spotd got."""
    daemon = MiniDaemon(short_tmp / "spotd.sock", tmp_path, welcome={"writing": True} if writing else {})
    guard = spotd.client.connect(name="train", socket_path=str(short_tmp / "spotd.sock"))
    try:
        model, opt, sched = make_model()
        ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, guard=guard, every_steps=3)
        for step in range(ckpt.restore(), 20):
            train_step(model, opt, sched)
            if step == 4:
                deadline = datetime.now(UTC) + timedelta(seconds=30)
                daemon.send(
                    protocol.checkpoint(request_id="r1", reason="spot", deadline=deadline, final=True)
                )
                wait_until(lambda: guard.checkpoint_requested, timeout_s=10, what="the request to arrive")
            if ckpt.step(step):
                break
        wait_until(lambda: sum(f["op"] == "saved" for f in daemon.received) == 2, what="both saves reported")
        return [f for f in daemon.received if f["op"] in ("writing", "saved")]
    finally:
        guard.close()
        daemon.close()


def test_an_asked_for_save_is_announced_with_its_temp_name_before_it_is_written(
    tmp_path: Path, short_tmp: Path
) -> None:
    """Only the requested save is announced: path as `saved` reports it, temp the hidden file in the same
    directory, the same step; the periodic save before it is not."""
    frames = run(tmp_path, short_tmp, writing=True)
    assert [f["op"] for f in frames] == ["saved", "writing", "saved"]
    announced, saved = frames[1], frames[2]
    assert announced["path"] == saved["path"] and announced["step"] == saved["step"]
    temp = Path(str(announced["temp"]))
    assert temp.parent == Path(str(saved["path"])).parent and temp.name.startswith(".")
    assert not (tmp_path / temp).exists()  # renamed into place


def test_no_announcement_to_a_daemon_that_does_not_take_it(tmp_path: Path, short_tmp: Path) -> None:
    """An older daemon (no "writing" in its welcome) never sees the new frame."""
    assert [f["op"] for f in run(tmp_path, short_tmp, writing=False)] == ["saved", "saved"]
