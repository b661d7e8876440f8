"""Unchanged files are not sent again (issue 13): a file whose size and checksum equal a file of the
newest committed checkpoint is copied inside the store (S3 CopyObject / UploadPartCopy, a hard link on
file://), and the manifest lists and verifies it like any other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from spotd.metrics import Metrics
from spotd.store import Priority, run_checkpoint_name
from spotd.store import base as base_module
from spotd.store.s3 import S3Store
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.store.helpers import JOB, Backend, info, same_tree

MIB = 1024 * 1024


def _step(root: Path, step: int, files: dict[str, bytes]) -> Path:
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def _ten_files() -> dict[str, bytes]:
    return {f"shard{i}.bin": os.urandom(MIB) for i in range(10)}


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


async def _second_with_80_percent_unchanged(store: Any, ckdir: Path) -> tuple[Any, Any, dict[str, bytes]]:
    first = _ten_files()
    m1 = await store.commit(_step(ckdir, 1, first), checkpoint_dir=ckdir, info=info(1))
    second = dict(first)
    second["shard0.bin"] = os.urandom(MIB)  # same size, other bytes: uploaded, not copied
    second["shard1.bin"] = os.urandom(MIB // 2)  # another size
    m2 = await store.commit(_step(ckdir, 2, second), checkpoint_dir=ckdir, info=info(2))
    return m1, m2, second


async def test_unchanged_files_are_copied_not_sent(backend: Backend, ckdir: Path, tmp_path: Path) -> None:
    """Second checkpoint, 8 of 10 files unchanged (under another directory name): only the changed bytes
    are sent; the copies are listed, verified on restore and byte-identical; the changed file of the same
    size is uploaded."""
    metrics = Metrics()
    store = backend.make()
    store._metrics = metrics  # type: ignore[attr-defined]
    try:
        m1, m2, second = await _second_with_80_percent_unchanged(store, ckdir)
        assert _sample(metrics, "spotd_upload_bytes_copied_total") == 8 * MIB
        assert _sample(metrics, "spotd_upload_bytes_sent_total") == 10 * MIB + MIB + MIB // 2
        assert _sample(metrics, "spotd_upload_bytes_total") == 10 * MIB + 9 * MIB + MIB // 2
        by_path = {f.path: f for f in m2.files}
        assert len(by_path) == 10
        old = {f.path.removeprefix("step_000001/"): f.checksum for f in m1.files}
        assert by_path["step_000002/shard0.bin"].checksum != old["shard0.bin"]
        assert by_path["step_000002/shard5.bin"].checksum == old["shard5.bin"]
        dest = tmp_path / "restored"
        result = await store.restore(dest)
        assert result.manifest.name == m2.name
        for rel, data in second.items():
            assert (dest / "step_000002" / rel).read_bytes() == data
        if backend.kind == "file":
            a = backend.root / JOB / "checkpoints" / m1.name / "step_000001/shard5.bin"
            b = backend.root / JOB / "checkpoints" / m2.name / "step_000002/shard5.bin"
            assert os.stat(a).st_ino == os.stat(b).st_ino  # a hard link, not a second copy
            c = backend.root / JOB / "checkpoints" / m2.name / "step_000002/shard0.bin"
            assert os.stat(c).st_nlink == 1
    finally:
        await store.close()


async def test_a_fresh_store_finds_the_prior_commit_by_listing(
    backend: Backend, ckdir: Path, tmp_path: Path
) -> None:
    """A daemon that restarted (a new store object) copies from the newest commit it lists; a prior
    object gone since (retention, damage) is uploaded instead, never committed missing."""
    files = _ten_files()
    first = backend.make()
    try:
        m1 = await first.commit(_step(ckdir, 1, files), checkpoint_dir=ckdir, info=info(1))
    finally:
        await first.close()
    key = f"{JOB}/checkpoints/{m1.name}/step_000001/shard3.bin"
    if backend.bucket is not None:
        backend.bucket.client.delete_object(Bucket=backend.bucket.name, Key=f"pfx/{key}")
    else:
        (backend.root / key).unlink()
    metrics = Metrics()
    store = backend.make()
    store._metrics = metrics  # type: ignore[attr-defined]
    try:
        await store.commit(_step(ckdir, 2, files), checkpoint_dir=ckdir, info=info(2))
        assert _sample(metrics, "spotd_upload_bytes_copied_total") == 9 * MIB
        assert _sample(metrics, "spotd_upload_bytes_sent_total") == MIB
        dest = tmp_path / "restored"
        await store.restore(dest)
        assert same_tree(ckdir / "step_000002", dest / "step_000002")
    finally:
        await store.close()


async def test_s3_sends_only_the_changed_bytes_over_the_wire(
    s3_bucket: S3Bucket, s3_proxy: FaultProxy, ckdir: Path, tmp_path: Path
) -> None:
    """Counted at the proxy: the second commit's request bodies are the changed files and the small
    objects (manifest, LATEST), not the unchanged ones."""
    store = S3Store(
        uri=s3_bucket.uri(), job_id=JOB, endpoint_url=s3_proxy.endpoint_url, part_size=5 * MIB, concurrency=4
    )
    try:
        first = _ten_files()
        await store.commit(_step(ckdir, 1, first), checkpoint_dir=ckdir, info=info(1))
        before = s3_proxy.bytes_in
        second = dict(first)
        second["shard0.bin"] = os.urandom(MIB)
        second["shard1.bin"] = os.urandom(MIB)
        await store.commit(_step(ckdir, 2, second), checkpoint_dir=ckdir, info=info(2))
        sent = s3_proxy.bytes_in - before
        assert 2 * MIB <= sent < 2 * MIB + 64 * 1024, sent
    finally:
        await store.close()


async def test_s3_copies_a_large_file_in_parts(s3_bucket: S3Bucket, ckdir: Path, tmp_path: Path) -> None:
    """Over the copy limit (5 GiB on S3, lowered here) an unchanged file is copied with UploadPartCopy; the
    copy's whole-object checksum is checked and the restore verifies it."""
    metrics = Metrics()
    store = S3Store(
        uri=s3_bucket.uri(),
        job_id=JOB,
        endpoint_url=s3_bucket.endpoint_url,
        part_size=5 * MIB,
        concurrency=4,
        metrics=metrics,
    )
    store._files._copy_limit = 6 * MIB
    store._files._copy_part = 5 * MIB
    try:
        big = {"model.pt": os.urandom(12 * MIB)}
        await store.commit(_step(ckdir, 1, big), checkpoint_dir=ckdir, info=info(1))
        m2 = await store.commit(_step(ckdir, 2, big), checkpoint_dir=ckdir, info=info(2))
        assert _sample(metrics, "spotd_upload_bytes_copied_total") == 12 * MIB
        dest = tmp_path / "restored"
        result = await store.restore(dest)
        assert result.manifest.name == m2.name
        assert (dest / "step_000002/model.pt").read_bytes() == big["model.pt"]
    finally:
        await store.close()


async def test_a_node_part_copies_from_the_newest_multi_node_commit(
    backend: Backend, ckdir: Path, tmp_path: Path
) -> None:
    """commit_part: the unchanged files of a node's share are copied from the previous committed step."""
    metrics = Metrics()
    store = backend.make()
    store._metrics = metrics  # type: ignore[attr-defined]
    run = "20261201T193000Z-1a2b3c"
    try:
        first = _ten_files()
        second = {**first, "shard9.bin": os.urandom(MIB)}
        for step, files in ((1, first), (2, second)):
            result = await store.commit_part(
                [_step(ckdir, step, files)],
                checkpoint_dir=ckdir,
                name=run_checkpoint_name(run, step),
                node_rank=0,
                nodes=1,
                ranks=[0],
                info=info(step, rank=0, world_size=1),
            )
            assert result.committed
        assert _sample(metrics, "spotd_upload_bytes_copied_total") == 9 * MIB
        assert _sample(metrics, "spotd_upload_bytes_sent_total") == 11 * MIB
        dest = tmp_path / "restored"
        await store.restore(dest)
        for rel, data in second.items():
            assert (dest / "step_000002" / rel).read_bytes() == data
    finally:
        await store.close()


async def test_an_emergency_skips_the_extra_read_when_copying_did_not_pay_last_time(
    backend: Backend, ckdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed-size files that all changed (a full fine-tune's shards): once a commit found nothing to copy,
    an EMERGENCY commit uploads at once instead of reading every file twice; a background one still looks."""
    hashed: list[Path] = []
    real = base_module.hash_file

    def counting(path: Path, algo: str, *, fsync: bool = False) -> tuple[int, str]:
        hashed.append(path)
        return real(path, algo, fsync=fsync)

    monkeypatch.setattr(base_module, "hash_file", counting)
    store = backend.make()
    try:
        sizes = [MIB] * 3
        for step, priority in ((1, Priority.BACKGROUND), (2, Priority.BACKGROUND), (3, Priority.EMERGENCY)):
            files = {f"shard{i}.bin": os.urandom(n) for i, n in enumerate(sizes)}
            hashed.clear()
            await store.commit(
                _step(ckdir, step, files), checkpoint_dir=ckdir, info=info(step), priority=priority
            )
            assert len(hashed) == {1: 0, 2: 3, 3: 0}[step]
    finally:
        await store.close()
