"""``spotd demo``: the whole story on this machine, nothing to configure.

An IMDS simulator, an S3-compatible server on loopback (moto's server mode), the daemon and the example
PyTorch trainer. A spot interruption arrives mid-training; the emergency checkpoint goes to S3; then a
"replacement instance" (a new daemon with an empty disk) restores it and training resumes. Ends with a
table and exits 0 only if no step was lost and the final weights equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spotd.errors import EXIT_FAILURE, EXIT_OK
from spotd.tools.testing import LineReader, start_moto

__all__ = ["add_arguments", "main"]

BUCKET = "spotd-demo"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument(
        "--step-sleep", type=float, default=0.02, help="seconds per step, to give time to watch"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="choose the interruption step (default: random)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument(
        "--workdir", default=None, help="directory for the demo's files (default: a temp dir)"
    )


class _Say:
    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:5.1f}s] {text}", flush=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTD_")}
    env.update(
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _write_config(path: Path, *, imds: str, sock: str, ckpt: Path, s3: str) -> None:
    path.write_text(
        f'job_id = "demo"\ncheckpoint_dir = "{ckpt}"\n'
        f'[imds]\nendpoint = "{imds}"\npoll_interval = 0.25\ntimeout = 0.5\n'
        f'[socket]\npath = "{sock}"\n'
        f'[store]\nuri = "s3://{BUCKET}/runs"\nendpoint_url = "{s3}"\nregion = "us-east-1"\n'
        f'[metrics]\nlisten = "127.0.0.1:0"\n'
        f"[policy]\ndeadline_margin = 10.0\nshutdown_grace = 10.0\n"
        f'[log]\nformat = "json"\nlevel = "info"\n'
    )


def _start_daemon(config: Path) -> tuple[subprocess.Popen[str], LineReader]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotd", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stderr is not None
    logs = LineReader(proc.stderr)
    logs.wait(
        lambda ev: any(e["event"] == "daemon.ready" for e in ev) or proc.poll() is not None,
        timeout_s=60,
        what="the daemon to be ready",
    )
    if proc.poll() is not None:
        raise RuntimeError("the daemon exited:\n" + "\n".join(logs.lines[-20:]))
    return proc, logs


def _start_trainer(
    args: argparse.Namespace, *, sock: str, ckpt: Path, out: Path, no_daemon: bool = False
) -> tuple[subprocess.Popen[str], LineReader]:
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "--steps",
        str(args.steps),
        "--every-steps",
        "100",
        "--checkpoint-dir",
        str(ckpt),
        "--out",
        str(out),
        "--seed",
        "0",
    ]
    if no_daemon:
        cmd += ["--no-daemon"]
    else:
        cmd += ["--step-sleep", str(args.step_sleep)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(SPOTD_SOCKET=sock)
    )
    assert proc.stdout is not None and proc.stderr is not None
    LineReader(proc.stderr)  # drained so a chatty trainer never blocks
    return proc, LineReader(proc.stdout)


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _same_state(a: Path, b: Path) -> bool:
    import torch

    x = torch.load(a, weights_only=True)
    y = torch.load(b, weights_only=True)

    def equal(p: Any, q: Any) -> bool:
        if isinstance(p, torch.Tensor):
            return isinstance(q, torch.Tensor) and p.dtype == q.dtype and torch.equal(p, q)
        if isinstance(p, dict):
            return isinstance(q, dict) and p.keys() == q.keys() and all(equal(p[k], q[k]) for k in p)
        if isinstance(p, list | tuple):
            return isinstance(q, list | tuple) and len(p) == len(q) and all(map(equal, p, q))
        return bool(p == q)

    return equal(x["model"], y["model"]) and equal(x["optimizer"], y["optimizer"])


def main(args: argparse.Namespace) -> int:
    try:
        import moto  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(
            f"spotd demo needs torch and moto: {exc}. Run scripts/demo, or pip install 'spotd[demo]' "
            "'torch==2.13.0'",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if not EXAMPLE.exists():
        print(f"spotd demo needs {EXAMPLE}: run it from a checkout of the spotd repository", file=sys.stderr)
        return EXIT_FAILURE
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="spotd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _demo(args, work)
    except (TimeoutError, RuntimeError) as exc:
        print(f"spotd demo failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if args.keep or args.workdir:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _demo(args: argparse.Namespace, work: Path) -> int:
    import boto3

    from spotd.tools.simulator import SimulatorThread

    say = _Say()
    rng = random.Random(args.seed)
    delay = rng.uniform(0.2, 0.5) * max(0, args.steps - 100) * args.step_sleep
    procs: list[subprocess.Popen[Any]] = []
    cleanup: list[Path] = []
    try:
        say("reference: the same job, uninterrupted, to compare the final weights with")
        ref_proc, _ = _start_trainer(
            args, sock="/nonexistent", ckpt=work / "reference", out=work / "ref.pt", no_daemon=True
        )
        procs.append(ref_proc)
        s3, s3_url = start_moto(env=_env())
        procs.append(s3)
        boto3.client(
            "s3",
            endpoint_url=s3_url,
            region_name="us-east-1",
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
        ).create_bucket(Bucket=BUCKET)
        say(f"S3 server (moto) on {s3_url}, bucket s3://{BUCKET}")
        if ref_proc.wait(120) != 0:
            raise RuntimeError("the reference training run failed")
        with SimulatorThread() as sim:
            say(f"IMDS simulator on {sim.url}")
            # Unix socket paths hold 107 bytes; a temp dir under /tmp keeps it short.
            sock_dir = Path(tempfile.mkdtemp(prefix="spotd-", dir="/tmp"))
            cleanup.append(sock_dir)
            sock = str(sock_dir / "spotd.sock")
            cfg = work / "spotd.toml"

            # -- instance 1 --------------------------------------------------------------------------------
            ckpt1 = work / "instance-1"
            _write_config(cfg, imds=sim.url, sock=sock, ckpt=ckpt1, s3=s3_url)
            d1, logs1 = _start_daemon(cfg)
            procs.append(d1)
            say(f"instance 1: spotd running; training {args.steps} steps, periodic checkpoint every 100")
            t1, out1 = _start_trainer(args, sock=sock, ckpt=ckpt1, out=work / "unused.pt")
            procs.append(t1)
            out1.wait(
                lambda ev: [e for e in ev if e["event"] == "started"], timeout_s=60, what="training start"
            )
            first = out1.wait(
                lambda ev: [e for e in ev if e["event"] in ("saved", "stopped", "finished")],
                timeout_s=120,
                what="the first periodic checkpoint",
            )[0]
            if first["event"] != "saved":
                raise RuntimeError("training ended before its first checkpoint; use more --steps")
            logs1.wait(
                lambda ev: [e for e in ev if e["event"] == "checkpoint.durable"],
                timeout_s=60,
                what="the periodic checkpoint to reach S3",
            )
            say(f"periodic checkpoint at step {first['step']} uploaded to S3 in the background")
            # A random moment after it: the emergency checkpoint must carry the steps since.
            time.sleep(delay)
            say("EC2: spot interruption notice (terminate in 2 minutes)")
            sim.arm_instance_action("terminate", after_s=0, lead_s=120)
            stopped = out1.wait(
                lambda ev: [e for e in ev if e["event"] in ("stopped", "finished")],
                timeout_s=60,
                what="the trainer to stop",
            )[0]
            if stopped["event"] != "stopped":
                raise RuntimeError("training finished before the interruption; use more --steps")
            handled = logs1.wait(
                lambda ev: [e for e in ev if e["event"] == "interruption.handled"],
                timeout_s=60,
                what="the interruption to be handled",
            )[0]
            say(
                f"trainer saved at step {stopped['step']} and stopped; checkpoint durable in S3 "
                f"({handled['bytes']} bytes, notice→durable {handled['notice_to_durable_seconds']:.2f} s)"
            )
            t1.wait(30)
            _stop(d1)
            say("instance 1 terminated: its disk is gone")

            # -- instance 2 --------------------------------------------------------------------------------
            sim.clear()
            ckpt2 = work / "instance-2"
            _write_config(cfg, imds=sim.url, sock=sock, ckpt=ckpt2, s3=s3_url)
            d2, logs2 = _start_daemon(cfg)
            procs.append(d2)
            restored = [e for e in logs2.events() if e["event"] == "restore.done"]
            if not restored:
                raise RuntimeError("the replacement instance restored nothing")
            r = restored[0]
            say(
                f"instance 2: spotd restored {r['name']} ({r['bytes']} bytes, verified) "
                f"in {r['seconds']:.2f} s"
            )
            t2, out2 = _start_trainer(args, sock=sock, ckpt=ckpt2, out=work / "resumed.pt")
            procs.append(t2)
            start2 = out2.wait(
                lambda ev: [e for e in ev if e["event"] == "started"], timeout_s=60, what="training to resume"
            )[0]
            say(f"training resumed at step {start2['step']}")
            fin = out2.wait(
                lambda ev: [e for e in ev if e["event"] == "finished"],
                timeout_s=300,
                what="training to finish",
            )[0]
            t2.wait(30)
            _stop(d2)
            say(f"training finished at step {fin['step']}")
        identical = _same_state(work / "ref.pt", work / "resumed.pt")
        lost = stopped["step"] - start2["step"]
        rows = [
            ("IMDS polling interval (longest wait to see it)", "0.250 s"),
            ("detection (notice seen → trainer asked)", f"{handled['detect_seconds'] * 1000:.1f} ms"),
            ("checkpoint (asked → saved)", f"{handled['checkpoint_seconds']:.3f} s"),
            ("upload (saved → committed in S3)", f"{handled['upload_seconds']:.3f} s"),
            ("notice seen → durable", f"{handled['notice_to_durable_seconds']:.3f} s"),
            ("checkpoint bytes", f"{handled['bytes']:,}"),
            ("restore on the new instance", f"{r['seconds']:.3f} s"),
            ("steps done before the interruption", str(stopped["step"])),
            ("step resumed from", str(start2["step"])),
            ("lost steps", str(lost)),
            ("final weights = uninterrupted run", "yes, bit for bit" if identical else "NO"),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
        print()
        ok = lost == 0 and identical and not handled["lost"]
        print("nothing was lost." if ok else "WORK WAS LOST: see above.")
        return EXIT_OK if ok else EXIT_FAILURE
    finally:
        for proc in reversed(procs):
            _stop(proc, 10)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
