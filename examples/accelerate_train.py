"""Hugging Face Accelerate under spotd: a spot notice stops the loop at a step, ``load_state`` resumes there.

    python examples/accelerate_train.py --max-steps 200 --every-steps 50 --checkpoint-dir /tmp/ckpt

The spotd part: ``SpotdAccelerate(accelerator, every_steps=...)``, ``start = spot.restore()``,
``spot.batches(...)`` for the data position and ``if spot.step(step): break``. Every event is one JSON line
on stdout (``started``, ``stopped``, ``done`` with a digest of the final weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn

from spotd.accelerate import SpotdAccelerate

RANK = int(os.environ.get("RANK", "0"))
FEATURES = 16


def emit(event: str, **fields: Any) -> None:
    # One write() per line: under torchrun the ranks share one stdout, and print() may split a line.
    os.write(1, (json.dumps({"event": event, "rank": RANK, **fields}) + "\n").encode())


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--every-steps", type=int, default=50, help="periodic checkpoint every N steps")
    p.add_argument("--checkpoint-dir", default=None, help="default: the daemon's, $SPOTD_CHECKPOINT_DIR")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep a step (for drills)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    # A seedable sampler: an epoch's order comes from (seed, epoch), not from when the loader is iterated.
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(512, FEATURES, generator=g)
    y = torch.sin(x @ torch.randn(FEATURES, 1, generator=g))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator()
    )
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    spot = SpotdAccelerate(
        accelerator, every_steps=args.every_steps or None, checkpoint_dir=args.checkpoint_dir
    )
    start = spot.restore()
    emit("started", step=start, pid=os.getpid())
    epochs = -(-args.max_steps // len(loader))
    stopped = False
    for step, (inputs, targets) in spot.batches(loader, start=start, epochs=epochs):
        if step >= args.max_steps:
            break
        loss = nn.functional.mse_loss(model(inputs), targets)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if spot.step(step):
            emit("stopped", step=step + 1)
            stopped = True
            break
    spot.close()
    if not stopped:
        emit("done", step=args.max_steps, digest=digest(accelerator.unwrap_model(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
