"""Upload/restore benchmark: spotd's S3 store vs `aws s3 cp --recursive` and `s5cmd cp`, same data and server.

    .venv/bin/python bench/upload.py [--quick] [--repeat 3] [--servers moto,s3rver] [--endpoint-url URL]

Datasets: one 1 GiB file; 64 x 16 MiB files; a DCP-like checkpoint (4 ranks x 32 shard files
``__<rank>_<i>.distcp`` of 1-64 MiB, log-uniform, seeded, plus its metadata file). ``--quick`` is 256 MiB,
16 x 16 MiB and 2 ranks x 16 shards of 1-16 MiB. Every dataset and tool runs against each server in turn:
moto (``spotd.tools.testing.start_moto``) and s3rver (npm, installed into ~/.cache/spotd-bench on first use;
objects on disk, multipart and ranged GETs, no checksums: spotd's restore still verifies its own CRC64NVME
from the manifest). ``--endpoint-url`` instead benchmarks one server already running. Prints medians of
wall time, ratios to s5cmd, and CPU seconds per GB (client self + children via getrusage; the S3 server's
own CPU per wall second is reported separately to show whether it is the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import socket
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
from spotd.store.s3 import S3Store
from spotd.tools.testing import free_port, start_moto

BIN = Path(sys.executable).parent
MB = 1024 * 1024


def cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def start_s3rver(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """s3rver (npm) on a free loopback port, installed into ~/.cache/spotd-bench on first use."""
    cache = Path.home() / ".cache" / "spotd-bench"
    exe = cache / "node_modules" / ".bin" / "s3rver"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", "s3rver@3.7.1"], cwd=cache, check=True
        )
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(exe), "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"s3rver did not start on port {port} (exit {proc.poll()})") from None
            time.sleep(0.05)


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
    ap.add_argument("--quick", action="store_true", help="256 MiB, 16 x 16 MiB, 2 x 16 shards")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--servers", default="moto,s3rver", help="comma-separated: moto, s3rver")
    ap.add_argument("--endpoint-url", default="", help="one server already running, instead of --servers")
    ap.add_argument("--concurrency", type=int, default=16, help="spotd store.concurrency (its default)")
    ap.add_argument("--checksum", default="auto", help="spotd store.checksum (auto = crc64nvme with awscrt)")
    ap.add_argument("--part-size-mb", type=int, default=16, help="spotd store.part_size in MiB (its default)")
    args = ap.parse_args()
    print("command:", " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="spotd-bench-"))
    try:
        data = make_data(work / "data", args.quick)
        sizes = {k: sum(p.stat().st_size for p in v.rglob("*") if p.is_file()) for k, v in data.items()}
        counts = {k: sum(1 for p in v.rglob("*") if p.is_file()) for k, v in data.items()}
        for k in data:
            print(f"dataset {k}: {counts[k]} files, {sizes[k] / 1e9:.2f} GB", flush=True)
        servers = ["external"] if args.endpoint_url else args.servers.split(",")
        for server_name in servers:
            results = bench_server(server_name, data, work, args)
            report(server_name, results, sizes, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_server(
    server_name: str, data: dict[str, Path], work: Path, args: argparse.Namespace
) -> dict[tuple[str, str, str], list[tuple[float, float, float]]]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "S3RVER" if server_name == "s3rver" else "testing",
        "AWS_SECRET_ACCESS_KEY": "S3RVER" if server_name == "s3rver" else "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
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
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}

    def srv() -> float:
        return server_cpu(server.pid) if server else float("nan")

    try:
        for rep in range(args.repeat):
            for name, src in data.items():
                # Rotated so no tool always runs first after another tool's (cold-cache) turn.
                tools = ("spotd", "aws", "s5cmd")[rep % 3 :] + ("spotd", "aws", "s5cmd")[: rep % 3]
                for tool in tools:
                    prefix = f"{tool}-{name}-{rep}"
                    dest = work / f"out-{prefix}"
                    if tool == "spotd":
                        up, down = spotd_roundtrip(endpoint, src, dest, prefix, args, srv)
                    else:
                        up_cmd, down_cmd = cli_commands(tool, endpoint, src, dest, prefix)
                        up = measure(lambda cmd=up_cmd: run(cmd, env), srv)
                        down = measure(lambda cmd=down_cmd: run(cmd, env), srv)
                    results.setdefault((name, tool, "upload"), []).append(up)
                    results.setdefault((name, tool, "restore"), []).append(down)
                    print(
                        f"  {server_name} rep {rep} {name} {tool}: up {up[0]:.2f}s down {down[0]:.2f}s",
                        flush=True,
                    )
                    shutil.rmtree(dest, ignore_errors=True)
                    for page in client.get_paginator("list_objects_v2").paginate(
                        Bucket="bench", Prefix=prefix
                    ):
                        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                        if objs:
                            client.delete_objects(Bucket="bench", Delete={"Objects": objs})
    finally:
        client.close()
        if server:
            server.kill()
            server.wait()
    return results


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
    server_name: str,
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]],
    sizes: dict[str, int],
    args: argparse.Namespace,
) -> None:
    print(
        f"\nserver={server_name} repeat={args.repeat} (medians); CPU s/GB = client self+children; "
        "server = S3 server CPU s per wall s during the op (~1.0 means the server is saturated)"
    )
    head = ("dataset", "op", "tool", "wall s", "MB/s", "vs s5cmd", "CPU s/GB", "server")
    print("{:9} {:8} {:6} {:>7} {:>7} {:>8} {:>9} {:>7}".format(*head))
    order = {n: i for i, n in enumerate(sizes)}
    for (name, tool, op), rows in sorted(
        results.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][1])
    ):
        wall = statistics.median(r[0] for r in rows)
        cpu_gb = statistics.median(r[1] for r in rows) / (sizes[name] / 1e9)
        srv = statistics.median(r[2] for r in rows)
        base = statistics.median(r[0] for r in results[(name, "s5cmd", op)])
        print(
            f"{name:9} {op:8} {tool:6} {wall:7.2f} {sizes[name] / 1e6 / wall:7.1f} {wall / base:8.2f} "
            f"{cpu_gb:9.2f} {srv / wall:7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
