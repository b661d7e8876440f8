"""Upload/restore benchmark: spotd's S3 store vs `aws s3 cp --recursive` and `s5cmd cp`, same data and server.

    .venv/bin/python bench/upload.py [--quick] [--repeat 3] [--servers moto,s3rver] [--endpoint-url URL]
                                     [--json-out FILE]

Datasets: one 1 GiB file; 64 x 16 MiB files; a DCP-like checkpoint (4 ranks x 32 shard files
``__<rank>_<i>.distcp`` of 1-64 MiB, log-uniform, seeded, plus its metadata file). ``--quick`` is 256 MiB,
16 x 16 MiB and 2 ranks x 16 shards of 1-16 MiB. Every dataset and tool runs against each server in turn:
moto (``spotd.tools.testing.start_moto``) and s3rver (npm, installed into ~/.cache/spotd-bench on first use;
objects on disk, multipart and ranged GETs, no checksums: spotd's restore still verifies its own CRC64NVME
from the manifest). ``--endpoint-url`` instead benchmarks one server already running. Prints medians of
wall time, ratios to s5cmd, and CPU seconds per GB (client self + children via getrusage; the S3 server's
own CPU per wall second is reported separately to show whether it is the bottleneck).

Durability differs: spotd's restore fsyncs every file before moving it into place; s5cmd and awscli leave the
files dirty in the page cache. So every restore starts after an untimed ``sync -f`` of the filesystem (no
tool pays for an earlier step's write-back), and every restore is followed by a timed ``sync -f`` of its
destination: "s5cmd + sync" is s5cmd's restore made as durable as spotd's (wall time until the sync returns;
CPU of s5cmd and of sync; the kernel flusher's CPU for the write-back is in no process's figure and cannot be
attributed). After spotd's restore the same sync finds nothing of its own to write.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
from benchlib import (
    AWS_ENV,
    BIN,
    MB,
    commit_info,
    empty_bucket,
    finish,
    median,
    new_doc,
    proc_cpu,
    progress,
    report_table,
    self_cpu,
    start_s3rver,
    sync_fs,
    verdict,
)

from spotd.store import Priority
from spotd.store.s3 import S3Store
from spotd.tools.testing import start_moto

TOOLS = ("spotd", "aws", "s5cmd")


def make_data(root: Path, quick: bool) -> dict[str, Path]:
    block = os.urandom(16 * MB)

    def write(path: Path, size: int) -> None:
        # Distinct bytes per file (a server or client that dedups would flatter itself otherwise).
        with open(path, "wb") as fh:
            for off in range(0, size, len(block)):
                n = min(len(block), size - off)
                fh.write(block[: n - 8] + os.urandom(min(8, n)) if n > 8 else os.urandom(n))

    big = root / "big"
    big.mkdir(parents=True)
    write(big / "model.pt", (256 if quick else 1024) * MB)
    many = root / "many"
    many.mkdir()
    for i in range(16 if quick else 64):
        write(many / f"shard{i:03d}.bin", 16 * MB)
    dcp = root / "dcp"
    dcp.mkdir()
    rng = random.Random(13)
    ranks, per_rank, top = (2, 16, 16) if quick else (4, 32, 64)
    for rank in range(ranks):
        for i in range(per_rank):
            size = int(MB * 2 ** rng.uniform(0, top.bit_length() - 1))
            write(dcp / f"__{rank}_{i}.distcp", size)
    write(dcp / "__metadata", 300_000)  # DCP's .metadata; s5cmd's glob skips dotfiles
    name_big = "1x256MB" if quick else "1x1GB"
    name_many = "16x16MB" if quick else "64x16MB"
    return {name_big: big, name_many: many, f"dcp{ranks}x{per_rank}": dcp}


def run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def cli_commands(tool: str, endpoint: str, src: Path, dest: Path, prefix: str) -> tuple[list[str], list[str]]:
    if tool == "aws":
        base = [str(BIN / "aws"), "--endpoint-url", endpoint, "s3", "cp", "--recursive", "--quiet"]
        return [*base, str(src), f"s3://bench/{prefix}/"], [*base, f"s3://bench/{prefix}/", str(dest)]
    base = [str(BIN / "s5cmd"), "--endpoint-url", endpoint, "cp"]
    return [*base, f"{src}/*", f"s3://bench/{prefix}/"], [*base, f"s3://bench/{prefix}/*", f"{dest}/"]


def measure(fn: Callable[[], object], srv: Callable[[], float]) -> dict[str, float]:
    """Wall s, client CPU s (self + children) and S3 server CPU s of one operation."""
    c0, s0, t0 = self_cpu(), srv(), time.perf_counter()
    fn()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": self_cpu() - c0, "server_cpu_s": srv() - s0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small datasets: 256 MiB, 16 x 16 MiB, 2 ranks x 16 shards of 1-16 MiB "
        "(default: 1 GiB, 64 x 16 MiB, 4 ranks x 32 shards of 1-64 MiB)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="repetitions of every server/dataset/tool; medians are reported"
    )
    ap.add_argument("--servers", default="moto,s3rver", help="comma-separated: moto, s3rver")
    ap.add_argument("--endpoint-url", default="", help="one server already running, instead of --servers")
    ap.add_argument("--concurrency", type=int, default=16, help="spotd store.concurrency (its default)")
    ap.add_argument("--checksum", default="auto", help="spotd store.checksum (auto = crc64nvme with awscrt)")
    ap.add_argument("--part-size-mb", type=int, default=16, help="spotd store.part_size in MiB (its default)")
    ap.add_argument(
        "--datasets",
        default="big,many,dcp",
        help="comma-separated: big (one file), many (16 MiB files), dcp (the DCP-like set)",
    )
    ap.add_argument("--json-out", type=Path, help="also write every repetition as JSON to this file")
    args = ap.parse_args(argv)
    wanted = [d for d in args.datasets.split(",") if d]
    if not wanted or any(d not in ("big", "many", "dcp") for d in wanted):
        ap.error("--datasets takes big, many and/or dcp")
    servers = ["external"] if args.endpoint_url else [s for s in args.servers.split(",") if s]
    if args.repeat < 1 or any(s not in ("moto", "s3rver", "external") for s in servers):
        ap.error("--repeat at least 1; --servers takes moto and/or s3rver")
    doc = new_doc("upload", args, argv)
    work = Path(tempfile.mkdtemp(prefix="spotd-bench-"))
    try:
        data = {
            k: v
            for (k, v), kind in zip(
                make_data(work / "data", args.quick).items(), ("big", "many", "dcp"), strict=True
            )
            if kind in wanted
        }
        doc["datasets"] = {
            k: {
                "files": sum(1 for p in v.rglob("*") if p.is_file()),
                "bytes": sum(p.stat().st_size for p in v.rglob("*") if p.is_file()),
            }
            for k, v in data.items()
        }
        for server_name in servers:
            doc["rows"] += bench_server(server_name, data, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return finish(doc, report, args.json_out)


def bench_server(
    server_name: str, data: dict[str, Path], work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    key = "S3RVER" if server_name == "s3rver" else "testing"
    env = {**os.environ, **AWS_ENV, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": key}
    os.environ.update(env)
    server: subprocess.Popen[bytes] | None = None
    if server_name == "moto":
        server, endpoint = start_moto()
    elif server_name == "s3rver":
        server, endpoint = start_s3rver(work / "s3rver")
    else:
        endpoint = args.endpoint_url
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)  # fresh credentials per server
    client.create_bucket(Bucket="bench")
    rows: list[dict[str, Any]] = []

    def srv() -> float:
        return proc_cpu(server.pid) if server else float("nan")

    try:
        for rep in range(args.repeat):
            for name, src in data.items():
                # Rotated so no tool always runs first after another tool's (cold-cache) turn.
                for tool in TOOLS[rep % 3 :] + TOOLS[: rep % 3]:
                    what = f"upload: {server_name} {name} {tool} rep {rep + 1}/{args.repeat}"
                    progress(f"{what} started")
                    prefix = f"{tool}-{name}-{rep}"
                    dest = work / f"out-{prefix}"
                    if tool == "spotd":
                        up, down, synced = spotd_roundtrip(endpoint, src, dest, prefix, args, srv)
                    else:
                        up_cmd, down_cmd = cli_commands(tool, endpoint, src, dest, prefix)
                        up = measure(lambda cmd=up_cmd: run(cmd, env), srv)
                        sync_fs(work)  # untimed: the restore starts with nothing else dirty to write back
                        down = measure(lambda cmd=down_cmd: run(cmd, env), srv)
                        synced = measure(lambda d=dest: sync_fs(d), srv)
                    for op, m in (("upload", up), ("restore", down), ("sync", synced)):
                        rows.append(
                            {"server": server_name, "rep": rep, "dataset": name, "tool": tool, "op": op, **m}
                        )
                    progress(
                        f"{what} done: upload {up['wall_s']:.2f} s, restore {down['wall_s']:.2f} s "
                        f"+ sync {synced['wall_s']:.2f} s"
                    )
                    shutil.rmtree(dest, ignore_errors=True)
                    empty_bucket(client, "bench", prefix)
    finally:
        client.close()
        if server:
            server.kill()
            server.wait()
    return rows


def spotd_roundtrip(
    endpoint: str,
    src: Path,
    dest: Path,
    prefix: str,
    args: argparse.Namespace,
    srv: Callable[[], float],
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    info = commit_info(1, final=True)

    async def open_store() -> S3Store:
        return S3Store(
            uri=f"s3://bench/{prefix}",
            job_id="bench",
            endpoint_url=endpoint,
            part_size=args.part_size_mb * MB,
            concurrency=args.concurrency,
            checksum=args.checksum,
        )

    with asyncio.Runner() as runner:
        store = runner.run(open_store())
        try:
            up = measure(
                lambda: runner.run(
                    store.commit(src, checkpoint_dir=src.parent, info=info, priority=Priority.EMERGENCY)
                ),
                srv,
            )
            sync_fs(dest.parent)  # untimed, as before the other tools' restores
            down = measure(lambda: runner.run(store.restore(dest)), srv)
            synced = measure(lambda: sync_fs(dest), srv)
        finally:
            runner.run(store.close())
    return up, down, synced


def report(doc: dict[str, Any]) -> str:
    """Markdown table of medians, each ratio beside its goal (<= 1.0 x s5cmd's wall time and CPU per GB)."""
    rows, params = doc["rows"], doc["params"]

    def pick(server: str, name: str, tool: str, op: str) -> list[dict[str, Any]]:
        return [
            r for r in rows if (r["server"], r["dataset"], r["tool"], r["op"]) == (server, name, tool, op)
        ]

    def made_durable(server: str, name: str, tool: str) -> list[dict[str, float]]:
        """Restore + the sync after it, summed per repetition."""
        synced = {r["rep"]: r for r in pick(server, name, tool, "sync")}
        return [
            {k: r[k] + synced[r["rep"]][k] for k in ("wall_s", "cpu_s", "server_cpu_s")}
            for r in pick(server, name, tool, "restore")
        ]

    out = []
    for server in dict.fromkeys(r["server"] for r in rows):
        for name, ds in doc["datasets"].items():
            gb = ds["bytes"] / 1e9
            for op in ("upload", "restore"):
                wall = {t: median(pick(server, name, t, op), "wall_s") for t in TOOLS}
                cpu = {t: median(pick(server, name, t, op), "cpu_s") / gb for t in TOOLS}
                s5_sync = made_durable(server, name, "s5cmd") if op == "restore" else []
                s5_sync_wall = median(s5_sync, "wall_s")
                busy = median(pick(server, name, "spotd", op), "server_cpu_s") / wall["spotd"]
                out.append(
                    [
                        server,
                        name,
                        op,
                        wall["spotd"],
                        wall["aws"],
                        wall["s5cmd"],
                        f"{s5_sync_wall:.2f}" if s5_sync else "",
                        verdict(wall["spotd"] / wall["s5cmd"], 1.0),
                        verdict(wall["spotd"] / s5_sync_wall, 1.0) if s5_sync else "",
                        f"{cpu['spotd']:.2f} / {cpu['aws']:.2f} / {cpu['s5cmd']:.2f}"
                        + (f" / {median(s5_sync, 'cpu_s') / gb:.2f}" if s5_sync else ""),
                        verdict(cpu["spotd"] / cpu["s5cmd"], 1.0),
                        f"{busy:.2f}",
                    ]
                )
    header = [
        "server",
        "dataset",
        "op",
        "spotd s",
        "aws s",
        "s5cmd s",
        "s5cmd + sync s",
        "spotd / s5cmd (goal <= 1.0)",
        "spotd / (s5cmd + sync) (goal <= 1.0)",
        "CPU s/GB spotd / aws / s5cmd [/ s5cmd + sync]",
        "CPU spotd / s5cmd (goal <= 1.0)",
        "server busy (CPU s/s, spotd)",
    ]
    sets = "; ".join(
        f"{k} = {v['files']} file{'s' * (v['files'] != 1)}, {v['bytes'] / 1e9:.2f} GB"
        for k, v in doc["datasets"].items()
    )
    intro = (
        f"Medians of {params['repeat']}; {sets}. Wall time and CPU s/GB (client self + children) against "
        "`s5cmd cp`. spotd's restore fsyncs every file; s5cmd + sync adds a timed `sync -f` of the "
        "destination so that s5cmd's restore is as durable (the kernel flusher's write-back CPU is in no "
        "process's figure). Server busy near 1.0: the S3 server was the bottleneck."
    )
    return report_table(intro, header, out, doc)


if __name__ == "__main__":
    sys.exit(main())
