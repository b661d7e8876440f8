"""A restore of many files (issue 13, item 2): each file verified, all of them fsynced in one pass before
any is moved into place, and a single damaged one fails the whole set cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import spotd.store.restore as restore_module
from spotd.errors import RestoreError
from spotd.store import CheckpointStore, Manifest
from tests.store.helpers import Backend, info, same_tree

MIB = 1024 * 1024


async def commit_shards(store: CheckpointStore, ckdir: Path, step: int) -> Manifest:
    """A DCP-like directory: 3 ranks x 40 small shards, a metadata file, and one shard bigger than a part
    (the fixture's part size is 5 MiB), so a restore mixes single GETs and ranged ones."""
    run = ckdir / f"step_{step:06d}"
    for rank in range(3):
        sub = run / f"rank{rank}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(40):
            (sub / f"__{rank}_{i}.distcp").write_bytes(os.urandom(1 + (rank * 40 + i) * 53))
    (run / ".metadata").write_bytes(os.urandom(4096))
    (run / "rank0" / "big.distcp").write_bytes(os.urandom(11 * MIB))
    return await store.commit(run, checkpoint_dir=ckdir, info=info(step))


async def test_many_files_restore_byte_identical_and_fsync_before_move(
    store: CheckpointStore, ckdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """122 files restore byte-identical; every one of them is fsynced, in one pass, before the first is
    moved into place."""
    m = await commit_shards(store, ckdir, 10)
    assert len(m.files) == 122
    order: list[tuple[str, int]] = []
    real_fsync, real_move = restore_module.fsync_files, restore_module.move_into_place

    def fsync_files(paths: list[Path]) -> None:
        order.append(("fsync", len(paths)))
        real_fsync(paths)

    def move_into_place(*args: object, **kwargs: object) -> tuple[str, ...]:
        order.append(("move", 0))
        return real_move(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_module, "fsync_files", fsync_files)
    monkeypatch.setattr(restore_module, "move_into_place", move_into_place)
    dest = tmp_path / "restored"
    result = await store.restore(dest)
    assert result.files == 122 and result.bytes == m.total_bytes
    assert order == [("fsync", 122), ("move", 0)]
    assert same_tree(ckdir, dest)
    assert not [p for p in dest.iterdir() if p.name.startswith(".spotd-restore-")]


@pytest.mark.parametrize(
    "damaged", ["step_000002/.metadata", "step_000002/rank1/__1_17.distcp", "step_000002/rank0/big.distcp"]
)
async def test_one_damaged_file_of_many_fails_the_set_cleanly(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path, damaged: str
) -> None:
    """Whichever file is damaged (the first, one in the middle, the ranged one), the set is not restored:
    the previous checkpoint is, whole, nothing of the damaged one is left in the destination or in a
    staging directory; with no older one the restore fails and the destination keeps what it had."""
    old = await commit_shards(store, ckdir, 1)
    new = await commit_shards(store, ckdir, 2)
    backend.corrupt(new, damaged)
    dest = tmp_path / "r"
    dest.mkdir()
    (dest / "NOTES.txt").write_text("mine")
    result = await store.restore(dest)
    assert result.manifest.name == old.name and result.skipped == (new.name,)
    assert not (dest / "step_000002").exists()
    assert same_tree(ckdir / "step_000001", dest / "step_000001")
    assert not [p for p in dest.iterdir() if p.name.startswith(".spotd-restore-")]

    backend.corrupt(old, damaged.replace("000002", "000001"))
    dest2 = tmp_path / "r2"
    dest2.mkdir()
    (dest2 / "NOTES.txt").write_text("mine")
    with pytest.raises(RestoreError, match="could be downloaded and verified"):
        await store.restore(dest2)
    assert sorted(p.name for p in dest2.iterdir()) == ["NOTES.txt"]
