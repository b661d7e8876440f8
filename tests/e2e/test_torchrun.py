"""Every rank, one stop step: real torchrun (gloo, DDP) workers at different paces, a real daemon, a spot
notice at a random moment; no rank leaves alone, none hangs, nothing is lost, and the resumed run ends
bitwise where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotd.tools.simulator import SimulatorThread
from tests.fixtures.daemon import Lines, subprocess_env
from tests.util import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "tests" / "e2e" / "ddp_trainer.py"
STEPS = 150

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def torchrun(
    env: dict[str, str], *args: str, rdzv: list[str] | None = None, session: bool = False
) -> tuple[subprocess.Popen[str], Lines, Lines]:
    """2 workers on this "node"; ``rdzv`` joins them to a multi-node job instead of a standalone one."""
    proc = subprocess.Popen(
        [
            *(
                sys.executable,
                "-m",
                "torch.distributed.run",
                *(rdzv or ["--standalone"]),
                "--nproc-per-node",
                "2",
            ),
            *(str(TRAINER), "--steps", str(STEPS), *args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env({"OMP_NUM_THREADS": "1", **env}),
        cwd=ROOT,
        start_new_session=session,
    )
    assert proc.stdout is not None and proc.stderr is not None
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def finish(proc: subprocess.Popen[str], out: Lines, err: Lines, *, timeout_s: float) -> None:
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError("torchrun hung:\n" + "\n".join(out.lines + err.lines[-80:])) from None
    out.join()
    err.join()
    assert code == 0, "\n".join(
        out.lines + [line for line in err.lines if line.startswith("[rank")][-40:] + err.lines[-20:]
    )


def interrupt(imds_sim, d, *, barrier: bool, extra: list[str] | None = None) -> int:
    """Run 2 ranks against daemon ``d``, arm a terminate notice at a random moment; returns the stop step."""
    flags = [*(["--barrier"] if barrier else []), *(extra or [])]
    proc, out, err = torchrun({"SPOTD_SOCKET": d.socket}, *flags)
    wait_until(
        lambda: len(out.events("started")) == 2 or proc.poll() is not None, timeout_s=90, what="2 ranks"
    )
    time.sleep(random.uniform(0.3, 2.0))  # the notice lands at a random step, not at a fixed one
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    armed = time.monotonic()
    finish(proc, out, err, timeout_s=60)
    stopped = out.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1], "\n".join(out.lines)
    assert len({e["step"] for e in stopped}) == 1, f"ranks stopped at different steps: {stopped}"
    assert time.monotonic() - armed < 30, "the job took too long to stop after the notice"
    return int(stopped[0]["step"])


@pytest.mark.parametrize("barrier", [False, True], ids=["plain-loop", "barrier-after-loop"])
def test_a_notice_stops_every_rank_at_the_same_step(imds_sim, spotd_daemon, tmp_path, barrier):
    """A notice at a random step stops both ranks, one slower by 30 ms a step, at one step, twice in a row; with or without dist.barrier() after the loop nobody hangs, and both ranks' saves of that step are committed."""
    for attempt in range(2):
        imds_sim.clear()
        d = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / f"disk{attempt}")
        step = interrupt(imds_sim, d, barrier=barrier)
        wait_until(
            lambda d=d: d.logs.events("interruption.handled"), timeout_s=30, what="interruption handled"
        )
        (checkpoint,) = at_step(tmp_path / "store", step)
        assert checkpoint["world_size"] == 2 and checkpoint["nodes"] == 1, checkpoint
        assert len(checkpoint["files"]) == 2, f"step {step} not committed as one for both ranks"
        d.stop()


def at_step(store: Path, step: int) -> list[dict[str, object]]:
    """The committed checkpoints (global MANIFEST.json) of ``step`` in a file:// store."""
    manifests = [json.loads(p.read_text()) for p in store.glob("test-job/checkpoints/*/MANIFEST.json")]
    return [m for m in manifests if m["step"] == step]


@pytest.mark.parametrize("layout", ["per-rank-files", "sharded-dcp"])
def test_resumed_ranks_end_bitwise_where_an_uninterrupted_run_does(imds_sim, spotd_daemon, tmp_path, layout):
    """Interrupted at a random step, restored on a wiped disk by a fresh daemon, both ranks resume at the stop step and finish with the weights of a run never interrupted, bit for bit: with a file per rank, and with one torch.distributed.checkpoint directory for both."""
    mode = ["--sharded"] if layout == "sharded-dcp" else []
    plain = tmp_path / "plain"
    proc, out, err = torchrun(
        {"SPOTD_SOCKET": str(tmp_path / "none.sock"), "SPOTD_CHECKPOINT_DIR": str(plain)}, *mode
    )
    finish(proc, out, err, timeout_s=300)
    digests = {e["digest"] for e in out.events("done")}
    assert len(digests) == 1 and len(out.events("done")) == 2

    d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "first")
    stop_step = interrupt(imds_sim, d1, barrier=False, extra=mode)
    wait_until(lambda: d1.logs.events("interruption.handled"), timeout_s=30, what="interruption handled")
    if layout == "sharded-dcp":
        # Local rank 0 announced the directory: the shards closed before `saved` went up early and the
        # node part adopted them, under the run's name for that step.
        [taken] = d1.logs.events("store.dir_stream_taken")
        [durable] = d1.logs.events("checkpoint.durable")
        assert taken["files_seen"] >= 2 and taken["name"] == durable["name"], (taken, durable)
    d1.stop()
    shutil.rmtree(tmp_path / "first")

    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "second")
    assert d2.logs.events("restore.done"), "the new instance restored nothing"
    proc, out, err = torchrun({"SPOTD_SOCKET": d2.socket}, *mode)
    finish(proc, out, err, timeout_s=300)
    assert [e["step"] for e in out.events("started")] == [stop_step, stop_step]
    assert {e["digest"] for e in out.events("done")} == digests


def two_nodes(
    socks: list[str], env: dict[str, str] | None = None, *args: str
) -> list[tuple[subprocess.Popen[str], Lines, Lines]]:
    """Two torchrun agents of one job on loopback, 2 workers each: 4 ranks, each node with its own spotd."""
    port = free_port()
    rdzv = [
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "j",
    ]
    # 4 ranks: DDP's bucket regrouping after a restart changes the gradient sum order (see ddp_trainer.py).
    return [
        torchrun({"SPOTD_SOCKET": sock, **(env or {})}, "--plain-allreduce", *args, rdzv=rdzv)
        for sock in socks
    ]


def test_two_nodes_stop_together_when_only_one_is_notified(imds_sim, spotd_daemon, tmp_path):
    """2 nodes x 2 ranks, one spotd and one IMDS each, one store: a notice on node 1 only stops all 4 ranks at one step, the other node's spotd uploads its ranks' saves at once, and two fresh nodes resume there and end bitwise equal to an uninterrupted 4-rank run."""
    nodes = two_nodes(
        [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
        {"SPOTD_CHECKPOINT_DIR": str(tmp_path / "plain")},
    )
    for proc, out, err in nodes:
        finish(proc, out, err, timeout_s=300)
    digests = {e["digest"] for _, out, _ in nodes for e in out.events("done")}
    assert len(digests) == 1

    quiet = SimulatorThread(host="127.0.0.1", port=0)
    quiet.start()
    try:
        d1 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "n1")
        d2 = spotd_daemon(quiet.url, checkpoint_dir=tmp_path / "n2")
        nodes = two_nodes([d1.socket, d2.socket])
        wait_until(
            lambda: (
                sum(len(out.events("started")) for _, out, _ in nodes) == 4
                or any(p.poll() is not None for p, _, _ in nodes)
            ),
            timeout_s=120,
            what="4 ranks",
        )
        time.sleep(random.uniform(0.3, 1.5))
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
        for proc, out, err in nodes:
            finish(proc, out, err, timeout_s=90)
        stopped = [e for _, out, _ in nodes for e in out.events("stopped")]
        assert sorted(e["rank"] for e in stopped) == [0, 1, 2, 3]
        steps = {e["step"] for e in stopped}
        assert len(steps) == 1, f"ranks stopped at different steps: {stopped}"
        (step,) = steps
        # Node 2 heard nothing from its IMDS: its ranks' saves still went out at once.
        peer_saves = [e for e in d2.logs.events("checkpoint.saved") if e.get("step") == step]
        assert len(peer_saves) == 2
        wait_until(lambda: at_step(tmp_path / "store", step), timeout_s=60, what="the stop step committed")
        # Exactly one global commit, of both nodes' parts, and both daemons told their ranks durable.
        (checkpoint,) = at_step(tmp_path / "store", step)
        assert checkpoint["nodes"] == 2 and checkpoint["world_size"] == 4 and len(checkpoint["files"]) == 4
        for d in (d1, d2):
            wait_until(
                lambda d=d: [e for e in d.logs.events("checkpoint.durable") if e.get("step") == step],
                timeout_s=30,
                what="durable on both nodes",
            )
        d1.stop()
        d2.stop()
        shutil.rmtree(tmp_path / "n1")
        shutil.rmtree(tmp_path / "n2")

        imds_sim.clear()
        d3 = spotd_daemon(imds_sim.url, checkpoint_dir=tmp_path / "n3")
        d4 = spotd_daemon(quiet.url, checkpoint_dir=tmp_path / "n4")
        nodes = two_nodes([d3.socket, d4.socket])
        for proc, out, err in nodes:
            finish(proc, out, err, timeout_s=300)
        started = [e for _, out, _ in nodes for e in out.events("started")]
        assert [e["step"] for e in started] == [step] * 4
        assert {e["digest"] for e in started} == {e["digest"] for e in stopped}, (started, stopped)
        assert {e["digest"] for _, out, _ in nodes for e in out.events("done")} == digests
    finally:
        quiet.close()


def test_a_node_whose_spotd_dies_mid_upload_leaves_that_step_uncommitted(
    imds_sim, spotd_daemon, tmp_path, s3_bucket, s3_proxy
):
    """2 nodes x 2 ranks on moto S3, node 2's spotd behind a proxy that stalls its uploads once the first global checkpoint is in: a notice on node 1, node 2's spotd SIGKILLed while its part uploads. The stop step is never committed (node 1's part alone is not a checkpoint, LATEST stays), and two fresh nodes resume every rank from the previous global checkpoint."""
    store = {"store_uri": s3_bucket.uri(), "policy": {"deadline_margin": 5.0}}
    quiet = SimulatorThread(host="127.0.0.1", port=0)
    quiet.start()
    try:
        d1 = spotd_daemon(
            imds_sim.url, endpoint_url=s3_bucket.endpoint_url, checkpoint_dir=tmp_path / "n1", **store
        )
        d2 = spotd_daemon(
            quiet.url, endpoint_url=s3_proxy.endpoint_url, checkpoint_dir=tmp_path / "n2", **store
        )
        nodes = two_nodes([d1.socket, d2.socket], {"SPOTD_PEER_GRACE": "5"}, "--every", "25")
        wait_until(
            lambda: (
                any(e.get("nodes") == 2 for e in d1.logs.events("checkpoint.durable"))
                or any(p.poll() is not None for p, _, _ in nodes)
            ),
            timeout_s=120,
            what="the first global checkpoint",
        )
        stall = s3_proxy.add("delay", method="PUT", path_has="/checkpoints/", delay_s=60.0, times=10**6)
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=20)
        wait_until(lambda: stall.fired > 0, timeout_s=30, what="node 2's part upload under way")
        d2.proc.kill()
        for proc, out, err in nodes:
            finish(proc, out, err, timeout_s=90)
        stopped = [e for _, out, _ in nodes for e in out.events("stopped")]
        assert sorted(e["rank"] for e in stopped) == [0, 1, 2, 3]
        (step,) = {e["step"] for e in stopped}
        # Every rank announced its emergency save, node 2's peers (stopped by the agreement, final) too, and
        # each daemon opened its stream under the run's name of the stop step, where the node part puts it.
        for d in (d1, d2):
            opened = [e for e in d.logs.events("overlap.started") if e.get("step") == step]
            assert len(opened) == 2 and all(e["name"].endswith(f"-s{step:09d}") for e in opened), opened
        wait_until(
            lambda: d1.logs.events("interruption.handled"), timeout_s=60, what="node 1's episode recorded"
        )
        (record,) = d1.logs.events("interruption.handled")
        assert any("did not commit theirs" in line for line in record["lost"]), record

        keys = s3_bucket.keys("pfx/")
        manifests = [
            json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=k)["Body"].read())
            for k in keys
            if k.endswith("/MANIFEST.json")
        ]
        committed = sorted(m["step"] for m in manifests)
        assert committed and step not in committed, (step, committed)
        assert all(m["nodes"] == 2 and len(m["files"]) == 4 for m in manifests), manifests
        parts = [k for k in keys if k.endswith("parts/node-0.json") and f"-s{step:09d}/" in k]
        assert parts, "node 1's part of the stop step should be there, and mean nothing alone"
        latest = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="pfx/test-job/LATEST")["Body"].read()
        assert latest.decode().strip().endswith(f"-s{committed[-1]:09d}")
        d1.stop()

        imds_sim.clear()
        d3 = spotd_daemon(
            imds_sim.url, endpoint_url=s3_bucket.endpoint_url, checkpoint_dir=tmp_path / "n3", **store
        )
        d4 = spotd_daemon(
            quiet.url, endpoint_url=s3_bucket.endpoint_url, checkpoint_dir=tmp_path / "n4", **store
        )
        nodes = two_nodes([d3.socket, d4.socket])
        for proc, out, err in nodes:
            finish(proc, out, err, timeout_s=300)
        started = [e for _, out, _ in nodes for e in out.events("started")]
        assert [e["step"] for e in started] == [committed[-1]] * 4, started
        assert len({e["digest"] for e in started}) == 1
        assert len({e["digest"] for _, out, _ in nodes for e in out.events("done")}) == 1
    finally:
        quiet.close()


@pytest.mark.parametrize("whom", ["torchrun", "every-process"])
def test_sigterm_through_torchrun_is_a_last_chance_checkpoint(imds_sim, spotd_daemon, tmp_path, whom):
    """SIGTERM to torchrun (systemd's KillMode=mixed) or to torchrun and its workers at once (KillMode=control-group): torchrun forwards it, every rank saves the same step, the daemon commits both, and the workers exit 0."""
    d = spotd_daemon(imds_sim.url)
    proc, out, err = torchrun({"SPOTD_SOCKET": d.socket}, session=True)
    wait_until(
        lambda: len(out.events("started")) == 2 or proc.poll() is not None, timeout_s=90, what="2 ranks"
    )
    time.sleep(random.uniform(0.3, 1.5))
    if whom == "torchrun":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.join()
    err.join()
    stopped = out.events("stopped")
    assert sorted(e["rank"] for e in stopped) == [0, 1], "\n".join(out.lines + err.lines[-40:])
    (step,) = {e["step"] for e in stopped}
    (checkpoint,) = at_step(tmp_path / "store", step)
    assert checkpoint["world_size"] == 2 and len(checkpoint["files"]) == 2, checkpoint
    assert checkpoint["reason"] == "sigterm"
    assert not [line for line in err.lines if "exitcode  : -" in line], "a worker was killed"


def test_a_sharded_checkpoint_of_two_ranks_loads_into_one(tmp_path):
    """A torch.distributed.checkpoint directory written by 2 ranks (.metadata last) loads into a single process: resharded, the same weights, the same optimizer step."""
    import importlib.util

    import torch
    from torch import nn

    from spotd.torch import Checkpointer

    env = {"SPOTD_SOCKET": str(tmp_path / "none.sock"), "SPOTD_CHECKPOINT_DIR": str(tmp_path)}
    proc, out, err = torchrun(env, "--sharded", "--every", "50")
    finish(proc, out, err, timeout_s=300)
    (digest,) = {e["digest"] for e in out.events("done")}
    saved = tmp_path / "train" / f"step-{STEPS:09d}.dcp"
    assert (saved / ".metadata").is_file()
    assert sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    spec = importlib.util.spec_from_file_location("ddp_trainer", TRAINER)
    assert spec is not None and spec.loader is not None
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    torch.manual_seed(123)  # other weights: only the load can make them equal
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ckpt = Checkpointer(model=net, optimizer=opt, sharded=True, checkpoint_dir=tmp_path, guard=None)
    assert ckpt.restore() == STEPS
    assert trainer.weights_digest(net) == digest
    assert int(opt.state_dict()["state"][0]["step"]) == STEPS
