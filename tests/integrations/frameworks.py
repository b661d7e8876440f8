"""Shared by the framework tests: run an example script (or torchrun of one) as a subprocess against a real
daemon, wait for its JSON events, and play "the instance is gone, a new one boots"."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.fixtures.daemon import Lines, subprocess_env
from tests.util import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


class Run:
    """One training process (or one torchrun) started from an example script."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}),
            cwd=ROOT,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.out.events(name)

    def wait_for(self, name: str, *, count: int = 1, timeout_s: float = 120) -> list[dict[str, Any]]:
        wait_until(
            lambda: len(self.events(name)) >= count or self.proc.poll() is not None,
            timeout_s=timeout_s,
            what=name,
        )
        found = self.events(name)
        assert len(found) >= count, self.explain(f"exited before {count} {name!r} event(s)")
        return found

    def finish(self, *, timeout_s: float = 180, code: int | None = 0) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(self.explain("hung")) from None
        self.out.join()
        self.err.join()
        if code is not None:
            assert rc == code, self.explain(f"exit code {rc}, wanted {code}")
        return rc

    def explain(self, what: str) -> str:
        return f"{what}:\n" + "\n".join(self.out.lines[-40:] + self.err.lines[-60:])


def example(script: str, *args: str, env: dict[str, str]) -> Run:
    return Run([sys.executable, str(EXAMPLES / script), *args], env)


def torchrun(script: str, *args: str, nproc: int, env: dict[str, str]) -> Run:
    return Run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)),
            *(str(EXAMPLES / script), *args),
        ],
        env,
    )


def no_daemon(tmp_path: Path) -> dict[str, str]:
    """The environment of a run without spotd: a socket path where nothing listens."""
    return {"SPOTD_SOCKET": str(tmp_path / "nobody.sock")}


def with_daemon(d: Any) -> dict[str, str]:
    return {"SPOTD_SOCKET": d.socket, "SPOTD_CHECKPOINT_DIR": str(d.checkpoint_dir)}


def interrupt_when_training(
    imds_sim: Any, run: Run, *, after: str = "started", delay_s: float = 1.0
) -> float:
    """A spot notice (terminate in 2 minutes) once the run is training; returns when it was armed."""
    run.wait_for(after)
    time.sleep(delay_s)  # into the run, not at a fixed step
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    return time.monotonic()


def new_instance(d: Any) -> None:
    """The instance is gone: its daemon stopped, its disk wiped."""
    d.stop()
    shutil.rmtree(d.checkpoint_dir)


def committed_manifests(store: Path) -> list[str]:
    return sorted(p.read_text() for p in store.glob("test-job/checkpoints/*/MANIFEST.json"))
