"""Upload/restore benchmark: spotd's S3 store vs `aws s3 cp --recursive` and `s5cmd cp`, same data and server.

    .venv/bin/python bench/upload.py [--scale 0.25] [--repeat 3] [--endpoint-url URL]

Datasets: one 1 GB file, and 64 x 16 MB files (both times --scale). Without --endpoint-url a local moto
server is started. Prints medians of wall time, ratios to s5cmd, and CPU seconds per GB (self + children
via getrusage; the S3 server's own CPU is reported separately to show whether it is the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

from spotd.store import CommitInfo, Priority
from spotd.store.checksums import choose_checksum, hash_file
from spotd.store.s3 import S3Store
from spotd.tools.testing import start_moto

BIN = Path(sys.executable).parent
MB = 1024 * 1024


def cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_data(root: Path, scale: float) -> dict[str, Path]:
    big = root / "big"
    big.mkdir(parents=True)
    block = os.urandom(16 * MB)
    with open(big / "model.pt", "wb") as fh:
        for _ in range(max(1, int(64 * scale))):
            fh.write(block)
    many = root / "many"
    many.mkdir()
    for i in range(max(1, int(64 * scale))):
        (many / f"shard{i:03d}.bin").write_bytes(block[: -i - 1] + os.urandom(i + 1))
    return {"1x1GB": big, "64x16MB": many}


def run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def cli_commands(tool: str, endpoint: str, src: Path, dest: Path, prefix: str) -> tuple[list[str], list[str]]:
    if tool == "aws":
        base = [str(BIN / "aws"), "--endpoint-url", endpoint, "s3", "cp", "--recursive", "--quiet"]
        return [*base, str(src), f"s3://bench/{prefix}/"], [*base, f"s3://bench/{prefix}/", str(dest)]
    base = [str(BIN / "s5cmd"), "--endpoint-url", endpoint, "cp"]
    return [*base, f"{src}/*", f"s3://bench/{prefix}/"], [*base, f"s3://bench/{prefix}/*", f"{dest}/"]


def measure(fn: Callable[[], object], srv: Callable[[], float]) -> tuple[float, float, float]:
    """(wall s, client CPU s, server CPU s) of one operation."""
    c0, s0, t0 = cpu(), srv(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0, srv() - s0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--endpoint-url", default="")
    ap.add_argument("--concurrency", type=int, default=16, help="spotd store.concurrency (its default)")
    ap.add_argument("--checksum", default="auto", help="spotd store.checksum (auto = crc64nvme with awscrt)")
    ap.add_argument("--part-size-mb", type=int, default=16, help="spotd store.part_size in MiB (its default)")
    args = ap.parse_args()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    server = None
    endpoint = args.endpoint_url
    if not endpoint:
        server, endpoint = start_moto()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="spotd-bench-"))
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    hash_s: dict[str, float] = {}
    try:
        data = make_data(work / "data", args.scale)
        sizes = {k: sum(p.stat().st_size for p in v.rglob("*") if p.is_file()) for k, v in data.items()}
        for name, src in data.items():
            t0 = time.perf_counter()
            for p in src.iterdir():
                hash_file(p, choose_checksum(args.checksum))
            hash_s[name] = time.perf_counter() - t0
        for rep in range(args.repeat):
            for name, src in data.items():
                for tool in ("spotd", "aws", "s5cmd"):
                    prefix = f"{tool}-{name}-{rep}"
                    dest = work / f"out-{prefix}"

                    def srv() -> float:
                        return server_cpu(server.pid) if server else float("nan")

                    if tool == "spotd":
                        up, down = spotd_roundtrip(endpoint, src, dest, prefix, args, srv)
                    else:
                        up_cmd, down_cmd = cli_commands(tool, endpoint, src, dest, prefix)
                        up = measure(lambda cmd=up_cmd: run(cmd, env), srv)
                        down = measure(lambda cmd=down_cmd: run(cmd, env), srv)
                    results.setdefault((name, tool, "upload"), []).append(up)
                    results.setdefault((name, tool, "restore"), []).append(down)
                    shutil.rmtree(dest, ignore_errors=True)
                    for page in client.get_paginator("list_objects_v2").paginate(
                        Bucket="bench", Prefix=prefix
                    ):
                        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                        if objs:
                            client.delete_objects(Bucket="bench", Delete={"Objects": objs})
        report(results, sizes, hash_s, args)
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
        if server:
            server.kill()
            server.wait()


def spotd_roundtrip(
    endpoint: str, src: Path, dest: Path, prefix: str, args: argparse.Namespace, srv: Callable[[], float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    async def go() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        store = S3Store(
            uri=f"s3://bench/{prefix}",
            job_id="bench",
            endpoint_url=endpoint,
            part_size=args.part_size_mb * MB,
            concurrency=args.concurrency,
            checksum=args.checksum,
        )
        info = CommitInfo(
            job_id="bench",
            step=1,
            trainer="bench",
            rank=None,
            world_size=None,
            request_id=None,
            reason="bench",
            instance_id="i-bench",
            final=True,
        )
        try:
            c0, s0, t0 = cpu(), srv(), time.perf_counter()
            await store.commit(src, checkpoint_dir=src.parent, info=info, priority=Priority.EMERGENCY)
            up = (time.perf_counter() - t0, cpu() - c0, srv() - s0)
            c0, s0, t0 = cpu(), srv(), time.perf_counter()
            await store.restore(dest)
            down = (time.perf_counter() - t0, cpu() - c0, srv() - s0)
        finally:
            await store.close()
        return up, down

    return asyncio.run(go())


def report(
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]],
    sizes: dict[str, int],
    hash_s: dict[str, float],
    args: argparse.Namespace,
) -> None:
    print(
        f"\nscale={args.scale} repeat={args.repeat} (medians); CPU s/GB = client self+children; "
        "server = S3 server CPU s per wall s during the op (~1.0 means the server is saturated)"
    )
    head = ("dataset", "op", "tool", "wall s", "MB/s", "vs s5cmd", "CPU s/GB", "server")
    print("{:9} {:8} {:6} {:>7} {:>7} {:>8} {:>9} {:>7}".format(*head))
    for (name, tool, op), rows in sorted(results.items()):
        wall = statistics.median(r[0] for r in rows)
        cpu_gb = statistics.median(r[1] for r in rows) / (sizes[name] / 1e9)
        srv = statistics.median(r[2] for r in rows)
        base = statistics.median(r[0] for r in results[(name, "s5cmd", op)])
        print(
            f"{name:9} {op:8} {tool:6} {wall:7.2f} {sizes[name] / 1e6 / wall:7.1f} {wall / base:8.2f} "
            f"{cpu_gb:9.2f} {srv / wall:7.2f}"
        )
    for name, secs in hash_s.items():
        algo = choose_checksum(args.checksum)
        print(f"{algo} of {name}: {secs:.2f} s ({sizes[name] / 1e6 / secs:.0f} MB/s, one core, page cache)")


if __name__ == "__main__":
    main()
