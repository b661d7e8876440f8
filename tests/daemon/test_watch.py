"""Watch mode: settle time, temp names, DCP .metadata, no deletion mirroring."""

# ruff: noqa: ASYNC230, ASYNC240  (tiny local files in tests; the watcher itself scans on an executor)

from __future__ import annotations

import asyncio
from pathlib import Path

from spotd.daemon.watch import Watcher
from tests.util import async_wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: FakeClock) -> tuple[Watcher, list[tuple[str, int]]]:
    got: list[tuple[str, int]] = []

    async def on_ready(path: Path) -> None:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*"))
        got.append((path.name, size))

    return Watcher(
        checkpoint_dir=tmp_path, settle_s=5.0, on_ready=on_ready, clock=clock, interval_s=0.01
    ), got


async def test_file_being_written_is_never_handed_over(tmp_path: Path) -> None:
    """A file that keeps growing is not handed over; once unchanged for settle_s it is, whole, exactly once."""
    clock = FakeClock()
    watcher, got = make(tmp_path, clock)
    with open(tmp_path / "model.pt", "wb") as fh:
        for _ in range(10):
            fh.write(b"x" * 4096)
            fh.flush()
            await watcher.poll_once()
            clock.now += 3.0  # longer than a poll, shorter than settle_s, between writes
    await watcher.poll_once()
    assert got == []
    clock.now += 5.0
    await watcher.poll_once()
    await watcher.poll_once()
    assert got == [("model.pt", 40960)]


async def test_temp_names_skipped_and_deletions_not_mirrored(tmp_path: Path) -> None:
    """*.tmp, dotfiles and *.partial are never handed over; deleting a handed-over file calls nothing."""
    clock = FakeClock()
    watcher, got = make(tmp_path, clock)
    for name in ("a.tmp", ".hidden", "b.partial", "ok.pt"):
        (tmp_path / name).write_bytes(b"1")
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert got == [("ok.pt", 1)]
    (tmp_path / "ok.pt").unlink()
    clock.now += 6
    await watcher.poll_once()
    assert got == [("ok.pt", 1)]


async def test_dcp_directory_waits_for_metadata(tmp_path: Path) -> None:
    """A torch.distributed.checkpoint directory is ready only once .metadata exists and has settled."""
    clock = FakeClock()
    watcher, got = make(tmp_path, clock)
    d = tmp_path / "step_200"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"shard")
    await watcher.poll_once()
    clock.now += 60
    await watcher.poll_once()
    assert got == []
    (d / ".metadata").write_bytes(b"meta")
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert got == [("step_200", 9)]


async def test_changed_file_handed_over_again_and_run_polls(tmp_path: Path) -> None:
    """run() polls on its own; a rewritten file is handed over again after it settles."""
    got: list[str] = []

    async def on_ready(path: Path) -> None:
        got.append(path.read_text())

    watcher = Watcher(checkpoint_dir=tmp_path, settle_s=0.05, on_ready=on_ready, interval_s=0.01)
    task = asyncio.create_task(watcher.run())
    try:
        (tmp_path / "m.pt").write_text("v1")
        await async_wait_until(lambda: got == ["v1"], timeout_s=5, what="first handover")
        (tmp_path / "m.pt").write_text("v2-longer")
        await async_wait_until(lambda: got == ["v1", "v2-longer"], timeout_s=5, what="second handover")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_entries_ready_together_go_oldest_step_first(tmp_path: Path) -> None:
    """Checkpoints found at start are handed over by the step in their names (HF, Lightning, step-N), whatever the directory order, so the newest is committed last."""
    clock = FakeClock()
    watcher, got = make(tmp_path, clock)
    for name in ("checkpoint-500", "checkpoint-200", "checkpoint-1000", "checkpoint-300"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "epoch=1-step=40.ckpt").write_bytes(b"l")
    (tmp_path / "notes.bin").write_bytes(b"n")
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert [name for name, _ in got] == [
        "notes.bin",
        "epoch=1-step=40.ckpt",
        "checkpoint-200",
        "checkpoint-300",
        "checkpoint-500",
        "checkpoint-1000",
    ]


def test_step_from_name_knows_the_common_writers() -> None:
    """HF checkpoint-N, Lightning epoch=E-step=S, step-N/step_N and DeepSpeed global_stepN give their step; other names none."""
    from spotd.daemon.watch import step_from_name

    assert step_from_name("checkpoint-500") == 500
    assert step_from_name("epoch=3-step=1200.ckpt") == 1200
    assert step_from_name("step-000000500") == 500
    assert step_from_name("step_42") == 42
    assert step_from_name("global_step7") == 7
    assert step_from_name("last.ckpt") is None


async def test_hf_checkpoint_without_trainer_state_is_never_committed(tmp_path: Path) -> None:
    """A checkpoint-N directory whose writer paused past settle_s after the weights is not handed over until trainer_state.json is there."""
    clock = FakeClock()
    watcher, got = make(tmp_path, clock)
    d = tmp_path / "checkpoint-400"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"w" * 10)
    await watcher.poll_once()
    clock.now += 60
    await watcher.poll_once()
    assert got == []
    (d / "optimizer.pt").write_bytes(b"o" * 5)
    (d / "trainer_state.json").write_text("{}")
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert got == [("checkpoint-400", 17)]


async def test_restored_entries_are_not_uploaded_again(tmp_path: Path) -> None:
    """What boot restored is known as committed: not handed over at start, only after it changes."""
    clock = FakeClock()
    got: list[str] = []

    async def on_ready(path: Path) -> None:
        got.append(path.name)

    watcher = Watcher(
        checkpoint_dir=tmp_path,
        settle_s=5.0,
        on_ready=on_ready,
        clock=clock,
        interval_s=0.01,
        committed={"checkpoint-500"},
    )
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (tmp_path / "tmp-checkpoint-600").mkdir()
    (tmp_path / "tmp-checkpoint-600" / "trainer_state.json").write_text("{}")
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert got == []
    (tmp_path / "checkpoint-500" / "trainer_state.json").write_text('{"global_step": 501}')
    await watcher.poll_once()
    clock.now += 6
    await watcher.poll_once()
    assert got == ["checkpoint-500"]
