"""Two daemons on one store: LATEST only moves forward (a compare-and-swap on both backends: S3's If-Match,
file:// a lock and a compare), and one's retention never deletes the other's commit in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from spotd.store import CheckpointStore
from spotd.store.base import BaseStore, Changed
from tests.store.helpers import JOB, Backend, info


async def test_compare_and_swap_refuses_a_stale_tag(backend: Backend, store: CheckpointStore) -> None:
    """put_bytes(if_match=tag) writes only over the version that tag names: a stale tag and a vanished key are Changed, and the object is left as it was."""
    assert isinstance(store, BaseStore)
    key = f"{JOB}/LATEST"
    await store.put_bytes(key, b"a\n", if_absent=True)
    first = await store.get_tagged(key)
    assert first is not None and first.data == b"a\n"
    await store.put_bytes(key, b"b\n", if_match=first.tag)
    with pytest.raises(Changed):
        await store.put_bytes(key, b"stale\n", if_match=first.tag)
    assert backend.read(key) == b"b\n"
    backend.delete(key)
    with pytest.raises(Changed):
        await store.put_bytes(key, b"gone\n", if_match=first.tag)
    assert backend.read(key) is None


async def test_a_commit_that_read_latest_before_a_newer_one_does_not_move_it_back(
    backend: Backend, store: CheckpointStore, ckdir: Path
) -> None:
    """A commit that read LATEST just before another writer moved it to a newer checkpoint fails its compare-and-swap, reads again, and leaves LATEST at the newer one (a plain read-compare-write put its older name back)."""
    assert isinstance(store, BaseStore)
    (ckdir / "m.pt").write_bytes(b"0")
    await store.commit(ckdir / "m.pt", checkpoint_dir=ckdir, info=info(0))
    other = backend.make()
    newer: list[str] = []
    real = type(store)

    class ReadsThenLoses(real):  # type: ignore[misc, valid-type]
        __slots__ = ()

        async def get_tagged(self, key: str) -> Any:
            got = await super().get_tagged(key)
            if key.endswith("/LATEST") and not newer:
                # Between this read and the write it leads to, another daemon commits a newer checkpoint.
                (ckdir / "n.pt").write_bytes(b"2")
                newer.append((await other.commit(ckdir / "n.pt", checkpoint_dir=ckdir, info=info(2))).name)
            return got

    (ckdir / "m.pt").write_bytes(b"1")
    store.__class__ = ReadsThenLoses
    try:
        older = await store.commit(ckdir / "m.pt", checkpoint_dir=ckdir, info=info(1))
    finally:
        store.__class__ = real
        await other.close()
    assert older.name < newer[0]
    latest = backend.read(f"{JOB}/LATEST")
    assert latest is not None and latest.decode().strip() == newer[0]


async def test_concurrent_commits_leave_latest_at_the_newest(backend: Backend, ckdir: Path) -> None:
    """Eight commits racing on LATEST from two store objects leave it naming the newest committed checkpoint."""
    stores = [backend.make(), backend.make()]
    try:
        for i in range(8):
            (ckdir / f"{i}.pt").write_bytes(bytes([i]))
        done = await asyncio.gather(
            *(stores[i % 2].commit(ckdir / f"{i}.pt", checkpoint_dir=ckdir, info=info(i)) for i in range(8))
        )
    finally:
        for s in stores:
            await s.close()
    latest = backend.read(f"{JOB}/LATEST")
    assert latest is not None and latest.decode().strip() == max(m.name for m in done)


async def test_another_daemons_retention_never_deletes_a_commit_in_flight(
    backend: Backend, ckdir: Path, tmp_path: Path
) -> None:
    """Two daemons on one store, the first commits of a job (per-rank, nothing older kept): while rank 0's commit is half uploaded on one, rank 1's commit completes on the other and its retention runs; rank 0's files survive and its commit restores (the orphan rule saw rank 0's directory, older than the only kept commit, as abandoned, and deleted it under the upload)."""
    a, b = backend.make(), backend.make()
    assert isinstance(a, BaseStore)
    real = type(a)
    for name in ("r0-a.pt", "r0-b.pt", "r1.pt"):
        (ckdir / name).write_bytes(name.encode() * 100)
    (ckdir / "r0").mkdir()
    for name in ("r0-a.pt", "r0-b.pt"):
        (ckdir / name).rename(ckdir / "r0" / name)
    uploads: list[str] = []

    class OtherCommitsMidway(real):  # type: ignore[misc, valid-type]
        __slots__ = ()

        async def upload_file(self, file: Any, key: str, priority: Any, progress: Any, **kw: Any) -> str:
            uploads.append(file.rel)
            if len(uploads) == 2:  # the first file is up, this one not yet
                await b.commit(ckdir / "r1.pt", checkpoint_dir=ckdir, info=info(5, rank=1, world_size=2))
            return await super().upload_file(file, key, priority, progress, **kw)

    a.__class__ = OtherCommitsMidway
    try:
        await a.commit(ckdir / "r0", checkpoint_dir=ckdir, info=info(5, rank=0, world_size=2))
    finally:
        a.__class__ = real
    try:
        result = await a.restore(tmp_path / "fresh")
    finally:
        await a.close()
        await b.close()
    assert result.manifest.step == 5 and result.files == 3 and result.skipped == ()
