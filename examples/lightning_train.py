"""PyTorch Lightning under spotd: a spot notice stops it at a step, ``fit(ckpt_path="last")`` resumes there.

    python examples/lightning_train.py --max-steps 300 --every-steps 50 --checkpoint-dir /tmp/ckpt

The spotd part is two lines: ``SpotdCallback()`` in the callbacks and ``ckpt_path="last"`` in ``fit``; the
loader is a ``spotd.lightning.ResumableLoader`` so a resume mid-epoch keeps the data position. It talks to the
daemon at $SPOTD_SOCKET when one runs. Every event is one JSON line on stdout (``started``, ``validation``,
``stopped``, ``done`` with a digest of the final weights): the same seed gives the same digest, bit for bit,
whether or not the run was interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import spotd.lightning

FEATURES = 16
ROWS = 640
BATCH = 32


def emit(event: str, **fields: Any) -> None:
    # One write() per line: under torchrun the ranks share one stdout, and print() may split a line.
    os.write(1, (json.dumps({"event": event, **fields}) + "\n").encode())


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=40)}


class Events(pl.Callback):
    """What the tests follow: where training starts, each validation, and a pace to interrupt it at."""

    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        emit("started", step=trainer.global_step, pid=os.getpid())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        emit("validation", step=trainer.global_step)


def data(seed: int) -> tuple[spotd.lightning.ResumableLoader, torch.utils.data.DataLoader[Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=g)
    y = torch.sin(x @ torch.randn(FEATURES, 1, generator=g))
    train = torch.utils.data.TensorDataset(x[:512], y[:512])
    val = torch.utils.data.TensorDataset(x[512:], y[512:])
    # Generators of their own: iterating a loader then draws nothing from the global RNG.
    return (
        spotd.lightning.ResumableLoader(train, batch_size=BATCH, shuffle=True, seed=seed),
        torch.utils.data.DataLoader(val, batch_size=BATCH, generator=torch.Generator()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--every-steps", type=int, default=50, help="periodic checkpoint every N steps")
    p.add_argument("--checkpoint-dir", default=None, help="default: $SPOTD_CHECKPOINT_DIR")
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--val-every", type=int, default=40, help="validation every N steps")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep a step (for drills)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    spotd_cb = spotd.lightning.SpotdCallback(
        dirpath=f"{args.checkpoint_dir}/lightning" if args.checkpoint_dir else None,
        every_n_train_steps=args.every_steps or None,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        min_steps=args.min_steps,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spotd_cb, Events(args.step_sleep)],
    )
    model = Regression()
    train, val = data(args.seed)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val, ckpt_path="last")
    if spotd_cb.stopped:
        emit("stopped", step=trainer.global_step)
        return 0
    emit("done", step=trainer.global_step, digest=digest(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
