"""What the benchmarks share: test credentials, CPU accounting, the s3rver server, core pinning, filesystem
sync, progress lines on stderr, and the markdown tables (with each goal and whether it is met) of their
reports. bench/run_all.py runs the benches and prints those same tables.

Standard library and spotd.tools.testing only: the trainer subprocesses of bench/e2e.py import this file
beside a snapshot of spotd/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from spotd.tools.testing import free_port

BIN = Path(sys.executable).parent
MB = 1024 * 1024
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3RVER_VERSION = "3.7.1"


def self_cpu() -> float:
    """CPU seconds of this process and its waited-for children (a CLI tool's, once it has exited)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another live process, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    """One line on stderr, so a long run shows where it is while stdout stays the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def host() -> dict[str, Any]:
    """What the figures depend on: cores, load average (other work on the machine), Python."""
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def sync_fs(path: Path) -> None:
    """``sync -f``: syncfs(2) of the filesystem that holds ``path``; returns once its dirty pages are on disk.
    The write-back itself is done by the kernel's flusher threads: their CPU is in no process's figure."""
    subprocess.run(["sync", "-f", str(path)], check=True)


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (sched_setaffinity is per thread; threads started later inherit
    their creator's mask)."""
    mask = set(cpus)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), mask)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that ended meanwhile


def start_s3rver(data_dir: Path, *, timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """s3rver (npm) on a free loopback port, installed into ~/.cache/spotd-bench on first use; objects are
    kept on disk under ``data_dir``. The caller stops it (``kill()``, ``wait()``)."""
    cache = Path.home() / ".cache" / "spotd-bench"
    exe = cache / "node_modules" / ".bin" / "s3rver"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", f"s3rver@{S3RVER_VERSION}"],
            cwd=cache,
            check=True,
        )
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(exe), "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise RuntimeError(f"s3rver did not start on port {port} (exit {proc.returncode})") from None
            time.sleep(0.05)


def empty_bucket(client: Any, bucket: str, prefix: str = "") -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def median(rows: Iterable[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows]
    return statistics.median(values) if values else float("nan")


def verdict(value: float, goal: float) -> str:
    """A figure beside its goal (lower is better): ``0.77 met`` / ``1.07 not met``, judged as shown (1.004
    is 1.00, met) so that a row never reads as its own contradiction."""
    if value != value:  # NaN: not measured
        return "n/a"
    return f"{value:.2f} {'met' if round(value, 2) <= goal else 'not met'}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; numbers right-aligned."""
    body = [[c if isinstance(c, str) else f"{c:.2f}" for c in row] for row in rows]
    align = ["---:" if body and all(_numeric(r[i]) for r in body) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == ""
    return True


def new_doc(bench: str, args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """A bench's results: its command, its parameters, the machine before it started; ``rows`` to fill."""
    return {
        "bench": bench,
        "command": [Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)],
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host_before": host(),
        "rows": [],
    }


def finish(doc: dict[str, Any], report: Callable[[dict[str, Any]], str], json_out: Path | None) -> int:
    """Print the report (stdout) and write every repetition to ``json_out``; the exit status."""
    doc["host_after"] = host()
    print(report(doc), flush=True)
    if json_out:
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def commit_info(step: int, *, final: bool, job_id: str = "bench", reason: str = "bench") -> Any:
    """The CommitInfo of a benchmark's commit (one trainer, no ranks)."""
    from spotd.store import CommitInfo

    return CommitInfo(
        job_id=job_id,
        step=step,
        trainer="bench",
        rank=None,
        world_size=None,
        request_id=None,
        reason=reason,
        instance_id="i-bench",
        final=final,
    )


def report_table(
    intro: str, header: Sequence[str], rows: Iterable[Sequence[object]], doc: dict[str, Any]
) -> str:
    """A bench's report: what was measured, the table, and the load the machine carried meanwhile."""
    before, after = doc["host_before"], doc["host_after"]
    return (
        f"{intro}\n\n{table(header, rows)}\n\nload average {before['load_average']} before, "
        f"{after['load_average']} after; {before['cores']} cores."
    )
