"""SIGTERM is a last-chance checkpoint: the handler only sets a flag, the next step() saves it, the daemon
commits it, and the process exits cleanly; earlier handlers still run, forked children and opt-outs keep
the default behaviour."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from spotd.client.signals import REPEAT_WINDOW_S
from tests.fixtures.daemon import Lines, subprocess_env
from tests.util import wait_until

ROOT = Path(__file__).resolve().parents[2]

TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from torch import nn
    from spotd.torch import Checkpointer

    def emit(event, **kw):
        print(json.dumps({"event": event, **kw}), flush=True)

    def earlier(signum, frame):
        emit("earlier_handler", signum=signum)

    if os.environ.get("EARLIER_HANDLER"):
        signal.signal(signal.SIGTERM, earlier)
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(model=model, optimizer=opt, every_steps=1000, checkpoint_dir=sys.argv[1] or None)
    start = ckpt.restore()
    emit("started", step=start, pid=os.getpid())
    for step in range(start, 100000):
        loss = model(torch.ones(4, 16)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            emit("step", step=step)
        time.sleep(0.01)
        if ckpt.step(step):
            emit("stopped", step=step + 1)
            break
    ckpt.close()
    """
)


def start_trainer(checkpoint_dir: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, checkpoint_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(env),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    out = Lines(proc.stdout)
    Lines(proc.stderr)  # type: ignore[arg-type]  # drained so a chatty trainer never blocks
    wait_until(lambda: out.events("step") or proc.poll() is not None, timeout_s=60, what="training steps")
    assert proc.poll() is None, "\n".join(out.lines)
    return proc, out


def manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(store.glob("test-job/checkpoints/*/MANIFEST.json"))]


def test_sigterm_saves_at_the_next_step_and_the_daemon_commits_it(imds_sim, spotd_daemon, tmp_path):
    """SIGTERM to a Checkpointer trainer makes its next step save, spotd commit that save as a final one (emergency priority, reason sigterm), and the process exit 0 at that step, after the handler installed before it ran too."""
    d = spotd_daemon(imds_sim.url)
    proc, out = start_trainer("", {"SPOTD_SOCKET": d.socket, "EARLIER_HANDLER": "1"})
    wait_until(lambda: d.logs.events("session.connected"), timeout_s=20, what="the trainer registered")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, "\n".join(out.lines)
    out.join()
    (stopped,) = out.events("stopped")
    assert out.events("earlier_handler") == [{"event": "earlier_handler", "signum": signal.SIGTERM}]
    committed = manifests(tmp_path / "store")
    assert [m["step"] for m in committed] == [stopped["step"]]
    assert committed[0]["reason"] == "sigterm"
    (saved,) = d.logs.events("checkpoint.saved")
    assert saved["final"] is True and saved["reason"] == "sigterm" and saved["step"] == stopped["step"]
    (stored,) = d.logs.events("store.committed")
    assert stored["priority"] == "emergency"


def test_sigterm_without_a_daemon_still_saves_locally(tmp_path):
    """With no daemon at all, SIGTERM still leaves a checkpoint of the step reached on disk, and the process exits 0."""
    proc, out = start_trainer(str(tmp_path), {"SPOTD_SOCKET": str(tmp_path / "absent.sock")})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, "\n".join(out.lines)
    out.join()
    (stopped,) = out.events("stopped")
    assert (tmp_path / "train" / f"step-{stopped['step']:09d}.pt").exists()


def test_opting_out_leaves_sigterm_deadly(tmp_path):
    """SPOTD_HANDLE_SIGTERM=0 keeps Python's default: SIGTERM kills the trainer at once, nothing saved."""
    proc, _ = start_trainer(
        str(tmp_path), {"SPOTD_SOCKET": str(tmp_path / "absent.sock"), "SPOTD_HANDLE_SIGTERM": "0"}
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    assert list((tmp_path / "train").glob("step-*.pt")) == []


def test_a_second_sigterm_stops_at_once(tmp_path):
    """A loop that never reaches step() again is not held hostage: a second SIGTERM terminates it, unless it comes within the repeat window (then it is the same stop twice)."""
    code = textwrap.dedent(
        """
        import sys, time
        import spotd.client
        guard = spotd.client.connect("stuck", socket_path=sys.argv[1])
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code, str(tmp_path / "absent.sock")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    err = Lines(proc.stderr)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        # Two signals sent back to back merge into one pending signal: wait until the first was handled.
        wait_until(lambda: any("last-chance" in line for line in err.lines), what="the first SIGTERM handled")
        proc.send_signal(signal.SIGTERM)  # inside the repeat window: the same stop, delivered twice
        time.sleep(0.2)
        assert proc.poll() is None
        # The window is what is under test here, so this one wait is on the clock itself.
        time.sleep(REPEAT_WINDOW_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        err.join()


def test_forked_children_get_the_default_sigterm_back(tmp_path):
    """A data-loader-like forked child still dies on SIGTERM, and its parent's last-chance request is untouched."""
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        import spotd.client
        guard = spotd.client.connect("parent", socket_path=sys.argv[1])
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(ready_w, b"x")  # the fork hooks have run by now, as in a data loader worker
            time.sleep(60)
            os._exit(0)
        os.read(ready_r, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status), guard.checkpoint_requested, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(tmp_path / "absent.sock")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == [str(int(signal.SIGTERM)), "False"]


def test_client_request_after_sigterm_is_final_and_answered_once(tmp_path):
    """Through spotd.client alone, SIGTERM shows as a final request with reason 'sigterm'; once saved it is not asked again and request stays final."""
    code = textwrap.dedent(
        """
        import os, signal, sys
        import spotd.client
        guard = spotd.client.connect("plain", socket_path=sys.argv[1], sigterm_grace_s=5)
        before = guard.checkpoint_requested
        os.kill(os.getpid(), signal.SIGTERM)
        req = guard.request
        print(before, guard.checkpoint_requested, req.reason, req.final, 0 < req.seconds_left() <= 5)
        guard.saved("x.pt", step=3)
        print(guard.checkpoint_requested, guard.request.final, guard.sigterm_received)
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(tmp_path / "absent.sock")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert out.stdout.splitlines() == ["False True sigterm True True", "False True True"]
