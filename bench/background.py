"""Training step time while spotd uploads a periodic checkpoint in the background, on this machine's cores.

    .venv/bin/python bench/background.py [--size-mb 256] [--reps 3] [--step-ms 50] [--rate 50MB]

A real torch training loop (CPU, an MLP whose batch is sized to --step-ms per step) runs in this process; an
uploader subprocess (spotd's S3Store, as the daemon runs it: Nice=-5 when permitted, like spotd.service)
commits a --size-mb checkpoint at BACKGROUND priority to moto's S3 server on loopback each time it is told
to. For every configuration and repetition the loop's step times are taken while one upload runs, and the
median step is compared with the median step of the loop alone just before it (the machine's other load
moves both alike):

* ``alone``: no upload (measured right before every upload);
* ``plain``: background threads as nice as the daemon, no cap (what spotd did before item 5);
* ``nice``: background threads reniced (spotd's default now), no cap;
* ``nice+cap``: reniced and ``store.background_rate = --rate``.

moto is the S3 server here and a remote one in production: it runs at nice 19 so that the figure is mostly
the client's cost, and its CPU seconds are printed. Prints medians and each one's ratio to ``alone``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spotd.tools.testing import LineReader, start_moto  # noqa: E402

BUCKET = "bench"
MB = 1024 * 1024
CONFIGS = ("plain", "nice", "nice+cap")


def env() -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": str(ROOT),
    }


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ the uploader


def uploader_main(argv: list[str]) -> int:
    """One S3Store; every "go <config>" line on stdin commits the checkpoint once, BACKGROUND priority."""
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--size-mb", type=int, required=True)
    p.add_argument("--rate", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -5)  # spotd.service's Nice=-5
        daemon_nice = -5
    except OSError:
        daemon_nice = os.getpriority(os.PRIO_PROCESS, 0)
    from spotd.config import parse_rate
    from spotd.store import CommitInfo
    from spotd.store.pacing import BACKGROUND_NICE
    from spotd.store.s3 import S3Store

    ckdir = Path(args.work) / "ckpt"
    (ckdir / "model").mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MB)
    with open(ckdir / "model" / "model.pt", "wb") as fh:
        for _ in range(max(1, args.size_mb // 16)):
            fh.write(block)
    rate = parse_rate(args.rate)

    async def run() -> None:
        stores = {
            "plain": S3Store(
                uri=f"s3://{BUCKET}/plain", job_id="bg", endpoint_url=args.endpoint, background_nice=0
            ),
            "nice": S3Store(
                uri=f"s3://{BUCKET}/nice",
                job_id="bg",
                endpoint_url=args.endpoint,
                background_nice=BACKGROUND_NICE,
            ),
            "nice+cap": S3Store(
                uri=f"s3://{BUCKET}/cap",
                job_id="bg",
                endpoint_url=args.endpoint,
                background_rate=rate,
                background_nice=BACKGROUND_NICE,
            ),
        }
        print(json.dumps({"event": "ready", "daemon_nice": daemon_nice}), flush=True)
        step = 0
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            config = line.split()[1]
            step += 1
            # A new file each time: unchanged-file detection would otherwise copy it server-side.
            await asyncio.to_thread(_touch, ckdir / "model" / "model.pt")
            started, cpu0 = time.monotonic(), _self_cpu()
            info = CommitInfo(
                job_id="bg",
                step=step,
                trainer="bench",
                rank=None,
                world_size=None,
                request_id=None,
                reason="periodic",
                instance_id="i-bench",
                final=False,
            )
            await stores[config].commit(ckdir / "model", checkpoint_dir=ckdir, info=info)
            print(
                json.dumps(
                    {
                        "event": "done",
                        "config": config,
                        "seconds": time.monotonic() - started,
                        "cpu": _self_cpu() - cpu0,
                    }
                ),
                flush=True,
            )
        for store in stores.values():
            await store.close()

    asyncio.run(run())
    return 0


def _touch(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(os.urandom(4096))


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------ the trainer


class Trainer:
    """A small MLP trained on random data, its batch sized so one step takes about ``step_ms``."""

    def __init__(self, step_ms: float, batch: int = 0) -> None:
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.model = torch.nn.Sequential(
            torch.nn.Linear(1024, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 1024),
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.batch(64)
        for _ in range(5):
            self.step()
        if batch:
            self.batch(batch)
            return
        probe = statistics.median(self.step() for _ in range(20))
        self.batch(max(8, round(64 * step_ms / 1000 / probe)))

    def batch(self, n: int) -> None:
        self.n = n
        self.x = self.torch.randn(n, 1024)
        self.y = self.torch.randn(n, 1024)

    def step(self) -> float:
        started = time.perf_counter()
        self.opt.zero_grad()
        loss = ((self.model(self.x) - self.y) ** 2).mean()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - started

    def steps_for(self, count: int) -> list[float]:
        return [self.step() for _ in range(count)]

    def steps_while(self, busy: LineReader, seen: int) -> list[float]:
        """Steps until the uploader says its commit is done (its ``seen``-th "done" line)."""
        times = []
        while len(busy.events("done")) < seen:
            times.append(self.step())
        return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="MB of the checkpoint uploaded")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=50.0, help="target training step, milliseconds")
    parser.add_argument("--rate", default="50MB", help="store.background_rate of the nice+cap runs")
    parser.add_argument("--batch", type=int, default=0, help="fixed batch size (default: sized to --step-ms)")
    parser.add_argument("--alone-steps", type=int, default=40, help="steps of the loop alone per repetition")
    parser.add_argument("--json", action="store_true", help="also print every repetition as JSON")
    args = parser.parse_args(argv)
    if args.size_mb < 16 or args.reps < 1 or args.step_ms <= 0:
        parser.error("--size-mb at least 16, --reps at least 1, --step-ms > 0")
    work = Path(tempfile.mkdtemp(prefix="spotd-bg-"))
    moto, endpoint = start_moto(env=env())
    os.setpriority(os.PRIO_PROCESS, moto.pid, 19)
    import boto3

    s3 = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)
    cmd = [sys.executable, __file__, "_upload", "--endpoint", endpoint, "--size-mb", str(args.size_mb)]
    cmd += ["--rate", args.rate, "--work", str(work)]
    up = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    assert up.stdin is not None and up.stdout is not None
    lines = LineReader(up.stdout)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in ("alone", *CONFIGS)}
    try:
        (ready,) = lines.wait(
            lambda e: [x for x in e if x.get("event") == "ready"], timeout_s=60, what="ready"
        )
        load_before = os.getloadavg()[0]
        trainer = Trainer(args.step_ms, args.batch)
        done = 0
        for rep in range(args.reps):
            # Rotate the order so moto's growing bucket and the page cache favour no configuration.
            order = CONFIGS[rep % 3 :] + CONFIGS[: rep % 3]
            for config in order:
                # The loop alone right before each upload: the machine's other load moves both alike.
                alone = statistics.median(trainer.steps_for(args.alone_steps))
                rows["alone"].append({"step": alone})
                moto_cpu = cpu_of(moto.pid)
                up.stdin.write(f"go {config}\n")
                up.stdin.flush()
                done += 1
                times = trainer.steps_while(lines, done)
                result = lines.events("done")[done - 1]
                step = statistics.median(times) if times else float("nan")
                rows[config].append(
                    {
                        "step": step,
                        "ratio": step / alone,
                        "steps": len(times),
                        "upload_s": result["seconds"],
                        "upload_cpu": result["cpu"],
                        "moto_cpu": cpu_of(moto.pid) - moto_cpu,
                    }
                )
            if args.json:
                print(json.dumps({"rep": rep, **{c: r[-1] for c, r in rows.items()}}))
    finally:
        up.stdin.close()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        moto.kill()
        moto.wait(10)
        s3.close()
        shutil.rmtree(work, ignore_errors=True)

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[config])

    alone = med("alone", "step")
    print(
        f"\nmedians of {args.reps} repetitions; {os.cpu_count()} cores; batch {trainer.n}; "
        f"{args.size_mb} MB per upload; cap {args.rate}/s; uploader nice {ready['daemon_nice']}, "
        f"moto nice 19; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'config':>9} {'step ms':>8} {'ratio':>6} {'steps':>6} {'upload s':>9} {'MB/s':>6} "
        f"{'cpu s':>6} {'moto cpu':>8}"
    )
    print(f"{'alone':>9} {alone * 1000:>8.1f} {1.0:>6.3f}")
    for config in CONFIGS:
        step, upload_s = med(config, "step"), med(config, "upload_s")
        print(
            f"{config:>9} {step * 1000:>8.1f} {med(config, 'ratio'):>6.3f} {med(config, 'steps'):>6.0f} "
            f"{upload_s:>9.2f} {args.size_mb / upload_s:>6.0f} {med(config, 'upload_cpu'):>6.2f} "
            f"{med(config, 'moto_cpu'):>8.2f}"
        )
    print(
        "step ms: median training step while one upload runs; ratio: median over repetitions of that step "
        "against the loop alone just before it; "
        "cpu s: the uploader's CPU seconds for one upload; moto cpu: the S3 server's."
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upload":
        sys.exit(uploader_main(sys.argv[2:]))
    sys.exit(main())
