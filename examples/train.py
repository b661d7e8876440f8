"""A small deterministic CPU training job that spotd can interrupt and resume with zero lost steps.

    python examples/train.py --steps 200 --checkpoint-dir /tmp/ckpt --every-steps 50 --out final.pt

It talks to the daemon at $SPOTD_SOCKET when one runs (and trains on without one). Every event is one JSON
line on stdout (``started``, ``saved``, ``stopped``, ``finished``) so the tests and ``spotd demo`` can
follow it. The same seed gives bitwise the same weights whether or not the run was interrupted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spotd.torch import AUTO, Checkpointer, CheckpointError, Guard, SaveInfo

FEATURES = 16
DATASET = 512
BATCH = 32


class SyntheticBatches:
    """A seeded dataset read in a per-epoch shuffled order; its position is part of the checkpoint."""

    __slots__ = ("_epoch", "_index", "_order", "_seed", "_x", "_y")

    def __init__(self, *, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self._seed = seed
        self._x = torch.randn(DATASET, FEATURES, generator=g)
        w = torch.randn(FEATURES, 1, generator=g)
        self._y = torch.sin(self._x @ w) + 0.1 * torch.randn(DATASET, 1, generator=g)
        self._epoch = 0
        self._index = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> torch.Tensor:
        # Derived from (seed, epoch), not from the global RNG: the order survives a restore by construction.
        return torch.randperm(DATASET, generator=torch.Generator().manual_seed(self._seed * 100_003 + epoch))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._index + BATCH > DATASET:
            self._epoch += 1
            self._index = 0
            self._order = self._shuffle(self._epoch)
        rows = self._order[self._index : self._index + BATCH]
        self._index += BATCH
        return self._x[rows], self._y[rows]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._index = int(state["index"])
        self._order = self._shuffle(self._epoch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="total steps to train (default 200)")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="local checkpoint root (default: the daemon's, $SPOTD_CHECKPOINT_DIR, /opt/ml/checkpoints)",
    )
    p.add_argument(
        "--every-steps", type=int, default=50, help="steps between checkpoints (0: only when asked)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write final model and optimizer state here")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep a step (for drills)")
    p.add_argument("--name", default="train", help="checkpoint name: files go to <checkpoint-dir>/<name>/")
    p.add_argument("--keep", type=int, default=2, help="local checkpoints kept (default 2)")
    p.add_argument(
        "--durable-timeout",
        type=float,
        default=60.0,
        help="seconds to wait at the end for the last checkpoint to reach the store",
    )
    p.add_argument("--no-daemon", action="store_true", help="do not look for spotd: plain checkpointing")
    return p


def emit_json(event: dict[str, Any]) -> None:
    print(json.dumps(event, separators=(",", ":")), flush=True)


def run(
    args: argparse.Namespace,
    *,
    guard: Guard | Any | None = AUTO,
    emit: Callable[[dict[str, Any]], None] = emit_json,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> int:
    """Train; returns the number of steps done. ``guard`` and ``on_batch`` are for tests."""
    if args.steps < 0 or args.every_steps < 0:
        raise ValueError("--steps and --every-steps must be >= 0")
    torch.set_num_threads(1)  # one thread: the same reduction order on every run
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    loader = SyntheticBatches(seed=args.seed)

    def saved(info: SaveInfo) -> None:
        emit(
            {
                "event": "saved",
                "step": info.step,
                "path": info.relative,
                "bytes": info.bytes,
                "seconds": round(info.seconds, 4),
                "reason": info.reason,
                "request_id": info.request_id,
            }
        )

    ckpt = Checkpointer(
        model=model,
        optimizer=opt,
        scheduler=sched,
        state={"loader": loader},
        every_steps=args.every_steps or None,
        keep=args.keep,
        checkpoint_dir=args.checkpoint_dir,
        name=args.name,
        guard=guard,
        on_save=saved,
    )
    with ckpt:
        start = ckpt.restore()
        emit({"event": "started", "step": start, "steps": args.steps, "dir": str(ckpt.directory)})
        done = start
        stopped = False
        last_loss: float | None = None
        for step in range(start, args.steps):
            x, y = loader.next_batch()
            if on_batch is not None:
                on_batch(step, x)
            # numpy and python RNG feed the step too, so their restore is exercised, not just torch's
            x = x + torch.from_numpy(np.random.normal(0.0, 0.01, size=tuple(x.shape)).astype(np.float32))
            weight = 1.0 + 0.01 * random.random()
            loss = weight * nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last_loss = loss.item()
            done = step + 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if ckpt.step(step):
                stopped = True
                break
        if stopped:
            emit({"event": "stopped", "step": done})
        else:
            if ckpt.last_saved_step != done:
                ckpt.save(done)
            durable = ckpt.wait_durable(timeout=args.durable_timeout)
            emit({"event": "finished", "step": done, "loss": last_loss, "durable": durable})
        if args.out:
            torch.save({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict()}, args.out)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args, guard=None if args.no_daemon else AUTO)
    except (CheckpointError, ValueError) as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
