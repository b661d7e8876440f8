"""Bytes sent for a second checkpoint whose files are mostly unchanged: spotd (unchanged files copied
server-side) vs a plain upload of every file (the same store with copying off, and s5cmd when installed).

    .venv/bin/python bench/unchanged.py [--files 10] [--file-mb 32] [--unchanged 0.8] [--repeat 3]
                                        [--endpoint-url URL] [--json-out FILE]

A first checkpoint is committed, then a second one in which ``--unchanged`` of the files are the same
bytes (under the next step's directory, as a trainer writes them) and the others are new. Bytes sent are
counted on the wire: the Content-Length of every request the client sends (botocore's before-send), the
small objects (manifest, LATEST) included. Without --endpoint-url a local moto server is started. Prints
medians of bytes sent and wall time of the second commit. The goal is that only the changed files go over
the wire: spotd's bytes sent at most the changed files' bytes + 1 % of the checkpoint (manifest, LATEST and
request overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
from benchlib import (
    AWS_ENV,
    BIN,
    MB,
    commit_info,
    finish,
    median,
    new_doc,
    progress,
    report_table,
    verdict,
)

from spotd.store import Priority
from spotd.store.s3 import S3Store
from spotd.tools.testing import start_moto


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
        await store.commit(first, checkpoint_dir=first.parent, info=commit_info(1, final=False))
        sent = count_sent(store._client)
        t0 = time.perf_counter()
        m = await store.commit(
            second,
            checkpoint_dir=second.parent,
            info=commit_info(2, final=False),
            priority=Priority.EMERGENCY,
        )
        return sent[0], time.perf_counter() - t0, m.total_bytes
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10, help="files per checkpoint")
    ap.add_argument("--file-mb", type=int, default=32, help="size of each file in MiB")
    ap.add_argument("--unchanged", type=float, default=0.8, help="share of files unchanged in the second")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--endpoint-url", default="", help="an S3 server (default: start moto)")
    ap.add_argument("--json-out", type=Path, help="also write every repetition as JSON to this file")
    args = ap.parse_args(argv)
    if args.files < 1 or args.file_mb < 1 or not 0 <= args.unchanged <= 1 or args.repeat < 1:
        ap.error("--files, --file-mb and --repeat at least 1; --unchanged between 0 and 1")
    os.environ.update(AWS_ENV)
    doc = new_doc("unchanged", args, argv)
    server = None
    endpoint = args.endpoint_url
    if not endpoint:
        server, endpoint = start_moto()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="spotd-bench-unchanged-"))
    s5cmd = str(BIN / "s5cmd") if (BIN / "s5cmd").exists() else shutil.which("s5cmd")
    try:
        first, second = make_steps(work / "data", args.files, args.file_mb * MB, args.unchanged)
        doc["committed_bytes"] = sum(p.stat().st_size for p in second.iterdir())
        doc["changed_bytes"] = (args.files - round(args.files * args.unchanged)) * args.file_mb * MB
        for rep in range(args.repeat):
            for tool, copy in (("spotd", True), ("spotd, copying off", False)):
                what = f"unchanged: {tool} rep {rep + 1}/{args.repeat}"
                progress(f"{what} started")
                sent, wall, _ = asyncio.run(
                    spotd_second(endpoint, f"{'c' if copy else 'n'}-{rep}", first, second, copy=copy)
                )
                doc["rows"].append({"rep": rep, "tool": tool, "sent_bytes": sent, "wall_s": wall})
                progress(f"{what} done: {sent / 1e6:.1f} MB sent in {wall:.2f} s")
            if s5cmd:
                progress(f"unchanged: s5cmd cp rep {rep + 1}/{args.repeat} started")
                cmd = [s5cmd, "--endpoint-url", endpoint, "cp", f"{second}/*", f"s3://bench/s5-{rep}/"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env={**os.environ}, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                # s5cmd sends every byte of every file: the wire count is the checkpoint's size.
                doc["rows"].append(
                    {"rep": rep, "tool": "s5cmd cp", "sent_bytes": doc["committed_bytes"], "wall_s": wall}
                )
                progress(f"unchanged: s5cmd cp rep {rep + 1}/{args.repeat} done in {wall:.2f} s")
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
        if server:
            server.kill()
            server.wait()
    return finish(doc, report, args.json_out)


def report(doc: dict[str, Any]) -> str:
    """Medians per tool; spotd's bytes sent beside the goal (the changed files' bytes + 1 %)."""
    params, committed = doc["params"], doc["committed_bytes"]
    goal = (doc["changed_bytes"] + 0.01 * committed) / committed
    out = []
    for tool in dict.fromkeys(r["tool"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["tool"] == tool]
        share = median(rows, "sent_bytes") / committed
        out.append(
            [
                tool,
                f"{median(rows, 'sent_bytes') / 1e6:.1f}",
                verdict(share, goal) if tool == "spotd" else f"{share:.2f}",
                median(rows, "wall_s"),
            ]
        )
    header = ["second checkpoint", "MB sent", f"sent / committed (goal <= {goal:.2f})", "wall s"]
    intro = (
        f"Second checkpoint, {params['files']} x {params['file_mb']} MiB, {params['unchanged']:.0%} of the "
        f"files unchanged ({committed / 1e6:.1f} MB committed, {doc['changed_bytes'] / 1e6:.1f} MB changed); "
        f"medians of {params['repeat']}. Bytes sent counted on the wire (every request's Content-Length); "
        "copying off = the same store uploading every file."
    )
    return report_table(intro, header, out, doc)


if __name__ == "__main__":
    sys.exit(main())
