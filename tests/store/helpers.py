"""What the store tests share: the job, a CommitInfo, a backend (file:// or moto's s3://) a test can
inspect and damage, and file helpers. The fixtures built on them are in tests/store/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from spotd.store import CheckpointStore, CommitInfo, Manifest
from tests.fixtures.s3 import S3Bucket

JOB = "job1"


@contextlib.asynccontextmanager
async def busy_core() -> AsyncIterator[int]:
    """A trainer that keeps the daemon's core busy: a spinning process pinned to one core with the calling
    thread (threads it starts inside, a store's among them, inherit the pinning); yields its pid."""
    core = max(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    spinner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    try:
        os.sched_setaffinity(spinner.pid, {core})
        os.sched_setaffinity(0, {core})
        yield spinner.pid
    finally:
        os.sched_setaffinity(0, mine)
        spinner.kill()
        await spinner.wait()


def info(step: int | None = 1, *, rank: int | None = None, world_size: int | None = None) -> CommitInfo:
    return CommitInfo(
        job_id=JOB,
        step=step,
        trainer="train",
        rank=rank,
        world_size=world_size,
        request_id=None,
        reason="periodic",
        instance_id="i-0123",
        final=False,
    )


@dataclass
class Backend:
    kind: str
    root: Path  # file store root (file) or unused
    bucket: S3Bucket | None
    make: Callable[..., CheckpointStore]
    uri: str = ""

    def corrupt(self, manifest: Manifest, path: str) -> None:
        key = f"{JOB}/checkpoints/{manifest.name}/{path}"
        if self.bucket is not None:
            body = self.bucket.client.get_object(Bucket=self.bucket.name, Key=f"pfx/{key}")["Body"].read()
            # Its first byte flipped, as on disk below: b"X" + body[1:] left a body starting with X whole.
            damaged = bytes([body[0] ^ 0xFF]) + body[1:]
            self.bucket.client.put_object(Bucket=self.bucket.name, Key=f"pfx/{key}", Body=damaged)
        else:
            target = self.root / key
            data = bytearray(target.read_bytes())
            data[0] ^= 0xFF
            target.write_bytes(bytes(data))

    def objects(self) -> list[str]:
        if self.bucket is not None:
            return [k.removeprefix("pfx/") for k in self.bucket.keys("pfx/")]
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read(self, key: str) -> bytes | None:
        """The object at ``key`` (relative to the store root, e.g. ``job1/LATEST``), or None."""
        if self.bucket is not None:
            try:
                return self.bucket.client.get_object(Bucket=self.bucket.name, Key=f"pfx/{key}")["Body"].read()
            except self.bucket.client.exceptions.NoSuchKey:
                return None
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def delete(self, key: str) -> None:
        if self.bucket is not None:
            self.bucket.client.delete_object(Bucket=self.bucket.name, Key=f"pfx/{key}")
        else:
            (self.root / key).unlink()

    def add_orphan(self, name: str) -> None:
        key = f"{JOB}/checkpoints/{name}/model.pt"
        if self.bucket is not None:
            self.bucket.client.put_object(Bucket=self.bucket.name, Key=f"pfx/{key}", Body=b"half")
        else:
            (self.root / key).parent.mkdir(parents=True)
            (self.root / key).write_bytes(b"half")


def write_big(path: Path, size: int) -> None:
    """A sparse file with random blocks scattered through it: fast to create, not all zeros."""
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, 16 * 1024 * 1024):
            fh.seek(offset)
            fh.write(block[: min(len(block), size - offset)])


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)
