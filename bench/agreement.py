"""What the per-step stop agreement costs: spotd.torch.agree() under real torchrun, gloo on CPU.

    .venv/bin/python bench/agreement.py [--ranks 2 4] [--calls 2000] [--step-ms 50]

For each world size: torchrun starts that many workers; each warms up, then times ``--calls`` calls of the
agreement (one all-reduce MAX of one int64) back to back, and, in the same process, as a baseline, the same
number of calls of a plain ``dist.all_reduce`` of one float32 (what every DDP step already does many times
over). Rank 0 prints median and p99 in µs, the share of a ``--step-ms`` training step the agreement takes,
and the ratio agreement / plain all-reduce. On this 2-core machine, more ranks than cores share them, so
the 4-rank figures include waiting for a core: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def worker(calls: int, step_ms: float) -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from spotd.torch import NONE, agree

    dist.init_process_group("gloo")

    def timed(fn) -> list[float]:
        for _ in range(100):
            fn()
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e6)
        return out

    plain_tensor = torch.zeros(1)
    agreement = timed(lambda: agree(NONE))
    plain = timed(lambda: dist.all_reduce(plain_tensor))
    if dist.get_rank() == 0:
        med, p99 = statistics.median(agreement), pct(agreement, 0.99)
        print(
            json.dumps(
                {
                    "ranks": dist.get_world_size(),
                    "agree_median_us": round(med, 1),
                    "agree_p99_us": round(p99, 1),
                    "plain_allreduce_median_us": round(statistics.median(plain), 1),
                    "ratio_to_plain": round(med / statistics.median(plain), 2),
                    "share_of_step_pct": round(100 * med / (step_ms * 1000), 3),
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--step-ms", type=float, default=50.0)
    args = parser.parse_args()
    print(f"spotd.torch.agree() cost, gloo on CPU, {os.cpu_count()} cores, {args.calls} calls per rank")
    header = f"{'ranks':>5}  {'median µs':>9}  {'p99 µs':>8}  {'plain µs':>8}  {'ratio':>5}"
    print(f"{header}  share of {args.step_ms:g} ms")
    for ranks in args.ranks:
        out = subprocess.run(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"),
                *(__file__, "_worker", str(args.calls), str(args.step_ms)),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=False,
        )
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not rows:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        r = rows[0]
        print(
            f"{r['ranks']:>5}  {r['agree_median_us']:>9}  {r['agree_p99_us']:>8}  "
            f"{r['plain_allreduce_median_us']:>8}  {r['ratio_to_plain']:>5}  {r['share_of_step_pct']}%"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        sys.exit(worker(int(sys.argv[2]), float(sys.argv[3])))
    sys.exit(main())
