"""Multi-rank figures under real torchrun (gloo on CPU) and real daemons: how fast every rank stops, and
how fast a multi-node checkpoint is committed against the same bytes from one process.

    .venv/bin/python bench/multirank.py [--reps 5] [--step-ms 50] [--skew-ms 10] [--mb 64] [--commit-reps 3]

1. *Notice -> every rank stopped*: 1 node x 2 ranks, one slower by ``--skew-ms`` a step, a real daemon
   (file:// store) and the IMDS simulator. At a random moment a spot notice; the time from the daemon's
   ``checkpoint.requested`` (its broadcast to the trainers) to the moment the *last* rank began its
   emergency save (the agreed stop step). Goal: at most one step + 20 ms. Detection (the IMDS poll) is
   not counted: bench/detect.py measures it.
2. *Notice -> global commit*: 2 nodes x 2 ranks x ``--mb`` MB (two torchrun agents, two daemons, two IMDS
   simulators, the notice on node 1 only) against 1 node x 1 rank x 4 x ``--mb`` MB (the same bytes), both
   against one moto S3 server: from the notice first served to the global MANIFEST.json written (the
   daemon's ``store.committed``). Goal: multi-node / single <= 1.2.

Medians of ``--reps`` / ``--commit-reps`` runs. On this 2-core machine 4 ranks, 2 daemons and moto share two
cores, which the single process does not have to: say so when quoting the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spotd.tools.testing import LineReader, free_port, start_moto, wait_until  # noqa: E402

MB = 1024 * 1024
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- the torchrun worker (this file, run with _worker) ------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn

    from spotd.torch import Checkpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = nn.Module()
    # The rank's share of the state: float32 random bytes (nothing a server could compress).
    model.weight = nn.Parameter(
        torch.randn(max(1, args.mb * MB // 4), generator=torch.Generator().manual_seed(rank))
    )
    started: dict[str, float] = {}

    def on_save(info: Any) -> None:
        if info.reason != "periodic":
            started["save_began"] = time.time() - info.seconds

    ckpt = Checkpointer(model=model, every_steps=10**9, on_save=on_save)
    ckpt.restore()
    os.write(1, (json.dumps({"event": "started", "rank": rank}) + "\n").encode())
    pause_s = (args.step_ms + (args.skew_ms if rank % 2 else 0.0)) / 1000
    for step in range(10**6):
        time.sleep(pause_s)
        if ckpt.step(step):
            break
    line = {"event": "stopped", "rank": rank, "step": step + 1, "save_began": started.get("save_began")}
    os.write(1, (json.dumps(line) + "\n").encode())
    ckpt.close()
    return 0


# -- the harness ------------------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPOTD_")}
    e.update(CREDS)
    e.update(extra)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


class Daemon:
    def __init__(self, work: Path, name: str, imds_url: str, store_uri: str, endpoint: str = "") -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.socket = str(work / f"{name}.sock")
        cfg = work / f"{name}.toml"
        cfg.write_text(
            "\n".join(
                [
                    'job_id = "bench"',
                    f"checkpoint_dir = {json.dumps(str(self.dir))}",
                    "[imds]",
                    f"endpoint = {json.dumps(imds_url)}",
                    "poll_interval = 0.1",
                    "[socket]",
                    f"path = {json.dumps(self.socket)}",
                    "[store]",
                    f"uri = {json.dumps(store_uri)}",
                    f"endpoint_url = {json.dumps(endpoint)}",
                    "[metrics]",
                    f'listen = "127.0.0.1:{free_port()}"',
                    "[policy]",
                    "restore_on_start = false",
                    "[log]",
                    'format = "json"',
                    'level = "info"',
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spotd", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        self.logs = LineReader(self.proc.stderr)
        wait_until(
            lambda: self.logs.events("daemon.ready") or self.proc.poll() is not None,
            timeout_s=60,
            what="daemon.ready",
        )
        if self.proc.poll() is not None:
            raise SystemExit("spotd run exited:\n" + "\n".join(self.logs.lines[-30:]))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.logs.join()


def torchrun(
    socket: str, *, nproc: int, mb: int, step_ms: float, skew_ms: float, rdzv: list[str] | None = None
) -> tuple[subprocess.Popen[str], LineReader]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *(rdzv or ["--standalone"]),
            "--nproc-per-node",
            str(nproc),
            __file__,
            "_worker",
            "--mb",
            str(mb),
            "--step-ms",
            str(step_ms),
            "--skew-ms",
            str(skew_ms),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env(SPOTD_SOCKET=socket),
    )
    return proc, LineReader(proc.stdout)


def finish(runs: list[tuple[subprocess.Popen[str], LineReader]], *, ranks: int) -> list[dict[str, Any]]:
    for proc, out in runs:
        proc.wait(300)
        out.join()
    stopped = [e for _, out in runs for e in out.events("stopped")]
    if len(stopped) != ranks:
        raise SystemExit(f"expected {ranks} ranks to stop, got {stopped}")
    return stopped


def stop_latency(args: argparse.Namespace, work: Path) -> list[float]:
    from spotd.tools.simulator import SimulatorThread

    sim = SimulatorThread(port=0)
    sim.start()
    out: list[float] = []
    try:
        for rep in range(args.reps):
            sim.clear()
            d = Daemon(work, f"stop{rep}", sim.url, (work / "store").as_uri())
            try:
                run = torchrun(d.socket, nproc=2, mb=1, step_ms=args.step_ms, skew_ms=args.skew_ms)
                wait_until(lambda run=run: len(run[1].events("started")) == 2, timeout_s=120, what="2 ranks")
                time.sleep(random.uniform(0.5, 1.5))
                sim.arm_instance_action("terminate", after_s=0, lead_s=120)
                stopped = finish([run], ranks=2)
                (requested,) = d.logs.events("checkpoint.requested")
                latency = max(float(e["save_began"]) for e in stopped) - stamp(requested)
                out.append(latency)
                print(f"  stop rep {rep}: {latency * 1000:.1f} ms", file=sys.stderr)
            finally:
                d.close()
    finally:
        sim.close()
    return out


def commit_time(args: argparse.Namespace, work: Path, *, nodes: int, tag: str) -> float:
    """Notice first served on node 1 -> the global MANIFEST.json written (the daemon's store.committed)."""
    from spotd.tools.simulator import SimulatorThread

    sims = [SimulatorThread(port=0) for _ in range(nodes)]
    for sim in sims:
        sim.start()
    store = f"s3://bench/{tag}"
    daemons: list[Daemon] = []
    try:
        daemons = [Daemon(work, f"{tag}-n{i}", sim.url, store, args.endpoint) for i, sim in enumerate(sims)]
        if nodes == 1:
            runs = [torchrun(daemons[0].socket, nproc=1, mb=4 * args.mb, step_ms=args.step_ms, skew_ms=0)]
        else:
            rdzv = [
                "--nnodes",
                str(nodes),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{free_port()}",
            ]
            rdzv += ["--rdzv-id", tag]
            runs = [
                torchrun(d.socket, nproc=2, mb=args.mb, step_ms=args.step_ms, skew_ms=0, rdzv=rdzv)
                for d in daemons
            ]
        ranks = 1 if nodes == 1 else 2 * nodes
        wait_until(
            lambda: sum(len(out.events("started")) for _, out in runs) == ranks, timeout_s=300, what="ranks"
        )
        time.sleep(random.uniform(0.5, 1.0))
        sims[0].arm_instance_action("terminate", after_s=0, lead_s=120)
        finish(runs, ranks=ranks)
        served = float(sims[0].state()["notice_first_served_at"])
        commits = wait_until(
            lambda: [e for d in daemons for e in d.logs.events("store.committed")],
            timeout_s=120,
            what="commit",
        )
        return min(stamp(e) for e in commits) - served
    finally:
        for d in daemons:
            d.close()
        for sim in sims:
            sim.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="notices for the stop latency")
    parser.add_argument("--commit-reps", type=int, default=3, help="runs of each commit layout")
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--skew-ms", type=float, default=10.0, help="extra time per step on odd ranks")
    parser.add_argument("--mb", type=int, default=64, help="MB of state per rank of the 2x2 layout")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="spotd-multirank-"))
    moto, args.endpoint = start_moto(env=env())
    try:
        import boto3

        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        session.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket="bench")
        latencies = stop_latency(args, work)
        single, multi = [], []
        for rep in range(args.commit_reps):
            single.append(commit_time(args, work, nodes=1, tag=f"single{rep}"))
            multi.append(commit_time(args, work, nodes=2, tag=f"multi{rep}"))
            print(f"  commit rep {rep}: 1x1 {single[-1]:.2f} s, 2x2 {multi[-1]:.2f} s", file=sys.stderr)
    finally:
        moto.kill()
        moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    stop_ms = statistics.median(latencies) * 1000
    figures = {
        "stop_latency_median_ms": round(stop_ms, 1),
        "stop_latency_max_ms": round(max(latencies) * 1000, 1),
        "stop_goal_ms": args.step_ms + args.skew_ms + 20,
        "commit_1x1_s": round(statistics.median(single), 2),
        "commit_2x2_s": round(statistics.median(multi), 2),
        "ratio_2x2_to_1x1": round(statistics.median(multi) / statistics.median(single), 2),
        "bytes_each": 4 * args.mb * MB,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--mb", type=int, required=True)
        p.add_argument("--step-ms", type=float, required=True)
        p.add_argument("--skew-ms", type=float, required=True)
        sys.exit(worker(p.parse_args(sys.argv[2:])))
    sys.exit(main())
