"""Bytes sent for a second checkpoint whose files are mostly unchanged: spotd (unchanged files copied
server-side) vs a plain upload of every file (the same store with copying off, and s5cmd when installed).

    .venv/bin/python bench/unchanged.py [--files 10] [--file-mb 32] [--unchanged 0.8] [--repeat 3]
                                        [--endpoint-url URL]

A first checkpoint is committed, then a second one in which ``--unchanged`` of the files are the same
bytes (under the next step's directory, as a trainer writes them) and the others are new. Bytes sent are
counted on the wire: the Content-Length of every request the client sends (botocore's before-send), the
small objects (manifest, LATEST) included. Without --endpoint-url a local moto server is started. Prints
medians of bytes sent and wall time of the second commit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

from spotd.store import CommitInfo, Priority
from spotd.store.s3 import S3Store
from spotd.tools.testing import start_moto

MB = 1024 * 1024


def info(step: int) -> CommitInfo:
    return CommitInfo(
        job_id="bench",
        step=step,
        trainer="bench",
        rank=None,
        world_size=None,
        request_id=None,
        reason="bench",
        instance_id="i-bench",
        final=False,
    )


def make_steps(root: Path, files: int, size: int, unchanged: float) -> tuple[Path, Path]:
    first, second = root / "step_000001", root / "step_000002"
    first.mkdir(parents=True)
    second.mkdir()
    keep = round(files * unchanged)
    for i in range(files):
        data = os.urandom(size)
        (first / f"shard{i:03d}.bin").write_bytes(data)
        (second / f"shard{i:03d}.bin").write_bytes(data if i < keep else os.urandom(size))
    return first, second


def count_sent(client: Any) -> list[int]:
    sent = [0]

    def hook(request: Any, **_: Any) -> None:
        sent[0] += int(request.headers.get("Content-Length", 0) or 0)

    client.meta.events.register("before-send.s3", hook)
    return sent


class PlainStore(S3Store):
    """The same store with copying off: every file is uploaded, as a plain upload does."""

    __slots__ = ()

    async def copy_object(self, src: str, key: str, *, size: int, checksum: str, priority: Priority) -> None:
        return None


async def spotd_second(
    endpoint: str, prefix: str, first: Path, second: Path, *, copy: bool
) -> tuple[int, float, int]:
    """(bytes sent, wall s) of the second commit, and the bytes it committed."""
    cls = S3Store if copy else PlainStore
    store = cls(uri=f"s3://bench/{prefix}", job_id="bench", endpoint_url=endpoint)
    try:
        await store.commit(first, checkpoint_dir=first.parent, info=info(1))
        sent = count_sent(store._client)
        t0 = time.perf_counter()
        m = await store.commit(
            second, checkpoint_dir=second.parent, info=info(2), priority=Priority.EMERGENCY
        )
        return sent[0], time.perf_counter() - t0, m.total_bytes
    finally:
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10, help="files per checkpoint")
    ap.add_argument("--file-mb", type=int, default=32, help="size of each file in MiB")
    ap.add_argument("--unchanged", type=float, default=0.8, help="share of files unchanged in the second")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--endpoint-url", default="", help="an S3 server (default: start moto)")
    args = ap.parse_args()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    server = None
    endpoint = args.endpoint_url
    if not endpoint:
        server, endpoint = start_moto()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="spotd-bench-unchanged-"))
    rows: dict[str, list[tuple[int, float]]] = {}
    committed = 0
    local = Path(sys.executable).parent / "s5cmd"
    s5cmd = str(local) if local.exists() else shutil.which("s5cmd")
    try:
        first, second = make_steps(work / "data", args.files, args.file_mb * MB, args.unchanged)
        for rep in range(args.repeat):
            for tool, copy in (("spotd", True), ("spotd, copying off", False)):
                sent, wall, committed = asyncio.run(
                    spotd_second(endpoint, f"{'c' if copy else 'n'}-{rep}", first, second, copy=copy)
                )
                rows.setdefault(tool, []).append((sent, wall))
            if s5cmd:
                env = {**os.environ}
                cmd = [s5cmd, "--endpoint-url", endpoint, "cp", f"{second}/*", f"s3://bench/s5-{rep}/"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                # s5cmd sends every byte of every file: the wire count is the checkpoint's size.
                rows.setdefault("s5cmd cp", []).append((committed, time.perf_counter() - t0))
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
        if server:
            server.kill()
            server.wait()
    print(
        f"\nsecond checkpoint: {args.files} x {args.file_mb} MiB, {args.unchanged:.0%} unchanged, "
        f"{committed / 1e6:.1f} MB committed; medians of {args.repeat}"
    )
    print("{:20} {:>12} {:>13} {:>8}".format("tool", "MB sent", "sent/commit", "wall s"))
    for tool, got in rows.items():
        sent = statistics.median(r[0] for r in got)
        wall = statistics.median(r[1] for r in got)
        print(f"{tool:20} {sent / 1e6:12.1f} {sent / committed:13.2f} {wall:8.2f}")


if __name__ == "__main__":
    main()
