"""examples/train.py: interrupted, resumed on a "new instance", it ends bitwise where a clean run ends."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.integrations.test_torch_checkpointer import FakeGuard, FakeRequest
from tests.util import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train.py"
STEPS = 60


@pytest.fixture(scope="module")
def train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spotd_example_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(train: ModuleType, *argv: str) -> Any:
    return train.build_parser().parse_args(["--steps", str(STEPS), *argv])


def new_instance(old: Path, new: Path) -> None:
    """What a store restore leaves on a fresh disk: only the checkpoint files, at the same relative paths."""
    for path in old.rglob("step-*.pt"):
        target = new / path.relative_to(old)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def assert_bitwise_equal(a: Path, b: Path) -> None:
    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert left["step"] == right["step"] == STEPS
    for key, value in left["model"].items():
        assert torch.equal(value, right["model"][key]), f"model {key} differs"
    assert left["optimizer"]["param_groups"] == right["optimizer"]["param_groups"]
    for index, state in left["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, right["optimizer"]["state"][index][name]), (
                f"optimizer {index}.{name} differs"
            )


class FinalAt(FakeGuard):
    """A guard whose daemon announces a final (spot) checkpoint request while step `at` runs."""

    def __init__(self, *, at: int, checkpoint_dir: str) -> None:
        super().__init__(checkpoint_dir=checkpoint_dir)
        self.at = at

    def on_batch(self, step: int, batch: torch.Tensor) -> None:
        if step == self.at:
            self.request = FakeRequest("spot-1", final=True, seconds=5.0)


@pytest.fixture(scope="module")
def uninterrupted(
    train: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[torch.Tensor]]:
    """One uninterrupted in-process run: its final state file and every batch it trained on."""
    root = tmp_path_factory.mktemp("uninterrupted")
    batches: list[torch.Tensor] = []
    done = train.run(
        args(train, "--checkpoint-dir", str(root / "ckpt"), "--out", str(root / "final.pt")),
        guard=None,
        emit=lambda event: None,
        on_batch=lambda step, x: batches.append(x.clone()),
    )
    assert done == STEPS and len(batches) == STEPS
    return root / "final.pt", batches


@pytest.fixture
def stop_step() -> Iterator[int]:
    # Its own generator: the example reseeds the global one, which would make this the same step every time.
    yield random.Random().randrange(3, STEPS - 3)


def test_final_request_then_new_instance_resumes_bitwise(
    train: ModuleType, uninterrupted: tuple[Path, list[torch.Tensor]], tmp_path: Path, stop_step: int
) -> None:
    """Stopped by a final request at a random step, resumed from copied files: final state bitwise equal."""
    events: list[dict[str, Any]] = []
    guard = FinalAt(at=stop_step, checkpoint_dir=str(tmp_path / "old"))
    done = train.run(
        args(train, "--every-steps", "25"), guard=guard, emit=events.append, on_batch=guard.on_batch
    )
    assert done == stop_step + 1, f"stop at {stop_step}"
    assert events[-1] == {"event": "stopped", "step": stop_step + 1}
    assert guard.saves[-1] == (f"train/step-{stop_step + 1:09d}.pt", stop_step + 1)
    assert guard.waits[-1] == 5.0

    new_instance(tmp_path / "old", tmp_path / "new")
    resumed = train.run(
        args(train, "--checkpoint-dir", str(tmp_path / "new"), "--out", str(tmp_path / "final.pt")),
        guard=None,
        emit=events.append,
    )
    assert resumed == STEPS
    started = [e for e in events if e["event"] == "started"]
    assert started[-1]["step"] == stop_step + 1, "resumed from a different step than it stopped at"
    assert_bitwise_equal(uninterrupted[0], tmp_path / "final.pt")


def test_next_batch_after_resume_equals_the_uninterrupted_one(
    train: ModuleType, uninterrupted: tuple[Path, list[torch.Tensor]], tmp_path: Path, stop_step: int
) -> None:
    """After resume the loader continues at the saved position: each later batch equals the clean run's."""
    guard = FinalAt(at=stop_step, checkpoint_dir=str(tmp_path))
    train.run(
        args(train, "--every-steps", "0"), guard=guard, emit=lambda event: None, on_batch=guard.on_batch
    )
    batches: dict[int, torch.Tensor] = {}
    train.run(
        args(train, "--checkpoint-dir", str(tmp_path)),
        guard=None,
        emit=lambda event: None,
        on_batch=lambda step, x: batches.setdefault(step, x.clone()),
    )
    assert min(batches) == stop_step + 1
    for step, batch in batches.items():
        assert torch.equal(batch, uninterrupted[1][step]), (
            f"batch of step {step} differs (stopped at {stop_step})"
        )


def run_example(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", str(STEPS), *argv],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_process_killed_after_a_save_resumes_bitwise(
    uninterrupted: tuple[Path, list[torch.Tensor]], tmp_path: Path, stop_step: int
) -> None:
    """A trainer killed (SIGKILL) after a save resumes on a new disk and ends bitwise equal to a clean run."""
    stop_step = stop_step // 2  # early, so saves and steps remain after it and the kill lands mid-run

    out_path = tmp_path / "killed.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE),
                "--steps",
                str(STEPS),
                "--no-daemon",
                "--every-steps",
                "5",
                "--step-sleep",
                "0.05",
                "--checkpoint-dir",
                str(tmp_path / "old"),
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:

            def saved_at_or_after_stop() -> bool:
                lines = out_path.read_text().splitlines()
                return any(
                    json.loads(line).get("event") == "saved" and json.loads(line)["step"] > stop_step
                    for line in lines
                    if line.endswith("}")
                )

            wait_until(saved_at_or_after_stop, timeout_s=60, what=f"a save after step {stop_step}")
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    events = [json.loads(line) for line in out_path.read_text().splitlines() if line.endswith("}")]
    assert not any(e["event"] == "finished" for e in events), "the run ended before it was killed"

    new_instance(tmp_path / "old", tmp_path / "new")
    resumed = run_example(
        "--no-daemon", "--checkpoint-dir", str(tmp_path / "new"), "--out", str(tmp_path / "b.pt")
    )
    assert resumed.returncode == 0, resumed.stderr
    started = json.loads(resumed.stdout.splitlines()[0])
    assert started["event"] == "started" and started["step"] > stop_step
    assert_bitwise_equal(uninterrupted[0], tmp_path / "b.pt")


def test_example_without_a_daemon_warns_once_and_finishes(tmp_path: Path, short_tmp: Path) -> None:
    """With $SPOTD_SOCKET pointing at no daemon, the example warns once on stderr and trains to the end."""
    pytest.importorskip("spotd.client")
    env = {**os.environ, "SPOTD_SOCKET": str(short_tmp / "absent.sock")}
    result = run_example("--checkpoint-dir", str(tmp_path), "--every-steps", "20", env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["started", "saved", "saved", "saved", "finished"]
    assert events[-1] == {"event": "finished", "step": STEPS, "loss": events[-1]["loss"], "durable": True}
    assert result.stderr.count("SpotdUnavailableWarning") == 1, result.stderr


def test_bad_arguments_exit_with_a_message(tmp_path: Path) -> None:
    """A negative step count is refused with exit code 1 and a message, not a traceback."""
    result = run_example("--no-daemon", "--steps", "-1", "--checkpoint-dir", str(tmp_path))
    assert result.returncode == 1
    assert "must be >= 0" in result.stderr and "Traceback" not in result.stderr
