"""What the benchmarks share: test credentials, CPU accounting, progress lines on stderr, their JSON results,
and the markdown tables (with each goal and whether it is met) of their reports.

Standard library and spotd.tools.testing only: the trainer subprocesses of bench/e2e.py import this file
beside a snapshot of spotd/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
MB = 1024 * 1024
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


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
