"""Training step time while spotd uploads a periodic checkpoint in the background, on this machine's cores.

    .venv/bin/python bench/background.py [--size-mb 256] [--reps 3] [--step-ms 50] [--rate 50MB]
                                         [--placement shared|pinned|both] [--configs plain,nice,...]
                                         [--json-out FILE]

A real torch training loop (CPU, an MLP whose batch is sized to --step-ms per step) runs in this process; an
uploader subprocess (spotd's S3Store, as the daemon runs it: Nice=-5 when permitted, like spotd.service)
commits a --size-mb checkpoint at BACKGROUND priority to moto's S3 server on loopback each time it is told
to. For every configuration and repetition the loop's step times are taken while one upload runs, and the
median step is compared with the median step of the loop alone just before it (the machine's other load
moves both alike), and so is the share of time the loop's threads waited for a core (the scheduler's
run_delay: the part of the slowdown the upload's CPU causes, free of the VM's speed swings):

* ``alone``: no upload (measured right before every upload);
* ``plain``: background threads as nice as the daemon, no cap (what spotd did before item 5);
* ``default``: what spotd does unconfigured: threads at nice 0 (``store.background_nice``: as nice as a
  trainer started plainly, below the daemon's -5), giving way to the training loop's process
  (``store.yield_to_trainer = 0.05``: fewer parts at once while the loop waits for a core);
* ``noyield``: at nice 0 without giving way (``store.yield_to_trainer = 0``: spotd's default before it);
* ``nice5``: at nice 5 (10 nicer than the daemon: spotd's default before item 5 was worked);
* ``nice``: at nice 19 (``store.background_nice = 19``), no cap;
* ``cap``: as nice as the daemon, and ``store.background_rate = --rate``;
* ``nice+cap``: at nice 19 and ``store.background_rate = --rate``;
* ``idle``: SCHED_IDLE (``store.background_nice = "idle"``; not in the default --configs: pinned to the
  loop's core it waits for the loop, which never rests, and one upload takes minutes).

Beside the step time it prints how late the uploader's own event loop woke during the upload (the daemon's
loop polls IMDS, answers trainers and pings the systemd watchdog).

moto is the S3 server here and a remote one in production: it runs at nice 19 so that the figure is mostly
the client's cost, and its CPU seconds are printed. Prints medians and each one's ratio to ``alone``.

Where the processes run (``--placement``):

* ``shared``: everything may run on every core (the OS decides). moto (about 4x the uploader's CPU) and the
  loopback TCP compete with the training loop: what a machine that is also the S3 server would see.
* ``pinned``: moto on one core, the training loop (``torch.set_num_threads(1)``, its batch sized again to
  --step-ms under that pinning) and the uploader on another, and ``alone`` measured under the same pinning:
  the ratio is what the client costs the training, as on an instance whose S3 server is remote.
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

from benchlib import (  # noqa: E402
    AWS_ENV,
    MB,
    commit_info,
    finish,
    median,
    new_doc,
    pin,
    proc_cpu,
    progress,
    report_table,
    verdict,
)

from spotd.tools.testing import LineReader, start_moto  # noqa: E402

BUCKET = "bench"
CONFIGS = ("plain", "default", "noyield", "nice5", "nice", "cap", "nice+cap", "idle")
DEFAULT_CONFIGS = "plain,default,noyield,nice,cap"
PLACEMENTS = {"shared": ("shared",), "pinned": ("pinned",), "both": ("shared", "pinned")}


def env() -> dict[str, str]:
    return {**os.environ, **AWS_ENV, "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------------ the uploader


def uploader_main(argv: list[str]) -> int:
    """One S3Store; every "go <config>" line on stdin commits the checkpoint once, BACKGROUND priority."""
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--size-mb", type=int, required=True)
    p.add_argument("--rate", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--trainer-pid", type=int, required=True)
    args = p.parse_args(argv)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -5)  # spotd.service's Nice=-5
        daemon_nice = -5
    except OSError:
        daemon_nice = os.getpriority(os.PRIO_PROCESS, 0)
    from spotd.config import parse_rate
    from spotd.store.pacing import BACKGROUND_IDLE, BACKGROUND_NICE, CoreWait, Niceness
    from spotd.store.s3 import S3Store
    from spotd.store.trainer_yield import YIELD_SLOWDOWN

    ckdir = Path(args.work) / "ckpt"
    (ckdir / "model").mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MB)
    with open(ckdir / "model" / "model.pt", "wb") as fh:
        for _ in range(max(1, args.size_mb // 16)):
            fh.write(block)
    rate = parse_rate(args.rate)

    async def run() -> None:
        # (nice, rate, yield) of every configuration; "default" is what spotd does unconfigured.
        settings: dict[str, tuple[Niceness | None, int | None, float | None]] = {
            "plain": (None, None, None),
            "default": (BACKGROUND_NICE, None, YIELD_SLOWDOWN),
            "noyield": (BACKGROUND_NICE, None, None),
            "nice5": (5, None, None),
            "nice": (19, None, None),
            "nice+cap": (19, rate, None),
            "cap": (None, rate, None),
            "idle": (BACKGROUND_IDLE, None, None),
        }
        stores = {
            name: S3Store(
                uri=f"s3://{BUCKET}/{name.replace('+', '-')}",
                job_id="bg",
                endpoint_url=args.endpoint,
                background_nice=nice,
                background_rate=cap,
                yield_to_trainer=yield_to,
            )
            for name, (nice, cap, yield_to) in settings.items()
        }
        print(json.dumps({"event": "ready", "daemon_nice": daemon_nice}), flush=True)
        step = 0
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            verb, config = line.split()
            store = stores[config]
            if verb == "mark":
                # As the daemon does when the trainer connects: what it waits from now on is its wait
                # alone (the other configurations' uploads, in between here, are not its baseline).
                store.set_trainers(())
                store.set_trainers((args.trainer_pid,))
                continue
            step += 1
            # A new file each time: unchanged-file detection would otherwise copy it server-side.
            await asyncio.to_thread(_touch, ckdir / "model" / "model.pt")
            started, cpu0, waited0 = time.monotonic(), _self_cpu(), store.core_wait_totals()
            yielded0 = store.yielded_seconds()
            info = commit_info(step, final=False, job_id="bg", reason="periodic")
            lags: list[float] = []
            ticker = asyncio.ensure_future(_tick(lags))
            try:
                await store.commit(ckdir / "model", checkpoint_dir=ckdir, info=info)
            finally:
                ticker.cancel()
            estimate = store.estimate_seconds(args.size_mb * MB)
            lags.sort()
            print(
                json.dumps(
                    {
                        "event": "done",
                        "config": config,
                        "seconds": time.monotonic() - started,
                        "cpu": _self_cpu() - cpu0,
                        # What the deadline estimate would use: the moving median of this store's uploads,
                        # their threads' wait for a core left out.
                        "core_wait": CoreWait.share(waited0, store.core_wait_totals()),
                        "yielded": CoreWait.share(
                            (waited0[0], yielded0), (store.core_wait_totals()[0], store.yielded_seconds())
                        ),
                        "estimate_mbps": None if estimate is None else args.size_mb / estimate,
                        "loop_lag_p99": lags[int(len(lags) * 0.99)] if lags else 0.0,
                        "loop_lag_max": lags[-1] if lags else 0.0,
                    }
                ),
                flush=True,
            )
        for store in stores.values():
            await store.close()

    asyncio.run(run())
    return 0


#: How often the uploader's event loop is asked to wake during a commit (its lateness is the lag).
TICK_S = 0.05


async def _tick(lags: list[float]) -> None:
    """How late the event loop wakes from a TICK_S sleep, for ever: the daemon's loop polls IMDS and answers
    trainers, and a background thread that holds the GIL while it waits for a core holds the loop too."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, loop.time() - t - TICK_S))


def _touch(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(os.urandom(4096))


def run_delay() -> float:
    """Seconds this process's threads have spent runnable but waiting for a core, summed: the second field
    of /proc/<tid>/schedstat (run_delay, kept whether or not the schedstats sysctl is on)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass  # a thread that ended meanwhile
    return total / 1e9


class Window:
    """Wall time and run-queue wait over a span of steps: ``wait`` is the share of the span the loop's
    threads spent ready to run but without a core (what another process's CPU costs the loop)."""

    __slots__ = ("_delay0", "_t0", "wait")

    def __enter__(self) -> Window:
        self._t0, self._delay0 = time.perf_counter(), run_delay()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait = (run_delay() - self._delay0) / max(time.perf_counter() - self._t0, 1e-9)


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

    def steps_while(self, busy: LineReader, seen: int, uploader: subprocess.Popen[str]) -> list[float]:
        """Steps until the uploader says its commit is done (its ``seen``-th "done" line); SystemExit with
        its last words if it exits first (a failed upload must not leave the loop running forever)."""
        times = []
        while len(busy.events("done")) < seen:
            if uploader.poll() is not None:
                raise SystemExit(f"the uploader exited ({uploader.returncode}) before its commit was done")
            times.append(self.step())
        return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="MB of the checkpoint uploaded")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every configuration; medians")
    parser.add_argument("--step-ms", type=float, default=50.0, help="target training step, milliseconds")
    parser.add_argument("--rate", default="50MB", help="store.background_rate of the cap and nice+cap runs")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated, of {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS})",
    )
    parser.add_argument("--batch", type=int, default=0, help="fixed batch size (default: sized to --step-ms)")
    parser.add_argument("--alone-steps", type=int, default=40, help="steps of the loop alone per repetition")
    parser.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="shared",
        help="shared: every process on every core; pinned: the S3 server on one core, the training loop "
        "(one torch thread) and the uploader on another; both: each in turn",
    )
    parser.add_argument("--json", action="store_true", help="also print every repetition as JSON lines")
    parser.add_argument("--json-out", type=Path, help="also write every repetition as JSON to this file")
    args = parser.parse_args(argv)
    if args.size_mb < 16 or args.reps < 1 or args.step_ms <= 0:
        parser.error("--size-mb at least 16, --reps at least 1, --step-ms > 0")
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    if not configs or set(configs) - set(CONFIGS):
        parser.error(f"--configs {args.configs!r}: choose from {', '.join(CONFIGS)}")
    cores = sorted(os.sched_getaffinity(0))
    placements = PLACEMENTS[args.placement]
    if "pinned" in placements and len(cores) < 2:
        parser.error(f"--placement {args.placement} needs 2 cores; this process may use {cores}")
    doc = new_doc("background", args, argv)
    work = Path(tempfile.mkdtemp(prefix="spotd-bg-"))
    moto, endpoint = start_moto(env=env())
    os.setpriority(os.PRIO_PROCESS, moto.pid, 19)
    import boto3
    import torch

    s3 = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)
    cmd = [sys.executable, __file__, "_upload", "--endpoint", endpoint, "--size-mb", str(args.size_mb)]
    cmd += ["--rate", args.rate, "--work", str(work), "--trainer-pid", str(os.getpid())]
    up = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    assert up.stdin is not None and up.stdout is not None
    lines = LineReader(up.stdout)
    threads = torch.get_num_threads()

    def place(placement: str) -> None:
        if placement == "pinned":
            server_core, client_core = {cores[0]}, {cores[1]}
            doc["pinning"] = {"server": sorted(server_core), "trainer_and_uploader": sorted(client_core)}
        else:
            server_core = client_core = set(cores)
        pin(moto.pid, server_core)
        pin(up.pid, client_core)
        pin(os.getpid(), client_core)
        torch.set_num_threads(1 if placement == "pinned" else threads)

    try:
        (ready,) = lines.wait(
            lambda e: [x for x in e if x.get("event") == "ready"], timeout_s=60, what="ready"
        )
        doc["uploader_nice"] = ready["daemon_nice"]
        trainers = {}
        for placement in placements:
            place(placement)
            trainers[placement] = Trainer(args.step_ms, args.batch)
        doc["batch"] = {p: t.n for p, t in trainers.items()}
        doc["torch_threads"] = {p: 1 if p == "pinned" else threads for p in placements}
        done = 0
        for rep in range(args.reps):
            for placement in placements if rep % 2 == 0 else placements[::-1]:
                place(placement)
                trainer = trainers[placement]
                # Rotate the order so moto's growing bucket and the page cache favour no configuration.
                turn = rep % len(configs)
                for config in configs[turn:] + configs[:turn]:
                    what = f"background: {placement} {config} rep {rep + 1}/{args.reps}"
                    progress(f"{what} started")
                    up.stdin.write(f"mark {config}\n")
                    up.stdin.flush()
                    # The loop alone right before each upload: the machine's other load moves both alike.
                    with Window() as quiet:
                        alone = statistics.median(trainer.steps_for(args.alone_steps))
                    moto_cpu = proc_cpu(moto.pid)
                    up.stdin.write(f"go {config}\n")
                    up.stdin.flush()
                    done += 1
                    with Window() as busy:
                        times = trainer.steps_while(lines, done, up)
                    result = lines.events("done")[done - 1]
                    step = statistics.median(times) if times else float("nan")
                    row = {
                        "rep": rep,
                        "placement": placement,
                        "config": config,
                        "alone_step": alone,
                        "step": step,
                        "ratio": step / alone,
                        "alone_wait": quiet.wait,
                        "wait": busy.wait,
                        # The step's slowdown that waiting for a core explains: on-CPU share alone / during.
                        "wait_ratio": (1 - quiet.wait) / max(1 - busy.wait, 1e-9),
                        "steps": len(times),
                        "upload_s": result["seconds"],
                        "upload_cpu": result["cpu"],
                        "core_wait": result["core_wait"],
                        "yielded": result["yielded"],
                        "estimate_mbps": result["estimate_mbps"],
                        "loop_lag_p99": result["loop_lag_p99"],
                        "loop_lag_max": result["loop_lag_max"],
                        "moto_cpu": proc_cpu(moto.pid) - moto_cpu,
                    }
                    doc["rows"].append(row)
                    progress(
                        f"{what} done: ratio {row['ratio']:.3f}, waiting for a core {quiet.wait:.1%} alone, "
                        f"{busy.wait:.1%} during; upload {row['upload_s']:.1f} s; event loop late up to "
                        f"{row['loop_lag_max'] * 1000:.0f} ms"
                    )
                    if args.json:
                        print(json.dumps(row))
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
    return finish(doc, report, args.json_out)


def report(doc: dict[str, Any]) -> str:
    """Medians per placement and configuration; ratio to the loop alone beside the goal (<= 5 % slower)."""
    params = doc["params"]
    out = []
    for placement in dict.fromkeys(r["placement"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["placement"] == placement]
        for config in CONFIGS:
            got = [r for r in rows if r["config"] == config]
            if not got:
                continue
            upload_s = median(got, "upload_s")
            out.append(
                [
                    placement,
                    config,
                    median(got, "alone_step") * 1000,
                    median(got, "step") * 1000,
                    verdict(median(got, "ratio"), 1.05),
                    f"{median(got, 'alone_wait'):.1%} / {median(got, 'wait'):.1%}",
                    verdict(median(got, "wait_ratio"), 1.05),
                    f"{median(got, 'steps'):.0f}",
                    upload_s,
                    f"{params['size_mb'] / upload_s:.0f}",
                    f"{median(got, 'core_wait'):.0%}",
                    f"{median(got, 'yielded'):.0%}",
                    f"{median(got, 'estimate_mbps'):.0f}",
                    f"{median(got, 'loop_lag_p99') * 1000:.0f} / {median(got, 'loop_lag_max') * 1000:.0f}",
                    median(got, "upload_cpu"),
                    median(got, "moto_cpu"),
                ]
            )
    header = [
        "placement",
        "config",
        "step ms alone",
        "step ms during upload",
        "ratio to alone (goal <= 1.05)",
        "waiting for a core, alone / during",
        "on-CPU share ratio (goal <= 1.05)",
        "steps",
        "upload s",
        "MB/s",
        "upload threads waiting for a core",
        "upload threads giving way",
        "MB/s the deadline estimate uses",
        "uploader's event loop late, p99 / max ms",
        "uploader CPU s",
        "moto CPU s",
    ]
    pinning = doc.get("pinning")
    pinned = (
        f"moto on core {pinning['server']}, the loop (1 torch thread) and the uploader on core "
        f"{pinning['trainer_and_uploader']}: what the client costs the training"
        if pinning
        else "not run"
    )
    intro = (
        f"Training step while one {params['size_mb']} MB background upload runs, medians of "
        f"{params['reps']}; "
        "ratio = median step during the upload / median step of the loop alone just before it (per "
        "repetition, then the median of those ratios). plain = "
        "background threads as nice as the daemon; default = at nice 0, giving way to the loop (spotd's "
        "default); noyield = at nice 0 without giving way; nice5 / nice = "
        "at nice 5 / 19; idle = SCHED_IDLE; cap = plain + store.background_rate, nice+cap = nice 19 + it, at "
        f"{params['rate']}. shared = every process on every core (moto, at nice "
        f"19, competes with the loop); pinned = {pinned}. Batch {doc['batch']}, torch threads "
        f"{doc['torch_threads']}, uploader nice {doc['uploader_nice']}. Waiting for a core = the share "
        "of the loop's time its threads were runnable without a core (run_delay in /proc/<tid>/schedstat); "
        "on-CPU share ratio = (1 - waiting alone) / (1 - waiting during): the slowdown the upload's CPU "
        "explains, which the VM's own speed swings (the step ratio's noise) do not move. Upload threads "
        "waiting = the share of the background transfer threads' time they were runnable without a core; "
        "giving way = the share they were held back while the loop waited for a core "
        "(store.yield_to_trainer); "
        "MB/s the deadline estimate uses = the store's moving median after the upload, that wait left out "
        "(compare with plain's MB/s: an emergency upload runs at the daemon's priority). Event loop late = "
        f"how late the uploader's asyncio loop woke from {TICK_S * 1000:.0f} ms sleeps during the upload "
        "(the daemon's loop polls IMDS and answers trainers; a background thread that holds the GIL while it "
        "waits for a core holds the loop up with it)."
    )
    return report_table(intro, header, out, doc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upload":
        sys.exit(uploader_main(sys.argv[2:]))
    sys.exit(main())
