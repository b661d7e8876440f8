"""End to end: spot notice served -> checkpoint durable in S3, spotd vs the blog-post recipe, same machine.

    .venv/bin/python bench/e2e.py [--sizes 1024,100] [--reps 3] [--step-seconds 0.05] [--poll-interval 1.0]
        [--overlap on|off|both]

Everything runs on loopback in one run: the IMDS simulator (spotd.tools.simulator), moto's S3 server as a
subprocess, and for each size (MB of model state) and repetition:

* baseline: a trainer subprocess whose loop GETs IMDS spot/instance-action once per step (IMDSv2 token),
  and on a notice runs ``torch.save(model.state_dict(), path)`` then ``aws s3 cp path s3://...``;
* spotd: a real ``spotd run`` daemon (S3 store at the moto server) and a trainer subprocess using
  ``spotd.torch.Checkpointer``; the time is notice served -> the trainer's ``step()`` returned True with the
  checkpoint confirmed durable (the daemon's own ``interruption.handled`` figures are printed too);
* the reference: the baseline's torch.save time + ``s5cmd cp`` of the same file to the same server.

``--overlap both`` runs spotd twice per repetition, with ``store.overlap`` on (the Checkpointer announces
its emergency save and the daemon uploads parts while it is written) and off, and prints a row for each.

"Served" is when the simulator first answered the notice (the poller's detection delay is not counted for
either side; "armed" columns include it). Prints medians, and spotd / (torch.save + s5cmd cp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if sys.argv[1:2] != ["_trainer"]:  # a trainer imports the snapshot on its PYTHONPATH instead
    sys.path.insert(0, str(ROOT))

from benchlib import (  # noqa: E402
    AWS_ENV,
    BIN,
    MB,
    empty_bucket,
    finish,
    median,
    new_doc,
    proc_cpu,
    progress,
    report_table,
    verdict,
)

from spotd.tools.testing import LineReader, free_port, start_moto, wait_until  # noqa: E402

BUCKET = "bench"
CHUNK_FLOATS = 16 * MB  # 64 MB parameters: a model state made of many tensors, like a real one


# -- the trainers (run as subprocesses of this file) -----------------------------------------------


def _model(size_mb: int) -> Any:
    import torch
    from torch import nn

    total = size_mb * MB // 4
    sizes = [CHUNK_FLOATS] * (total // CHUNK_FLOATS) + (
        [total % CHUNK_FLOATS] if total % CHUNK_FLOATS else []
    )
    gen = torch.Generator().manual_seed(0)
    # Random values: nothing compresses, as with real weights.
    return nn.ParameterList([nn.Parameter(torch.rand(n, generator=gen)) for n in sizes])


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def trainer_baseline(args: argparse.Namespace) -> int:
    """The recipe from blog posts: poll IMDS every step, torch.save, aws s3 cp."""
    import torch

    model = _model(args.size_mb)
    imds = args.imds
    req = urllib.request.Request(
        imds + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
    )
    with urllib.request.urlopen(req, timeout=2) as resp:
        token = resp.read().decode()
    _emit(event="ready")
    step = 0
    while True:
        time.sleep(args.step_seconds)  # the training step
        step += 1
        get = urllib.request.Request(
            imds + "/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
        )
        try:
            with urllib.request.urlopen(get, timeout=2) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue
            raise
        seen = time.time()
        if args.layout == "dir":
            _save_dir(model, Path(args.path), fsync=False)
        else:
            torch.save(model.state_dict(), args.path)
        saved = time.time()
        recursive = ["--recursive"] if args.layout == "dir" else []
        aws = [str(BIN / "aws"), "--endpoint-url", args.endpoint, "s3", "cp", "--quiet", *recursive]
        subprocess.run([*aws, args.path, args.dest], check=True)
        _emit(event="durable", step=step, seen=seen, saved=saved, uploaded=time.time())
        return 0


def _connected() -> Any:
    """A spotd.client guard once the daemon answered (30 s at most)."""
    import spotd.client

    guard = spotd.client.connect(name="bench")
    deadline = time.monotonic() + 30
    while not guard.connected:
        if time.monotonic() > deadline:
            raise SystemExit("trainer: spotd did not answer within 30s")
        time.sleep(0.01)
    return guard


def _save_dir(model: Any, directory: Path, *, fsync: bool) -> int:
    """A checkpoint of many files, as a sharded or framework save writes one: each 64 MB tensor of the
    model in a file of its own, written one after the other. Returns the bytes written."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, tensor in enumerate(model.state_dict().values()):
        path = directory / f"part-{i:05d}.pt"
        with open(path, "wb") as f:
            torch.save({"t": tensor}, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        total += path.stat().st_size
    return total


def trainer_spotd_dir(args: argparse.Namespace) -> int:
    """The loop with the plain client and a checkpoint of many files (``--layout dir``): on a request the
    directory is created and announced (``writing`` with ``directory=True``), its files written one by one
    (each fsynced, as spotd.torch does for its own file), then reported; stop once durable."""
    import spotd.client

    model = _model(args.size_mb)
    guard = _connected()
    try:
        assert guard.checkpoint_dir is not None
        _emit(event="ready", spotd=spotd.client.__file__)
        step = 0
        while not guard.checkpoint_requested:
            time.sleep(args.step_seconds)
            step += 1
        rel = f"bench/step-{step:09d}"
        directory = Path(guard.checkpoint_dir) / rel
        started = time.monotonic()
        directory.mkdir(parents=True)
        guard.writing(rel, step, directory=True)
        size = _save_dir(model, directory, fsync=True)
        save_seconds = time.monotonic() - started
        guard.saved(rel, step=step)
        durable = guard.wait_durable(timeout=600)
        stopped = time.time()
        _emit(
            event="durable" if durable else "not-durable",
            step=step,
            stopped=stopped,
            save_seconds=save_seconds,
            bytes=size,
        )
    finally:
        guard.close()
    return 0


def trainer_spotd(args: argparse.Namespace) -> int:
    """The same loop with spotd.torch: step() saves on the daemon's request and returns once durable."""
    if args.layout == "dir":
        return trainer_spotd_dir(args)
    import spotd.client
    from spotd.torch import Checkpointer, SaveInfo

    model = _model(args.size_mb)
    saves: list[SaveInfo] = []
    guard = _connected()
    try:
        ckpt = Checkpointer(model=model, guard=guard, name="bench", keep=1, on_save=saves.append)
        start = ckpt.restore()
        _emit(event="ready", spotd=spotd.client.__file__)
        step = start
        while True:
            time.sleep(args.step_seconds)
            if ckpt.step(step):
                stopped = time.time()
                break
            step += 1
        info = saves[-1]
        _emit(
            event="durable" if ckpt.wait_durable(timeout=0) else "not-durable",
            step=step,
            stopped=stopped,
            save_seconds=info.seconds,
            bytes=info.bytes,
        )
    finally:
        guard.close()
    return 0


# -- the harness -----------------------------------------------------------------------------------


SRC = [ROOT]  # replaced by a snapshot of spotd/ at start, so every trial of a run measures the same code


def snapshot(work: Path) -> None:
    """Copy spotd/ once and check it imports: a run measures one version even while the tree is edited."""
    for _ in range(10):
        dest = work / "src"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(ROOT / "spotd", dest / "spotd", ignore=shutil.ignore_patterns("__pycache__"))
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import spotd.daemon.app, spotd.store.s3, spotd.torch, spotd.tools.simulator",
            ],
            env={**os.environ, "PYTHONPATH": str(dest)},
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            SRC[0] = dest
            return
        print(f"spotd/ does not import yet, retrying in 10s:\n{probe.stderr[-400:]}", file=sys.stderr)
        time.sleep(10)
    raise SystemExit("spotd/ does not import; fix the tree first")


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, **AWS_ENV, **extra}
    e["PYTHONPATH"] = str(SRC[0]) + os.pathsep + e.get("PYTHONPATH", "")
    for key in [k for k in e if k.startswith("SPOTD_") and k not in extra]:
        del e[key]
    return e


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import boto3

        from spotd.tools.simulator import SimulatorThread

        self.args = args
        self.work = work
        self.moto, self.endpoint = start_moto(env=env())
        self.s3 = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)
        self.s3.create_bucket(Bucket=BUCKET)
        self.sim = SimulatorThread(port=0)
        self.sim.start()

    def close(self) -> None:
        self.sim.close()
        self.s3.close()
        self.moto.kill()
        self.moto.wait(10)

    def trainer(
        self, mode: str, size_mb: int, **kw: str
    ) -> tuple[subprocess.Popen[str], LineReader, LineReader]:
        sock = kw.pop("socket", None)
        cmd = [sys.executable, __file__, "_trainer", mode, "--size-mb", str(size_mb)]
        cmd += ["--step-seconds", str(self.args.step_seconds), "--layout", self.args.layout]
        for key, value in kw.items():
            cmd += [f"--{key.replace('_', '-')}", value]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.work,
            env=env(**({"SPOTD_SOCKET": sock} if sock else {})),
        )
        return proc, LineReader(proc.stdout), LineReader(proc.stderr)

    def fire(self) -> float:
        self.sim.clear()
        armed = time.time()
        self.sim.arm_instance_action("terminate", after_s=0.0, lead_s=120.0)
        return armed

    def served(self) -> float:
        return float(
            wait_until(
                lambda: self.sim.state()["notice_first_served_at"],
                timeout_s=30,
                interval_s=0.01,
                what="the notice served",
            )
        )

    def baseline(self, size_mb: int) -> dict[str, float]:
        self.sim.clear()
        layout_dir = self.args.layout == "dir"
        path = self.work / ("baseline" if layout_dir else "baseline.pt")
        dest = f"s3://{BUCKET}/baseline/" + ("" if layout_dir else "model.pt")
        proc, out, err = self.trainer(
            "baseline", size_mb, imds=self.sim.url, endpoint=self.endpoint, path=str(path), dest=dest
        )
        try:
            wait_until(
                lambda: out.events("ready") or proc.poll() is not None,
                timeout_s=300,
                interval_s=0.01,
                what="baseline ready",
            )
            if proc.poll() is not None:
                raise SystemExit("baseline trainer failed:\n" + "\n".join(err.lines))
            armed = self.fire()
            done = wait_until(
                lambda: out.events("durable") or proc.poll() not in (None, 0),
                timeout_s=1200,
                interval_s=0.01,
                what="baseline upload",
            )
            if not isinstance(done, list):
                raise SystemExit("baseline trainer failed:\n" + "\n".join(err.lines))
            ev = done[0]
            served = self.served()
            proc.wait(60)
        finally:
            stop(proc)
            out.join()
            err.join()
        # The reference tool on the very same file and server.
        started = time.monotonic()
        layout_dir = self.args.layout == "dir"
        subprocess.run(
            [
                str(BIN / "s5cmd"),
                "--endpoint-url",
                self.endpoint,
                "cp",
                f"{path}/*" if layout_dir else str(path),
                f"s3://{BUCKET}/s5cmd/" if layout_dir else f"s3://{BUCKET}/s5cmd/m.pt",
            ],
            check=True,
            env=env(),
            stdout=subprocess.DEVNULL,
        )
        s5cmd_s = time.monotonic() - started
        if layout_dir:
            shutil.rmtree(path)
        else:
            path.unlink()
        empty_bucket(self.s3, BUCKET)
        return {
            "served_to_durable": ev["uploaded"] - served,
            "armed_to_durable": ev["uploaded"] - armed,
            "torch_save": ev["saved"] - ev["seen"],
            "aws_cp": ev["uploaded"] - ev["saved"],
            "s5cmd_cp": s5cmd_s,
        }

    def spotd(self, size_mb: int, rep: int, overlap: bool = True) -> dict[str, float]:
        self.sim.clear()
        ckpt = self.work / f"ckpt-{rep}"
        ckpt.mkdir()
        sock = str(self.work / f"s{rep}.sock")
        cfg = self.work / f"spotd-{rep}.toml"
        cfg.write_text(
            "\n".join(
                [
                    'job_id = "bench"',
                    f"checkpoint_dir = {json.dumps(str(ckpt))}",
                    "[imds]",
                    f"endpoint = {json.dumps(self.sim.url)}",
                    f"poll_interval = {self.args.poll_interval}",
                    "[socket]",
                    f"path = {json.dumps(sock)}",
                    "[store]",
                    f'uri = "s3://{BUCKET}/spotd"',
                    f"endpoint_url = {json.dumps(self.endpoint)}",
                    *([f"part_size = {self.args.part_size_mb * MB}"] if self.args.part_size_mb else []),
                    f"overlap = {'true' if overlap else 'false'}",
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
        daemon = subprocess.Popen(
            [sys.executable, "-m", "spotd", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.work,
            env=env(),
        )
        logs = LineReader(daemon.stderr)
        proc: subprocess.Popen[str] | None = None
        out = err = None
        try:
            wait_until(
                lambda: logs.events("daemon.ready") or daemon.poll() is not None,
                timeout_s=60,
                interval_s=0.01,
                what="daemon.ready",
            )
            if daemon.poll() is not None:
                raise SystemExit("spotd run exited:\n" + "\n".join(logs.lines))
            proc, out, err = self.trainer("spotd", size_mb, socket=sock)
            trainer_out = out
            wait_until(
                lambda: trainer_out.events("ready") or proc is None or proc.poll() is not None,
                timeout_s=300,
                interval_s=0.01,
                what="spotd trainer ready",
            )
            if proc.poll() is not None:
                raise SystemExit("spotd trainer failed:\n" + "\n".join(err.lines))
            imported = trainer_out.events("ready")[0]["spotd"]
            if not imported.startswith(str(SRC[0])):
                raise SystemExit(f"the trainer imported {imported}, not the snapshot in {SRC[0]}")
            moto_cpu = proc_cpu(self.moto.pid)
            armed = self.fire()
            done = wait_until(
                lambda: (
                    trainer_out.events("durable")
                    or trainer_out.events("not-durable")
                    or (proc is not None and proc.poll() not in (None, 0))
                ),
                timeout_s=1200,
                interval_s=0.01,
                what="spotd trainer to stop",
            )
            if not isinstance(done, list) or done[0]["event"] != "durable":
                raise SystemExit(
                    "spotd did not make the checkpoint durable:\n"
                    + "\n".join(err.lines[-20:] + logs.lines[-30:])
                )
            moto_cpu = proc_cpu(self.moto.pid) - moto_cpu
            ev = done[0]
            served = self.served()
            handled = wait_until(
                lambda: logs.events("interruption.handled"),
                timeout_s=60,
                interval_s=0.01,
                what="interruption.handled",
            )
            rec = handled[0]
            streamed = logs.events("store.stream_completed")
            taken = logs.events("store.dir_stream_taken")
        finally:
            if proc is not None:
                stop(proc)
            stop(daemon)
            logs.join()
            if out is not None and err is not None:
                out.join()
                err.join()
        shutil.rmtree(ckpt)
        empty_bucket(self.s3, BUCKET)
        return {
            "served_to_durable": ev["stopped"] - served,
            "armed_to_durable": ev["stopped"] - armed,
            "save_fsync": ev["save_seconds"],
            "daemon_notice_to_durable": float(rec["notice_to_durable_seconds"]),
            "daemon_upload": float(rec["upload_seconds"]),
            "moto_cpu": moto_cpu,
            # Bytes of the checkpoint uploaded before the trainer said saved (0 without overlap).
            "sent_before_saved": float(sum(e.get("sent_before_saved", 0) for e in streamed)),
            # Files of a directory checkpoint seen closed (and sent) before saved (--layout dir).
            "files_before_saved": float(sum(e.get("files_seen", 0) for e in taken)),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,100", help="MB of model state, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each size; medians are reported")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="one training step (a sleep)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="spotd's imds.poll_interval")
    parser.add_argument(
        "--part-size-mb", type=int, default=0, help="spotd's store.part_size in MB (default: spotd's own)"
    )
    parser.add_argument(
        "--overlap",
        choices=["on", "off", "both"],
        default="on",
        help="spotd's store.overlap (upload while the save is written); both: a row for each",
    )
    parser.add_argument(
        "--layout",
        choices=["file", "dir"],
        default="file",
        help="the checkpoint: one file (spotd.torch's Checkpointer), or a directory of one file per 64 MB "
        "tensor announced with writing(directory=True) (a sharded or framework save)",
    )
    parser.add_argument("--json", action="store_true", help="also print every repetition as JSON lines")
    parser.add_argument("--json-out", type=Path, help="also write every repetition as JSON to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.reps < 1:
        parser.error("--sizes takes positive whole MB (e.g. 1024,100) and --reps at least 1")
    doc = new_doc("e2e", args, argv)
    work = Path(tempfile.mkdtemp(prefix="spotd-e2e-"))
    snapshot(work)
    bench = Bench(args, work)
    overlaps = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.overlap]
    try:
        trial = 0
        for size in sizes:
            for rep in range(args.reps):
                # Alternate the order so page cache and moto's warm-up favour neither side.
                modes = ["baseline", *overlaps]
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    what = f"e2e: {size} MB {mode if mode == 'baseline' else 'spotd overlap ' + mode}"
                    progress(f"{what} rep {rep + 1}/{args.reps} started")
                    if mode == "baseline":
                        row = {"mode": "baseline", **bench.baseline(size)}
                    else:
                        trial += 1
                        got = bench.spotd(size, trial + 100 * size, overlap=mode == "on")
                        row = {"mode": "spotd", "overlap": mode, **got}
                    doc["rows"].append({"size_mb": size, "rep": rep, **row})
                    progress(f"{what} rep {rep + 1}/{args.reps} done: {row['served_to_durable']:.2f} s")
                if args.json:
                    print(json.dumps([r for r in doc["rows"] if (r["size_mb"], r["rep"]) == (size, rep)]))
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return finish(doc, report, args.json_out)


def report(doc: dict[str, Any]) -> str:
    """Medians per size and overlap; ratio = spotd / (torch.save + s5cmd cp), goal <= 1.0; the overlap
    moonshot <= 0.6 was set at 1 GB, so it is judged at the largest size run only."""
    params, rows = doc["params"], doc["rows"]
    out = []
    largest = max(r["size_mb"] for r in rows)
    for size in dict.fromkeys(r["size_mb"] for r in rows):
        b = [r for r in rows if r["size_mb"] == size and r["mode"] == "baseline"]
        ref = median(b, "torch_save") + median(b, "s5cmd_cp")
        for overlap in dict.fromkeys(r["overlap"] for r in rows if r["mode"] == "spotd"):
            s = [r for r in rows if r["size_mb"] == size and r.get("overlap") == overlap]
            ratio = median(s, "served_to_durable") / ref
            out.append(
                [
                    f"{size} MB",
                    overlap,
                    median(b, "served_to_durable"),
                    median(s, "served_to_durable"),
                    median(b, "torch_save"),
                    median(b, "aws_cp"),
                    median(b, "s5cmd_cp"),
                    verdict(ratio, 1.0),
                    verdict(ratio, 0.6) if overlap == "on" and size == largest else "",
                    median(s, "save_fsync"),
                    median(s, "daemon_notice_to_durable"),
                    f"{median(s, 'sent_before_saved') / MB:.0f}"
                    if params.get("layout", "file") == "file"
                    else f"{median(s, 'files_before_saved'):.0f} files",
                    median(s, "moto_cpu"),
                ]
            )
    header = [
        "size",
        "overlap",
        "baseline (aws cp) s",
        "spotd s",
        "torch.save s",
        "aws cp s",
        "s5cmd cp s",
        "ratio (goal <= 1.0)",
        "ratio, overlap moonshot at the largest size (goal <= 0.6 at 1 GB)",
        "spotd save (fsync) s",
        "daemon's notice_to_durable s",
        "MiB (file) or files (dir) sent before saved",
        "moto CPU s",
    ]
    intro = (
        f"Notice served -> checkpoint durable in S3, medians of {params['reps']}; a step is "
        f"{params['step_seconds']} s, spotd polls every {params['poll_interval']} s. baseline = poll IMDS "
        "every step, torch.save, aws s3 cp; ratio = spotd / (the baseline's torch.save + s5cmd cp of the "
        "same file); spotd's save includes its fsync; moto CPU = the S3 server's during spotd's upload."
        + (
            " Layout dir: the checkpoint is a directory of one file per 64 MB tensor (the baseline's aws "
            "s3 cp --recursive, s5cmd cp 'dir/*'); spotd's trainer announces the directory, fsyncs each file."
            if params.get("layout", "file") == "dir"
            else ""
        )
    )
    return report_table(intro, header, out, doc)


def trainer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["baseline", "spotd"])
    p.add_argument("--size-mb", type=int, required=True)
    p.add_argument("--step-seconds", type=float, required=True)
    p.add_argument("--imds", default="")
    p.add_argument("--endpoint", default="")
    p.add_argument("--path", default="")
    p.add_argument("--dest", default="")
    p.add_argument("--layout", choices=["file", "dir"], default="file")
    args = p.parse_args(argv)
    return trainer_baseline(args) if args.mode == "baseline" else trainer_spotd(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_trainer":
        sys.exit(trainer_main(sys.argv[2:]))
    sys.exit(main())
